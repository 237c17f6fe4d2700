"""What a run says about itself: the banner printed at start and the record saved as config.json (every option,
the model, the shards, the derived numbers)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from train.model import count_parameters
from train.rundir import dataset_summary

if TYPE_CHECKING:
    from train.loop import Trainer


def run_record(trainer: Trainer) -> dict:
    """What config.json holds: every option, the model, the shards, the derived numbers."""
    return {
        "train": trainer.config.as_dict(),
        "model": trainer.model.config.as_dict(),
        "dataset": dataset_summary(trainer.dataset),
        "world_size": trainer.runtime.world_size,
        "precision": trainer.runtime.precision,
        "plan": trainer.plan.__dict__,
    }


def banner(trainer: Trainer, source: str, resumed: Path | None) -> list[str]:
    """The lines printed at start: where the run is, the model, the data, and the derived numbers."""
    plan, config, runtime, shape = trainer.plan, trainer.config, trainer.runtime, trainer.model.config
    copies = trainer.dataset.manifest["splits"]["train"].get("copies", 1)
    return [
        f"run        {trainer.run_dir}" + (f" (resumed at step {trainer.step} from {resumed.name})" if resumed else ""),
        f"model      {source}: {shape.summary()}, {count_parameters(trainer.model) / 1e6:.2f}M parameters",
        f"data       {trainer.dataset.path}: {plan.train_rows:,} train rows of {trainer.dataset.max_len} tokens"
        + (f" ({copies} masked copies)" if copies > 1 else "")
        + f", {trainer.val_split.rows if trainer.val_split else 0:,} val rows, masking {_masking(trainer)}",
        f"batch      {plan.global_rows} rows/step = {config.batch_size} x {config.grad_accum} accum x "
        f"{runtime.world_size} process(es); {plan.tokens_per_step:,} tokens/step",
        f"steps      {plan.steps:,} ({plan.steps / plan.steps_per_epoch:.2f} epochs of {plan.steps_per_epoch:,} "
        f"steps)" + (", one batch repeated (--overfit-batch)" if config.overfit_batch else ""),
        f"schedule   lr {plan.peak_lr:g}, warm-up {plan.warmup:,} steps, {plan.schedule} decay to {plan.final_lr:g}",
        f"device     {runtime.device} {runtime.precision}" + (", compiled" if config.compile else ""),
    ]


def _masking(trainer: Trainer) -> str:
    tables = trainer.mask_tables
    if tables is None or tables.mask_prob is None:
        return trainer.config.masking_mode
    return f"dynamic at {tables.mask_prob:.0%}"
