"""The learning-rate plan: linear warm-up, then linear or cosine decay. Pretraining and fine-tuning share it."""

from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULES = ("linear", "cosine")


def lr_at(step: int, peak_lr: float, final_lr: float, warmup: int, steps: int, schedule: str = "linear") -> float:
    """Learning rate of the step with 0-based index `step` of `steps`: linear warm-up to `peak_lr` over `warmup`
    steps, then a linear or cosine decay that reaches `final_lr` at the last step."""
    if step < warmup:
        return peak_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    if schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        shape = 1.0 - progress
    return final_lr + (peak_lr - final_lr) * shape


@dataclass(frozen=True)
class Plan:
    """The derived numbers of a run, printed at start and saved in config.json."""

    steps: int
    warmup: int
    peak_lr: float
    final_lr: float
    schedule: str
    steps_per_epoch: int
    global_rows: int
    tokens_per_step: int
    train_rows: int

    def lr_at(self, step: int) -> float:
        return lr_at(step, self.peak_lr, self.final_lr, self.warmup, self.steps, self.schedule)
