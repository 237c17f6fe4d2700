"""`bertprep`: the command line of the preprocessing half. Parses options, calls the work functions, prints."""

from __future__ import annotations

import json
import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import click

from prep.errors import BertError
from prep.locks import output_lock
from prep.oserrors import explained_os_errors, os_error_message, release_descriptors
from prep.outputs import remove_own_staging

DEFAULT_VOCAB_DIR = Path("data/vocab")


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's notice, `kill`), delivered as Ctrl-C is so that the same clean-up runs."""


def _terminate_handler(owner_pid: int):
    """A SIGTERM handler raising `Terminated` in the process that installed it; forked workers inherit it, and there
    SIGTERM (the pool's way to stop them) keeps its default action. The pool resets it in its workers too, but a
    worker it stops before that (a pool that failed to start, out of file descriptors) still holds this handler, and
    raising there hung the job."""

    def terminate(signum, frame):
        if os.getpid() != owner_pid:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        raise Terminated()

    return terminate


class ErrorHandlingGroup(click.Group):
    """Turns our user errors and OS errors (a full disk, a forbidden path) into one line on stderr and exit status 1,
    and Ctrl-C or SIGTERM into exit 130 or 143, without a trace."""

    interrupted_message = "interrupted: nothing was written; run the command again to start over"

    def invoke(self, ctx):
        previous = signal.signal(signal.SIGTERM, _terminate_handler(os.getpid()))
        try:
            return super().invoke(ctx)
        except BertError as exc:
            raise click.ClickException(str(exc)) from None
        except OSError as exc:
            raise click.ClickException(os_error_message(exc)) from None
        except KeyboardInterrupt as exc:
            click.echo(self.interrupted_message, err=True)
            sys.exit(128 + (signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT))
        finally:
            signal.signal(signal.SIGTERM, previous)


@contextmanager
def sole_writer(out_dir: Path, flag: str) -> Iterator[None]:
    """While the block runs, this job alone writes `out_dir` (a second job refuses at start: `prep.locks`), and an
    OS error becomes one line naming it and `flag`, the option that chooses another output, with this job's staging
    deleted."""
    with explained_os_errors(out_dir, flag), output_lock(out_dir, flag):
        try:
            yield
        except OSError as exc:
            release_descriptors(exc)
            remove_own_staging(out_dir)
            raise


def quiet_option(f):
    return click.option("--quiet", "-q", is_flag=True, help="No progress bar.")(f)


def casing_option(default):
    def decorate(f):
        return click.option("--uncased/--cased", "lowercase", default=default,
                            help="Lowercase and strip accents, as BERT uncased does"
                                 + (" (default: uncased)." if default else " (default: the vocabulary's)."))(f)
    return decorate


@click.group(cls=ErrorHandlingGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bertprep")
def main():
    """Turn text into pre-masked, fixed-length BERT training shards.

    \b
    Example:
      bertprep vocab -i wiki.train.tokens
      bertprep shard --max-len 128 --seed 123
      bertprep peek data/wiki_128 -n 2
    """


# `bertprep vocab` options that only training reads, with the flag that sets each.
_TRAINING_OPTIONS = {"vocab_size": "--vocab-size", "model_type": "--model-type", "lowercase": "--uncased/--cased",
                     "sample_lines": "--sample-lines", "threads": "--threads"}


@main.command()
@click.option("-i", "--input", "inputs", multiple=True, type=click.Path(path_type=Path),
              help="Corpus to train on: plain text, WikiText, JSON Lines with a `text` field; .zst compressed or not. "
                   "Repeatable.")
@click.option("--import", "import_path", type=click.Path(path_type=Path),
              help="Instead of training, use a Hugging Face tokenizer.json (or a model directory holding one): it is "
                   "copied and recorded. Needs the `tokenizers` library.")
@click.option("-o", "--out", "out_dir", type=click.Path(path_type=Path), default=DEFAULT_VOCAB_DIR, show_default=True,
              help="Vocabulary directory to write.")
@click.option("--vocab-size", type=int, default=30522, show_default=True)
@click.option("--model-type", type=click.Choice(["wordpiece", "unigram", "bpe"]), default="wordpiece",
              show_default=True, help="wordpiece writes a BERT vocab.txt; unigram/bpe a SentencePiece model too.")
@casing_option(True)
@click.option("--sample-lines", type=int, default=2_000_000, show_default=True,
              help="Most lines fed to the trainer, sampled evenly over the corpus, so memory stays bounded.")
@click.option("--threads", type=int, default=0, help="Trainer threads (default: all cores).")
@click.option("--force", is_flag=True, help="Replace an existing vocabulary directory.")
@click.pass_context
def vocab(ctx, inputs, import_path, out_dir, vocab_size, model_type, lowercase, sample_lines, threads, force):
    """Train a vocabulary with SentencePiece and record what it was trained on, or import a Hugging Face
    tokenizer.json (such as a published ModernBERT's) to shard text for that model.

    \b
    Example:
      bertprep vocab -i wiki.train.tokens --vocab-size 30522
      bertprep vocab --import ModernBERT-base/tokenizer.json -o data/modernbert_vocab
    """
    from prep.vocab import VocabConfig, import_tokenizer, make_vocab

    if import_path is not None:
        if inputs:
            raise click.UsageError("-i/--input trains a vocabulary and --import uses an existing one: pass one of them")
        for name, flag in _TRAINING_OPTIONS.items():
            if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT:
                raise click.UsageError(f"{flag} applies to training a vocabulary with -i, not to --import")
        with sole_writer(out_dir, "-o"):
            record = import_tokenizer(import_path, out_dir, force=force)
        special = " ".join(f"{role} {token}={record['special'][role]}"
                           for role, token in record["special_tokens"].items() if token is not None)
        click.echo(f"wrote {out_dir}/tokenizer.json: {record['vocab_size']:,} tokens (Hugging Face "
                   f"{record['model_type']}{', byte-level' if record['byte_level'] else ''}, "
                   f"{'uncased' if record['lowercase'] else 'cased'}); special tokens: {special}")
        return
    if not inputs:
        raise click.UsageError("pass -i FILE to train a vocabulary, or --import tokenizer.json to use an existing one")
    try:
        config = VocabConfig(vocab_size=vocab_size, model_type=model_type, lowercase=lowercase,
                             sample_lines=sample_lines, threads=threads)
    except ValueError as exc:
        raise click.UsageError(str(exc))
    with sole_writer(out_dir, "-o"):
        record = make_vocab(list(inputs), out_dir, config, force=force)
    click.echo(f"wrote {out_dir}/vocab.txt: {record['vocab_size']:,} tokens ({record['model_type']}, "
               f"{'uncased' if record['lowercase'] else 'cased'}) from {record['lines_used']:,} lines")


@main.command()
@click.option("-i", "--input", "inputs", multiple=True, type=click.Path(path_type=Path),
              help="Corpus (repeatable). Default: the corpus the vocabulary was trained on.")
@click.option("--vocab", "vocab_path", type=click.Path(path_type=Path), default=DEFAULT_VOCAB_DIR, show_default=True,
              help="Vocabulary directory, a BERT vocab.txt or a Hugging Face tokenizer.json.")
@click.option("-o", "--out", "out_dir", type=click.Path(path_type=Path),
              help="Dataset directory. Default: data/{label}_{max_len}.")
@click.option("--label", help="Dataset label. Default: the first input's file name up to its first dot.")
@click.option("--max-len", type=int, default=128, show_default=True, help="Tokens per row (8..4096).")
@click.option("--seed", type=int, default=12345, show_default=True)
@click.option("--mask-prob", type=float, default=0.15, show_default=True)
@click.option("--max-predictions", type=int, help="Masked positions per row at most. Default: ceil(max_len × mask_prob).")
@click.option("--whole-word", is_flag=True, help="Mask all pieces of a chosen word together.")
@click.option("--dupe-factor", type=int, default=1, show_default=True,
              help="Differently masked copies of the training rows.")
@click.option("--nsp", is_flag=True, help="Sentence pairs with token_type_ids and nsp_labels.")
@click.option("--nsp-mode", type=click.Choice(["random", "swap"]), default="random", show_default=True,
              help="random: B from another document half of the time; swap: A and B swapped (ALBERT's SOP).")
@click.option("--short-seq-prob", type=float, default=0.1, show_default=True)
@click.option("--val-fraction", type=float, default=0.01, show_default=True,
              help="Share of documents held out for validation.")
@click.option("--val", "val_inputs", multiple=True, type=click.Path(path_type=Path),
              help="Explicit validation corpus instead of a held-out share (repeatable).")
@click.option("--rows-per-shard", type=int, default=0, help="Rows per shard file (default: about 64 MiB a shard).")
@click.option("--workers", type=int, default=0, help="Worker processes, each reading, tokenizing, packing, masking and writing its own ranges of the input, then building shards (default: all cores).")
@casing_option(None)
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
@quiet_option
def shard(inputs, vocab_path, out_dir, label, max_len, seed, mask_prob, max_predictions, whole_word, dupe_factor,
          nsp, nsp_mode, short_seq_prob, val_fraction, val_inputs, rows_per_shard, workers, lowercase, force, quiet):
    """Tokenize, pack, mask and shuffle a corpus into memmap shards plus a manifest.

    \b
    Example:
      bertprep shard --max-len 128 --seed 123
      bertprep shard -i corpus.jsonl.zst --max-len 512 --nsp --whole-word -o data/corpus_512
    """
    from prep.masking import MaskingConfig
    from prep.pipeline import ShardConfig, build_shards
    from prep.vocab import load_vocab_record

    if not inputs:
        record = load_vocab_record(vocab_path)
        if not record or not record.get("inputs"):
            raise click.UsageError(f"no -i/--input given and {vocab_path} records no corpus: pass -i FILE")
        inputs = tuple(Path(entry["path"]) for entry in record["inputs"])
    label = label or Path(inputs[0]).name.split(".")[0] or "corpus"
    out_dir = out_dir or Path("data") / f"{label}_{max_len}"
    try:
        masking = MaskingConfig(mask_prob, max_predictions or MaskingConfig.default_max_predictions(max_len, mask_prob),
                                whole_word)
    except ValueError as exc:
        raise click.UsageError(str(exc))
    config = ShardConfig(
        inputs=tuple(inputs), vocab=vocab_path, out_dir=out_dir, max_len=max_len, seed=seed, masking=masking, nsp=nsp,
        nsp_mode=nsp_mode, short_seq_prob=short_seq_prob, dupe_factor=dupe_factor, val_fraction=val_fraction,
        val_inputs=tuple(val_inputs), rows_per_shard=rows_per_shard, lowercase=lowercase, label=label,
        workers=workers, force=force, progress=not quiet,
    )
    with sole_writer(out_dir, "-o"):
        result = build_shards(config)
    click.echo(_shard_summary(out_dir, result))


def _shard_summary(out_dir: Path, result: dict) -> str:
    summary, splits, stats = result["summary"], result["splits"], result["stats"]
    read = stats["read"]
    lines = [f"wrote {out_dir}: {summary['documents']:,} documents in {summary['seconds']:.1f} s "
             f"({summary['tokens_per_s'] / 1e3:,.0f}k tokens/s, {summary['workers']} worker{'s' if summary['workers'] != 1 else ''})"]
    for name, info in splits.items():
        split = stats["splits"][name]
        dropped = ", ".join(f"{k} {v}" for k, v in split["dropped"].items()) or "none"
        lines.append(f"  {name:5s} {info['rows']:>10,} rows {info['tokens']:>12,} tokens {info['masked']:>11,} masked "
                     f"padding {split['padding_share']:.2%}  {len(info['shards'])} shards  dropped documents: {dropped}")
    if splits["val"]["rows"] == 0:
        lines.append("  note: no validation rows: raise --val-fraction or pass --val FILE to evaluate while training")
    if read.get("invalid_utf8"):
        lines.append(f"  note: {read['invalid_utf8']:,} invalid UTF-8 sequences were replaced with U+FFFD")
    for key in ("long_lines_split", "long_documents_split"):
        if read.get(key):
            lines.append(f"  note: {read[key]:,} {key.replace('_', ' ')}")
    return "\n".join(lines)


@main.command()
@click.argument("dataset_dir", type=click.Path(path_type=Path))
@click.option("--split", default="train", show_default=True)
@click.option("-n", "count", type=int, default=3, show_default=True, help="Rows to show.")
@click.option("--row", type=int, help="Show this row (and the next n-1).")
@click.option("--stats", "show_stats", is_flag=True, help="Measured statistics instead of rows.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--color/--no-color", default=None, help="Highlight masked positions (default: when a terminal).")
def peek(dataset_dir, split, count, row, show_stats, as_json, color):
    """Show rows of a dataset decoded, masks and targets visible, or its statistics.

    \b
    Example:
      bertprep peek data/wiki_128 -n 2
      bertprep peek data/wiki_128 --split val --stats
    """
    from prep.hf_tokenizer import readable_tokens
    from prep.peek import format_row, format_stats, row_view, split_stats
    from prep.shards import open_dataset
    from prep.wordpiece import Vocab

    dataset = open_dataset(dataset_dir)
    tokens = readable_tokens(Vocab.load(dataset.vocab_file))
    rows = dataset.split(split).rows
    if show_stats:
        stats = split_stats(dataset, tokens, split)
        click.echo(json.dumps(stats, indent=1) if as_json else format_stats(stats))
        return
    start = row or 0
    if not 0 <= start < rows:
        raise click.UsageError(f"--row {start} is outside split {split!r}, which has {rows} rows")
    views = [row_view(dataset, tokens, split, i) for i in range(start, min(start + count, rows))]
    if as_json:
        click.echo(json.dumps(views, indent=1))
        return
    use_color = sys.stdout.isatty() if color is None else color
    click.echo("\n\n".join(format_row(v, use_color) for v in views), color=use_color)


@main.command()
@click.argument("dataset_dir", type=click.Path(path_type=Path))
def verify(dataset_dir):
    """Re-hash every file against the manifest and check shapes and value ranges.

    \b
    Example:
      bertprep verify data/wiki_128
    """
    from prep.shards import verify_dataset

    result = verify_dataset(dataset_dir)
    rows = ", ".join(f"{name} {n:,} rows" for name, n in result["rows"].items())
    click.echo(f"ok: {dataset_dir}: {result['files']} files match the manifest ({rows})")


@main.command("demo-corpus")
@click.option("-o", "--out", type=click.Path(path_type=Path), default=Path("data/pydoc.txt"), show_default=True)
def demo_corpus(out):
    """Write the offline demo corpus: the Python standard library's docstrings as plain text.

    \b
    Example:
      bertprep demo-corpus -o data/pydoc.txt
    """
    from prep.democorpus import write_demo_corpus

    out.parent.mkdir(parents=True, exist_ok=True)
    info = write_demo_corpus(out)
    click.echo(f"wrote {out}: {info['documents']:,} documents, {info['lines']:,} lines, {info['bytes'] / 1e6:.1f} MB")
