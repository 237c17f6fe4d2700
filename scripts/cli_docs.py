"""Writes docs/cli.md: the `--help` of every `bertprep` and `berttrain` command, each followed by its notes.

    python scripts/cli_docs.py > docs/cli.md     # regenerate
    python scripts/cli_docs.py --check           # exit status 1, and what to run, when docs/cli.md is stale

The help is rendered through Click at a fixed width (what `--help` prints on any terminal of 80 columns or more),
so the output depends on the commands alone. The notes below are the explanations too long for a command's help;
a note for a command that no longer exists is an error, so that renamed commands cannot leave stale prose behind.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parent.parent
DOC_PATH = ROOT / "docs" / "cli.md"
REGENERATE = "python scripts/cli_docs.py > docs/cli.md"
HELP_WIDTH = 78  # Click wraps help at min(terminal columns, 80) - 2

# Commands in the order of the pipeline; commands not listed follow in alphabetical order.
COMMAND_ORDER = ("demo-corpus", "vocab", "shard", "peek", "verify",
                 "run", "eval", "predict", "export", "finetune", "report")

NOTES = {
    "bertprep vocab": """
The trainer reads an evenly spaced sample of the corpus (`--sample-lines`), so its memory does not grow with the
corpus. `wordpiece` writes a BERT `vocab.txt` (`[PAD] [UNK] [CLS] [SEP] [MASK]` first, `##` continuations) whose
encoding is token for token Hugging Face `BertTokenizer`'s; `unigram` and `bpe` write a SentencePiece model
(`spm.model`) beside its `vocab.txt`. `vocab.json` records the inputs (sizes, sha256), the options and the
vocabulary's hash; `bertprep shard` reads its corpus from there when no `--input` is given.

An existing BERT `vocab.txt` (bert-base-uncased's, say) works as `bertprep shard --vocab` as it is; its casing is
inferred from it.

**Writing**: as `bertprep shard` does, the job builds the directory in a hidden `.NAME.partial-PID-HEX/` of its own,
`vocab.json` last, and renames it into place, holding `.NAME.lock` meanwhile: a killed job leaves no directory whose
`vocab.txt` could pass for a finished vocabulary, and a re-run starts over cleanly. `--force` replaces the whole
directory, so it refuses an input that lies inside it.
""",
    "bertprep shard": """
**Documents** are blank-line-separated blocks of plain text, WikiText articles (` = Title = ` starts one,
`= = Sub = =` headings stay inside, WikiText's `<unk>` becomes `[UNK]` and `@-@` splits are rejoined), or one JSON
Lines record each. Sentences are found by a rule-based splitter.

**Rows** are packed full by default, RoBERTa style: `[CLS]` + the next `max_len - 2` tokens of the corpus + `[SEP]`,
documents joined by `[SEP]`, so no token is lost and only the last row of a split is padded. With `--nsp`, rows are
`[CLS] A [SEP] B [SEP]` built per document as in Google's original generator, with B from another document half of
the time (`--nsp-mode swap`: A and B swapped, ALBERT's sentence order). Documents that cannot make a row are counted
by reason in the manifest, never dropped silently.

**Masking**: of the positions chosen (`--mask-prob`, at most `--max-predictions` a row), 80% become `[MASK]`, 10% a
random ordinary token and 10% stay unchanged; a special token is never chosen. `--whole-word` masks all pieces of a
chosen word together; `--dupe-factor N` writes N differently masked copies of the training rows. Every random choice
derives from (seed, split, copy, document), and validation documents are chosen by the seed and the document's text
alone, so two datasets of different `--max-len` and the same seed hold out the same documents.

**Shuffle and memory**: training rows are shuffled across all shards at write time (an external shuffle through
scratch files that holds one shard's rows at a time), so a reader taking contiguous slices sees a random order.
Lines over 1M characters are cut at whitespace and documents over 10M characters are split (both counted), and only
a few blocks of input are in flight. The main process only cuts the input into blocks of raw bytes where documents
start; the workers decode, read and tokenize the blocks and mask the rows. The output is byte-identical for any
`--workers`.

**Writing**: the job writes into a hidden `.NAME.partial-PID-HEX/` directory of its own and renames it into place
after the manifest, which is written last: Ctrl-C or `kill` leaves no dataset that could be taken for complete, and a
re-run starts over cleanly. It holds `.NAME.lock` beside the output while it runs: a second job on the same output
refuses at start, naming the first. Bad input (a missing or empty file, a missing vocabulary, `--max-len` out of
range, an existing output) and OS errors (a full disk, a read-only directory) are one line on stderr and exit status
1; invalid UTF-8 is replaced and counted, and the summary says so.
""",
    "bertprep peek": """
Rows are printed the way one debugs BERT (`Input Tokens`, `Target Tokens`, `Masked Positions`). `--stats` measures
rows, tokens, padding, the masked share, the realised 80/10/10 split, the top tokens and the NSP balance from the
arrays themselves, not from the manifest.
""",
    "bertprep verify": """
Checks every file's sha256 against the manifest, and shapes and value ranges; a damaged file is named and the exit
status is 1.
""",
    "berttrain run": """
**Model**: BERT in plain PyTorch (`--arch modernbert`: ModernBERT). Attention goes through
`scaled_dot_product_attention`, so CUDA gets its fused kernels. `--norm post` is the original BERT, whose weights map
one to one onto Hugging Face `BertForMaskedLM` (a test gets the same logits to 1e-5); `--norm pre` is the stabler
choice for high learning rates. The MLM head runs only at the masked positions, and so does the last layer but for
its keys and values (the same logits for less work: 18% less time a step for `mini` on a CPU); the NSP head is built
when the shards carry NSP labels. Sizes: `tiny` (L2/H128), `mini` (L4/H256), `small` (L4/H512), `medium` (L8/H512), `base`
(L12/H768), `large` (L24/H1024). The vocabulary matrix is padded to a multiple of 64 rows.

**`--arch modernbert`** computes what transformers' `ModernBertForMaskedLM` computes (a test loads the same weights
into both and gets the same logits to 1e-5, with padding and rows longer than the window): token embeddings and a
LayerNorm without bias, no position or segment embeddings; per layer pre-norm attention (no norm in layer 0) with a
fused `Wqkv`, rotary positions (theta 160,000 in the global layers, 10,000 in the local ones), global attention every
3rd layer and a 128-token sliding window (64 either side) elsewhere; a pre-norm GeGLU MLP; no biases; a final
LayerNorm; the head and the tied decoder at the masked positions only, and there too the last layer's queries, `Wo`
and GeGLU (its keys and values at every token): the same logits for 13% fewer training FLOPs in `mini` and `small`,
5% in `base`. Named sizes keep BERT's layers, widths and heads; the GeGLU width is 8/3 × hidden rounded to a
multiple of 64 (tiny 320, mini 704, small and medium 1344, base 2048, large 2752), so each size has BERT's MLP
parameters (within 7%) and the two architectures compare at equal size; ModernBERT's own base uses 1152 and spends
the rest on more layers (`--ffn 1152`). Untuned, it trains with the modern recipe: `--masking dynamic` at
`--mask-prob 0.3` from the same 15% shards, no dropout. Shards with NSP labels are refused: it has no segments.

**Data path**: a batch is a contiguous row slice of the shards' memmaps turned into tensors with no copy, prepared on
a background thread while the current step runs; there are no DataLoader workers. The order of batch-sized blocks is
a keyed permutation of (seed, epoch), so resuming costs O(1), and rank r of W takes its share of each global batch:
2 processes of 8 rows see exactly what 1 process of 16 sees. Each step's wait for data is logged as
`data_wait_frac`.

**Loss**: the mean over every masked token of the global batch, whatever its split into processes and
`--grad-accum` micro-steps. `--masking dynamic` restores the original tokens from `mlm_labels` and re-masks on the
device every step with the same 80/10/10 rules (whole words if the shards used them): RoBERTa's dynamic masking at no
CPU cost.

**Checks before training**: the format version, `max_len` against the model's positions, and the vocabulary's
sha256 against the run's or `--init-from`'s. A mismatch is a one-line error.

**Optimisation**: AdamW (no decay on biases and LayerNorm), fused where the fused kernel is fast (CUDA, AVX-512
CPUs) and foreach elsewhere. The default `--lr` depends on size and norm; the warm-up is linear, then linear or
cosine decay to `--min-lr`. A non-finite loss skips the step and is counted; `--max-nonfinite` in a row stop the
run. On a CPU the run has glibc's malloc keep freed memory, so the large buffers of every step are not page-faulted
in afresh (`docs/benchmarks.md`).

**Diagnostics**: a run whose predictions at the `[MASK]` slots sit on one token and are right no more often than
the most-frequent-token baseline (the "predicts `the` everywhere" failure) gets a warning after two evaluations in a
row past the warm-up, suggesting more text, more steps or a lower `--lr`. `--overfit-batch` reports whether one
batch can be learned to ~0 loss. A small model on long rows sits at the token-frequency plateau for a long time
(attention starts out uniform, so a masked slot's neighbours hold 1/(L−1) of its attention): quick CPU checks use
`bertprep shard --max-len 16` (`docs/benchmarks.md`, "Learning in a short CPU run").

**Run directory**: `config.json` (every option, the model config and a summary of the shards' manifest),
`metrics.jsonl` (`step loss lr grad_norm tokens_per_s data_wait_frac`; evaluation records
`step split mlm_loss mlm_acc ppl mask_acc` and the baselines) and `checkpoints/step-00001000/` (weights, model
config, training state, then a `COMPLETE` marker, all renamed into place). It keeps the last `--keep-last`
checkpoints and the best. `--resume` restores model, optimizer, schedule, grad scaler, every RNG and the data
position: 10 steps and a resume to 20 give the losses of 20 straight. An existing run directory without `--resume`
or `--force` is an error.

**Starting points**: `--init-from` takes a run, a checkpoint, or a Hugging Face BERT directory (weights,
`config.json`, `vocab.txt`), so a published checkpoint can keep pretraining on your shards (shard them with
`bertprep shard --vocab DIR/vocab.txt`).

**Distributed**: `torchrun` runs DistributedDataParallel (gloo on CPU, nccl on GPU); only rank 0 writes, and
`--resume` works under torchrun too. On a GPU machine, `scripts/gpu_check.sh prepare|device` runs the device tests
and the BERT-base benchmarks from shards built beforehand on a CPU.
""",
    "berttrain eval": """
Reports the MLM loss, perplexity and masked-token accuracy next to the most-frequent-token baseline and the unigram
loss (NSP accuracy with pairs), and the same accuracy and baseline at the slots showing `[MASK]` alone (`mask_acc`).
That second pair is the one that shows learning: at the tenth of masked slots left unchanged, copying the input is
right, which lifts the overall accuracy long before a model reads any context. `--samples N` prints rows as
`Input Tokens / Target Tokens / Predicted Tokens` with top-3 probabilities.
""",
    "berttrain predict": """
Probabilities come from the full softmax; word pieces are joined for display. `--json` prints
`{"text": ..., "masks": [[{"token", "id", "prob"}, ...], ...]}`, one object a text. `--html` writes shard rows as one
page: each masked position is coloured by whether the model got it right, its prediction beside the truth, the
probability on hover.
""",
    "berttrain export": """
Every weight must land under its transformers name, checked against transformers' own model built on the meta
device (transformers itself would only warn and initialise missing weights at random).
`AutoModelForMaskedLM.from_pretrained(OUT)` and the `fill-mask` pipeline give `berttrain predict`'s probabilities to
1e-4, and export, then `berttrain run --init-from`, then export again gives identical tensors.
""",
    "berttrain finetune": """
The start is a run, a Hugging Face directory, or `--from-scratch` (the baseline that shows what pretraining buys).
The schedule is a linear warm-up over `--warmup-share` of the steps, then linear decay; weight decay spares biases
and LayerNorm. Each epoch reports accuracy and macro-F1 on `--val`; training stops early after `--patience` epochs
without improvement, keeps the best model, and `--predict FILE` writes labels with probabilities.
""",
    "berttrain report": """
`report.html` is self-contained: training and validation loss, accuracy, learning rate, tokens/s and data wait over
steps, and a table of sample predictions. `--png` needs matplotlib (`pip install -e '.[plot]'`); without it the
command says so.
""",
}


def command_groups() -> dict[str, click.Group]:
    """The two command lines, by program name."""
    if str(ROOT) not in sys.path:  # run as a script from anywhere, the checkout's packages win
        sys.path.insert(0, str(ROOT))
    from prep.cli import main as prep_main
    from train.cli import main as train_main

    return {"bertprep": prep_main, "berttrain": train_main}


def _ordered(names):
    rank = {name: i for i, name in enumerate(COMMAND_ORDER)}
    return sorted(names, key=lambda name: (rank.get(name, len(rank)), name))


def walk(command: click.Command, ctx: click.Context):
    """Yields (ctx, command) for `command` and every subcommand below it, groups before their commands."""
    yield ctx, command
    if isinstance(command, click.Group):
        for name in _ordered(command.list_commands(ctx)):
            sub = command.get_command(ctx, name)
            if sub is None or sub.hidden:
                continue
            yield from walk(sub, click.Context(sub, info_name=name, parent=ctx, **sub.context_settings))


def all_commands():
    """Yields (ctx, command) for every command of both programs; `ctx.command_path` is e.g. "bertprep shard"."""
    for prog, group in command_groups().items():
        settings = {**group.context_settings, "terminal_width": HELP_WIDTH, "max_content_width": HELP_WIDTH}
        root = click.Context(group, info_name=prog, **settings)
        yield from walk(group, root)


def render() -> str:
    """docs/cli.md as it should be now."""
    sections, seen = [], set()
    for ctx, command in all_commands():
        path = ctx.command_path
        seen.add(path)
        heading = "#" * min(ctx.command_path.count(" ") + 2, 4)
        section = f"{heading} `{path}`\n\n```text\n{command.get_help(ctx).rstrip()}\n```\n"
        if path in NOTES:
            section += "\n" + NOTES[path].strip() + "\n"
        sections.append(section)
    stale = sorted(set(NOTES) - seen)
    if stale:
        raise SystemExit(f"scripts/cli_docs.py has notes for commands that do not exist: {', '.join(stale)}; "
                         "move or delete them")
    header = ("# Command reference\n\n"
              f"Generated from every command's `--help` by `{REGENERATE}`; edit the commands' help (or the notes in "
              "that script), not this file. `tests/test_docs.py` fails when it is out of date.\n")
    return "\n".join([header, *sections])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Write docs/cli.md from the commands' --help.")
    parser.add_argument("--check", nargs="?", const=DOC_PATH, type=Path, metavar="FILE",
                        help=f"compare with FILE (default {DOC_PATH.relative_to(ROOT)}) instead of printing")
    args = parser.parse_args(argv)
    expected = render()
    if args.check is None:
        sys.stdout.write(expected)
        return 0
    actual = args.check.read_text(encoding="utf-8") if args.check.is_file() else None
    if actual != expected:
        print(f"{args.check} is out of date with the commands' --help: run `{REGENERATE}`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
