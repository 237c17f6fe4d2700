"""`berttrain`: the command line of the training half (run, eval, verify; predict, export, finetune, report). Parses
options, calls the work functions, prints."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click
from click.core import ParameterSource

from prep.errors import BertError

from prep.cli import ErrorHandlingGroup, quiet_option, sole_writer
from train.config import TrainConfig
from train.finetune import FinetuneConfig
from train.diagnose import overfit_verdict
from train.options import click_options
from train.runtime import DEVICES, PRECISIONS


class _Group(ErrorHandlingGroup):
    interrupted_message = "interrupted: continue from the last checkpoint with --resume"


def device_option(f):
    return click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True,
                        help="auto = CUDA when present.")(f)


def device_options(f, precision_default: str | None = "auto"):
    precision_help = "bf16/fp16 autocast; auto = bf16 where the device has it, else fp32."
    if precision_default is None:
        precision_help += " [default: the run's, so that its own evaluations are reproduced]"
    f = click.option("--precision", type=click.Choice(PRECISIONS), default=precision_default,
                     show_default=precision_default is not None, help=precision_help)(f)
    return device_option(f)


def eval_device_options(f):
    """--device and --precision for scoring a run: the precision defaults to the run's."""
    return device_options(f, precision_default=None)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bertprep")
def main():
    """Pretrain a BERT from `bertprep shard` output.

    \b
    Example:
      berttrain run --shards data/wiki_128 --size mini --steps 2000 --run-dir runs/mini
      torchrun --nproc_per_node 2 -m train run --shards data/wiki_128 --batch-size 16
      berttrain eval --run runs/mini --json
    """


@main.command()
@click_options(TrainConfig)
@quiet_option
@click.pass_context
def run(ctx, quiet, **options):
    """Train a BERT on shards; write config, metrics and checkpoints to a run directory.

    With --resume, the run's saved options apply, except those given again on this command line; it continues
    from the newest checkpoint whose files all match their recorded sha256. SIGTERM or Ctrl-C finishes the step,
    saves a checkpoint, prints the command that resumes it and exits 143 or 130; a second one stops at once.

    \b
    Example:
      berttrain run --shards data/wiki_128 --size mini --steps 2000 --run-dir runs/mini
      berttrain run --run-dir runs/mini --resume --steps 4000
      berttrain run --shards data/wiki_512 --init-from runs/mini --run-dir runs/mini-512
    """
    from train.evaluate import format_eval
    from train.loop import run as run_training
    from train.preempt import Preempted
    from train.rundir import load_run_config

    config = TrainConfig(**options)  # checks the flags as given, before anything is read
    if config.resume:
        saved = load_run_config(Path(config.run_dir))
        given = {name: value for name, value in options.items()
                 if ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, None)}
        config = saved.replace(force=False, init_from=None, **given)
    elif not config.shards:
        raise click.UsageError("pass --shards DIR (a dataset made by `bertprep shard`)")
    try:
        summary = run_training(config, progress=not quiet)
    except Preempted as stop:  # the loop has saved and said how to resume
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # At once, without the interpreter's finalisation: torchrun sends SIGTERM to the processes still alive
            # when the first one exits, and they would die by it instead of exiting 143 too.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(stop.exit_status)
        ctx.exit(stop.exit_status)
    if summary is None:  # not rank 0
        return
    line = f"run {summary['run_dir']}: {summary['step']} steps"
    line += f", loss {summary['loss']:.4f}" if summary["loss"] is not None else " (nothing left to train: raise --steps)"
    if summary["nonfinite_steps"]:
        line += f", {summary['nonfinite_steps']} non-finite steps skipped"
    click.echo(line)
    if summary.get("eval"):
        click.echo(format_eval(summary["eval"], prefix="val"))
    if "overfit" in summary:
        overfit = summary["overfit"]
        click.echo(overfit_verdict(overfit["first_loss"], overfit["final_loss"], summary["step"]))


@main.command(name="eval")
@click.option("--run", "run_dir", type=click.Path(path_type=Path), required=True, help="Run directory.")
@click.option("--shards", type=click.Path(path_type=Path), help="Dataset [default: the run's].")
@click.option("--split", default="val", show_default=True, help="Split of the dataset to score.")
@click.option("--checkpoint", type=click.Path(path_type=Path), help="Checkpoint directory [default: the latest].")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--rows", "max_rows", type=int, help="Score only the first N rows.")
@click.option("--samples", type=int, default=0, show_default=True, help="Rows to print with predictions.")
@eval_device_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def eval_command(run_dir, shards, split, checkpoint, batch_size, max_rows, samples, device, precision, as_json):
    """Masked-LM loss, perplexity and accuracy of a run's weights on a split.

    \b
    Example:
      berttrain eval --run runs/mini
      berttrain eval --run runs/mini --checkpoint runs/mini/checkpoints/step-00001000 --json
    """
    from train.evaluate import eval_run, format_eval

    if batch_size < 1:
        raise click.UsageError("--batch-size must be at least 1")
    result = eval_run(run_dir, shards=shards, split=split, checkpoint=checkpoint, batch_size=batch_size,
                      max_rows=max_rows, device=device, precision=precision, samples=samples)
    if as_json:
        click.echo(json.dumps({k: v for k, v in result.items() if k != "samples"}))
        return
    click.echo(f"{result['checkpoint']} (step {result['step']}) on {result['shards']} {split}:")
    click.echo(format_eval(result))
    for sample in result.get("samples", []):
        click.echo(sample)


def source_options(f):
    """--run, --checkpoint and --vocab: which weights, with which vocabulary."""
    f = click.option("--vocab", type=click.Path(path_type=Path),
                     help="The run's vocab.txt, when its shards have moved [default: the shards' vocab.txt].")(f)
    f = click.option("--checkpoint", type=click.Path(path_type=Path),
                     help="A checkpoint directory of the run [default: the latest].")(f)
    return click.option("--run", "source", type=click.Path(path_type=Path), required=True,
                        help="Run directory, checkpoint directory, or Hugging Face BERT directory.")(f)


@main.command()
@source_options
@click.argument("texts", nargs=-1)
@click.option("--file", "text_file", type=click.Path(path_type=Path, dir_okay=False),
              help="Texts to fill in, one a line.")
@click.option("-k", "--top-k", type=int, default=5, show_default=True, help="Candidates per [MASK].")
@click.option("--json", "as_json", is_flag=True, help="One JSON object a text, with every candidate's id.")
@click.option("--html", "html_out", type=click.Path(path_type=Path, dir_okay=False),
              help="Instead of texts: score shard rows and write this HTML page.")
@click.option("--shards", type=click.Path(path_type=Path), help="With --html: dataset [default: the run's].")
@click.option("--split", default="val", show_default=True, help="With --html: split of the dataset.")
@click.option("-n", "--rows", type=int, default=20, show_default=True, help="With --html: rows to show.")
@click.option("--start", type=int, default=0, show_default=True, help="With --html: first row.")
@device_option
def predict(source, checkpoint, vocab, texts, text_file, top_k, as_json, html_out, shards, split, rows, start,
            device):
    """Fill in [MASK]s with a trained model: top-k tokens and probabilities.

    Every [MASK] (in capitals) in a text gets the k most likely tokens, with probabilities from the full softmax.
    With --html, scores rows of the shards instead and writes a page that colours every masked token by whether the
    model got it right, its guess beside the truth, the probability on hover.

    \b
    Example:
      berttrain predict --run runs/mini "the cat sat on the [MASK] ."
      berttrain predict --run runs/mini -k 3 --json --file sentences.txt
      berttrain predict --run runs/mini --html preds.html --split val -n 20
    """
    from prep.shards import open_dataset
    from train.pretrained import load_pretrained
    from train.runtime import resolve_device
    from train.sources import check_dataset
    from train.predict import Predictor, format_fill, write_shard_html

    if html_out is not None and (texts or text_file):
        raise click.UsageError("--html scores shard rows: drop the texts and --file, or drop --html")
    if html_out is None and shards is not None:
        raise click.UsageError("--shards goes with --html")
    pretrained = load_pretrained(source, checkpoint, vocab)
    predictor = Predictor.load(pretrained, resolve_device(device))
    if html_out is not None:
        shards = shards or pretrained.shards
        if shards is None:
            raise BertError(f"{pretrained.source} does not record its shards: pass --shards")
        dataset = open_dataset(shards)
        check_dataset(dataset, pretrained.config, predictor.vocab.sha256, pretrained.source)
        result = write_shard_html(predictor, dataset.split(split), html_out, rows, start)
        click.echo(f"wrote {html_out}: {result['rows']} {split} rows, {result['correct']} of {result['masked']} "
                   f"masked tokens right ({result['accuracy']:.1%})")
        return
    lines = list(texts)
    if text_file is not None:
        lines += [line for line in text_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise click.UsageError('give texts with [MASK], e.g. "the cat sat on the [MASK] .", or --file')
    for result in predictor.fill_masks(lines, top_k):
        if as_json:
            click.echo(json.dumps({"text": result["text"], "masks": result["masks"]}, ensure_ascii=False))
        else:
            click.echo(format_fill(result))


@main.command()
@source_options
@click.option("--hf", "out_dir", type=click.Path(path_type=Path), required=True,
              help="Directory to write for transformers.")
@click.option("--format", "weights_format", type=click.Choice(["auto", "safetensors", "pytorch"]), default="auto",
              show_default=True, help="Weights file; auto = safetensors when installed, else pytorch_model.bin.")
@click.option("--force", is_flag=True, help="Replace an existing --hf directory.")
def export(source, checkpoint, vocab, out_dir, weights_format, force):
    """Write a run's weights as a Hugging Face BERT directory that transformers opens with no code of ours.

    config.json (BertForMaskedLM, or BertForPreTraining with the NSP head), the weights, vocab.txt,
    tokenizer_config.json (casing, model_max_length), special_tokens_map.json and tokenizer.json. Pre-LN runs have
    no transformers equivalent and are refused.

    \b
    Example:
      berttrain export --run runs/mini --hf exports/mini
      python -c "from transformers import pipeline; print(pipeline('fill-mask', 'exports/mini')('the [MASK] sat'))"
    """
    from train.hf.export import export_hf

    with sole_writer(out_dir, "--hf"):
        record = export_hf(source, out_dir, checkpoint, vocab, weights_format, force)
    click.echo(f"wrote {record['out_dir']}: {record['architecture']}, {record['tensors']} tensors "
               f"({record['parameters'] / 1e6:.2f}M parameters) from {record['source']}, "
               f"{'lowercase' if record['lowercase'] else 'cased'} vocabulary, model_max_length "
               f"{record['model_max_length']}")
    click.echo(f"files: {', '.join(record['files'])}")


@main.command()
@click_options(FinetuneConfig, required=("source", "train", "out_dir"))
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def finetune(quiet, **options):
    """Fine-tune a pretrained BERT for sequence classification on local files.

    TSV (GLUE/SST-2 style: header, tab-separated), CSV or JSON Lines, one example a row; sentence pairs with
    --text-a/--text-b. Tokenizes with the run's vocabulary. Prints accuracy and macro-F1 on --val every epoch, keeps
    the best epoch's model, scores --test with it and labels --predict.

    \b
    Example:
      berttrain finetune --run runs/mini --train sst2/train.tsv --val sst2/dev.tsv --out runs/mini-sst2
      berttrain finetune --run runs/mini --from-scratch --train sst2/train.tsv --val sst2/dev.tsv --out runs/scratch
      berttrain finetune --run exports/mini --train pairs.jsonl --text-a premise --text-b hypothesis --out runs/nli
    """
    from train.finetune import finetune as run_finetune, format_epoch

    config = FinetuneConfig(**options)
    with sole_writer(Path(config.out_dir), "--out"):
        summary = run_finetune(config, progress=not quiet)
    best = summary["best"]
    click.echo(f"best epoch {summary['best_epoch']} of {len(summary['epochs'])}: {format_epoch(best)}")
    if "test" in summary:
        t = summary["test"]
        click.echo(f"test: loss {t['loss']:.4f}  acc {t['acc']:.4f}  macro-F1 {t['macro_f1']:.4f}")
    if "predictions_file" in summary:
        click.echo(f"labelled {summary['predictions']} examples: {summary['predictions_file']}")
    click.echo(f"saved {summary['out_dir']}")


@main.command()
@click.option("--run", "run_dir", type=click.Path(path_type=Path), required=True, help="Run directory.")
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False),
              help="File to write [default: RUN/report.html, or RUN/report.png with --png].")
@click.option("--png", is_flag=True, help="Charts as one PNG image (needs matplotlib).")
@click.option("--samples", type=int, default=8, show_default=True,
              help="Validation rows with the latest checkpoint's predictions; 0 = none.")
@device_option
def report(run_dir, out, png, samples, device):
    """Write a one-page training report: loss, accuracy and learning-rate curves, tokens/s, data wait, and sample
    predictions.

    The HTML report draws its charts as inline SVG and needs no extra package; --png needs matplotlib
    (pip install matplotlib).

    \b
    Example:
      berttrain report --run runs/mini
      berttrain report --run runs/mini --png --out mini.png
    """
    from train.runtime import resolve_device
    from train.report import write_report

    if samples < 0:
        raise click.UsageError("--samples must be 0 or more")
    path = write_report(run_dir, out, png=png, samples=samples, device=str(resolve_device(device)))
    click.echo(f"wrote {path}")


@main.command()
@click.option("--run", "run_dir", type=click.Path(path_type=Path), required=True,
              help="Run directory (or one checkpoint directory).")
def verify(run_dir):
    """Re-hash every checkpoint of a run against its COMPLETE marker; exit status 1 if one is damaged.

    Prints one line per checkpoint: ok, damaged (with the file and what is wrong) or incomplete (a save that was
    interrupted, which nothing reads). Commands that take a run's newest checkpoint skip damaged ones.

    \b
    Example:
      berttrain verify --run runs/mini
    """
    from train.checkpoint import verify_run

    found = verify_run(run_dir)
    if not found:
        raise BertError(f"--run {run_dir}: no checkpoints to verify")
    for entry in found:
        line = f"{entry['status']:<10} {entry['checkpoint']}"
        if entry["reason"]:
            line += f": {entry['reason']}"
        elif not entry["listed"]:
            line += " (an older marker without sizes and hashes: torch CRCs and JSON checked)"
        click.echo(line)
    damaged = [entry for entry in found if entry["status"] == "damaged"]
    if damaged:
        raise BertError(f"{len(damaged)} of {len(found)} checkpoints of {run_dir} are damaged; --resume and the "
                        f"other commands skip them")
