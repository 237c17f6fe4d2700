"""`berttrain`: the command line of the training half. Parses options, calls the work functions, prints."""

from __future__ import annotations

import json
from pathlib import Path

import click
from click.core import ParameterSource

from prep.cli import ErrorHandlingGroup, quiet_option


class _Group(ErrorHandlingGroup):
    interrupted_message = "interrupted: continue from the last checkpoint with --resume"


def device_options(f, precision_default: str | None = "auto"):
    precision_help = "bf16/fp16 autocast; auto = bf16 where the device has it, else fp32."
    if precision_default is None:
        precision_help += " [default: the run's, so that its own evaluations are reproduced]"
    f = click.option("--precision", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default=precision_default,
                     show_default=precision_default is not None, help=precision_help)(f)
    return click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
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


# Options of `run` that are TrainConfig fields of the same name.
_RUN_FIELDS = ("shards", "run_dir", "size", "layers", "hidden", "heads", "ffn", "dropout", "norm", "max_positions",
               "masking", "batch_size", "grad_accum", "steps", "epochs", "lr", "min_lr", "warmup", "schedule",
               "weight_decay", "grad_clip", "precision", "compile", "seed", "device", "eval_every", "eval_rows",
               "log_every", "save_every", "keep_last", "overfit_batch", "max_nonfinite", "resume", "force",
               "init_from")

# Flags that cannot be used together, and why.
_CONFLICTS = (
    ("steps", "epochs", "both say how long to train: pass one of them"),
    ("resume", "force", "contradict each other: --resume continues the run, --force replaces it"),
    ("resume", "init_from", "contradict each other: --resume restores everything from the run itself"),
    ("overfit_batch", "masking", "contradict each other: --overfit-batch needs the same masks every step"),
)


def _flag(name: str) -> str:
    return name.replace("_", "-")


@main.command()
@click.option("--shards", type=click.Path(path_type=str), help="Dataset directory made by `bertprep shard`.")
@click.option("--run-dir", type=click.Path(path_type=str), help="Run directory (default: a new runs/run<N>).")
@click.option("--size", type=click.Choice(["tiny", "mini", "small", "medium", "base", "large"]), default="small",
              show_default=True, help="Named model size.")
@click.option("--layers", type=int, help="Encoder layers (overrides --size).")
@click.option("--hidden", type=int, help="Hidden width (overrides --size).")
@click.option("--heads", type=int, help="Attention heads (default hidden / 64).")
@click.option("--ffn", type=int, help="Feed-forward width (default 4 x hidden).")
@click.option("--dropout", type=float, help="Dropout [default: 0.1, or 0 with --overfit-batch].")
@click.option("--norm", type=click.Choice(["post", "pre"]), default="post", show_default=True,
              help="LayerNorm after (BERT) or before each block.")
@click.option("--max-positions", type=int, help="Position table size [default: 512, or the shards' max_len].")
@click.option("--masking", type=click.Choice(["static", "dynamic"]), default="static", show_default=True,
              help="static: the shards' masks; dynamic: fresh masks on the device every step.")
@click.option("--batch-size", type=int, default=32, show_default=True, help="Rows per process per micro-step.")
@click.option("--grad-accum", type=int, default=1, show_default=True, help="Micro-steps per optimizer step.")
@click.option("--steps", type=int, help="Optimizer steps [default: one epoch].")
@click.option("--epochs", type=float, help="Passes over the training rows, instead of --steps.")
@click.option("--lr", type=float, help="Peak learning rate [default: by --size and --norm].")
@click.option("--min-lr", type=float, help="Final learning rate [default: lr / 10].")
@click.option("--warmup", type=int, help="Warm-up steps [default: 6% of the steps, at most 10,000].")
@click.option("--schedule", type=click.Choice(["linear", "cosine"]), default="linear", show_default=True,
              help="Decay after warm-up.")
@click.option("--weight-decay", type=float, default=0.01, show_default=True)
@click.option("--grad-clip", type=float, default=1.0, show_default=True, help="Max gradient norm; 0 = off.")
@device_options
@click.option("--compile", is_flag=True, help="torch.compile the model.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--eval-every", type=int, default=500, show_default=True,
              help="Validate every N steps and at the end; 0 = never.")
@click.option("--eval-rows", type=int, default=4096, show_default=True, help="Validation rows per evaluation.")
@click.option("--log-every", type=int, default=10, show_default=True, help="Metrics record every N steps.")
@click.option("--save-every", type=int, default=1000, show_default=True,
              help="Checkpoint every N steps and at the end; 0 = only at the end.")
@click.option("--keep-last", type=int, default=3, show_default=True, help="Checkpoints kept besides the best.")
@click.option("--overfit-batch", is_flag=True, help="Train on one batch; report whether the loss reaches ~0.")
@click.option("--max-nonfinite", type=int, default=5, show_default=True,
              help="Stop after this many non-finite losses in a row.")
@click.option("--resume", is_flag=True, help="Continue --run-dir from its latest checkpoint.")
@click.option("--force", is_flag=True, help="Replace an existing --run-dir.")
@click.option("--init-from", type=click.Path(path_type=str), help="Start from the weights of a run or checkpoint.")
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
    from train.config import TrainConfig
    from train.evaluate import format_eval
    from train.loop import run as run_training
    from train.rundir import load_run_config

    for first, second, why in _CONFLICTS:
        if options[first] and options[second] not in (None, False, "static"):
            raise click.UsageError(f"--{_flag(first)} and --{_flag(second)} {why}")
    if options["resume"]:
        if not options["run_dir"]:
            raise click.UsageError("--resume needs the run to continue: pass --run-dir DIR")
        given = {name: options[name] for name in _RUN_FIELDS
                 if ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, None)}
        config = load_run_config(Path(options["run_dir"])).replace(force=False, init_from=None, **given)
    else:
        if not options["shards"]:
            raise click.UsageError("pass --shards DIR (a dataset made by `bertprep shard`)")
        config = TrainConfig(**{name: options[name] for name in _RUN_FIELDS})
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
        o = summary["overfit"]
        click.echo(f"overfit-batch: loss {o['first_loss']:.4f} -> {o['final_loss']:.4f}: "
                   + ("reached ~0" if o["reached_zero"] else "did NOT reach ~0"))


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
