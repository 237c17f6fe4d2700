"""The commands that use what was trained: `berttrain predict | export | finetune | report`.

`register(group)` adds them to the `berttrain` group; each parses options, calls a work function, prints.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from prep.errors import BertError
from train.finetune import FinetuneConfig
from train.options import click_options


def source_options(f):
    """--run, --checkpoint and --vocab: which weights, with which vocabulary."""
    f = click.option("--vocab", type=click.Path(path_type=Path),
                     help="The run's vocab.txt, when its shards have moved [default: the shards' vocab.txt].")(f)
    f = click.option("--checkpoint", type=click.Path(path_type=Path),
                     help="A checkpoint directory of the run [default: the latest].")(f)
    return click.option("--run", "source", type=click.Path(path_type=Path), required=True,
                        help="Run directory, checkpoint directory, or Hugging Face BERT directory.")(f)


def device_option(f):
    return click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
                        help="auto = CUDA when present.")(f)


@click.command()
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


@click.command()
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

    record = export_hf(source, out_dir, checkpoint, vocab, weights_format, force)
    click.echo(f"wrote {record['out_dir']}: {record['architecture']}, {record['tensors']} tensors "
               f"({record['parameters'] / 1e6:.2f}M parameters) from {record['source']}, "
               f"{'lowercase' if record['lowercase'] else 'cased'} vocabulary, model_max_length "
               f"{record['model_max_length']}")
    click.echo(f"files: {', '.join(record['files'])}")


@click.command()
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
    summary = run_finetune(config, progress=not quiet)
    best = summary["best"]
    click.echo(f"best epoch {summary['best_epoch']} of {len(summary['epochs'])}: {format_epoch(best)}")
    if "test" in summary:
        t = summary["test"]
        click.echo(f"test: loss {t['loss']:.4f}  acc {t['acc']:.4f}  macro-F1 {t['macro_f1']:.4f}")
    if "predictions_file" in summary:
        click.echo(f"labelled {summary['predictions']} examples: {summary['predictions_file']}")
    click.echo(f"saved {summary['out_dir']}")


@click.command()
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


def register(group: click.Group) -> None:
    """Adds predict, export, finetune and report to the `berttrain` group."""
    for command in (predict, export, finetune, report):
        group.add_command(command)
