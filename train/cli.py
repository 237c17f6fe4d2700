"""`berttrain`: the command line of the training half. Parses options, calls the work functions, prints."""

from __future__ import annotations

import json
from pathlib import Path

import click
from click.core import ParameterSource

from prep.cli import ErrorHandlingGroup, quiet_option
from train.config import TrainConfig
from train.diagnose import overfit_verdict
from train.options import click_options
from train.runtime import DEVICES, PRECISIONS


class _Group(ErrorHandlingGroup):
    interrupted_message = "interrupted: continue from the last checkpoint with --resume"


def device_options(f, precision_default: str | None = "auto"):
    precision_help = "bf16/fp16 autocast; auto = bf16 where the device has it, else fp32."
    if precision_default is None:
        precision_help += " [default: the run's, so that its own evaluations are reproduced]"
    f = click.option("--precision", type=click.Choice(PRECISIONS), default=precision_default,
                     show_default=precision_default is not None, help=precision_help)(f)
    return click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True,
                        help="auto = CUDA when present.")(f)


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

    With --resume, the run's saved options apply, except those given again on this command line.

    \b
    Example:
      berttrain run --shards data/wiki_128 --size mini --steps 2000 --run-dir runs/mini
      berttrain run --run-dir runs/mini --resume --steps 4000
      berttrain run --shards data/wiki_512 --init-from runs/mini --run-dir runs/mini-512
    """
    from train.evaluate import format_eval
    from train.loop import run as run_training
    from train.rundir import load_run_config

    config = TrainConfig(**options)  # checks the flags as given, before anything is read
    if config.resume:
        saved = load_run_config(Path(config.run_dir))
        given = {name: value for name, value in options.items()
                 if ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, None)}
        config = saved.replace(force=False, init_from=None, **given)
    elif not config.shards:
        raise click.UsageError("pass --shards DIR (a dataset made by `bertprep shard`)")
    summary = run_training(config, progress=not quiet)
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


def _register_use_commands() -> None:
    """predict, export, finetune and report live beside the modules that do their work."""
    from train.commands_use import register

    register(main)


_register_use_commands()
