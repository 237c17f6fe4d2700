"""Dropout whose CPU keep masks are drawn from random bits, several times faster than `bernoulli_`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_KEEP_BITS = 15  # resolution of a CPU keep mask's probability: 1/32768


def _keep_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """A CPU dropout mask for `x`: bool, true (kept) with probability 1 - p, to 1/32768.

    On a CPU, `bernoulli_` (what `F.dropout` and attention's dropout use) draws element by element and costs
    several times more than filling int64s with random bits and reading them as 16-bit lanes, 15 bits of each used.
    The bits come from torch's CPU generator, so the seed and a checkpoint's RNG state govern them as before.
    """
    count = x.numel()
    lanes = torch.empty((count + 3) // 4, dtype=torch.int64).random_().view(torch.int16)[:count].view(x.shape)
    return (lanes & ((1 << _KEEP_BITS) - 1)) >= round(p * (1 << _KEEP_BITS))


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """`F.dropout`, with the CPU's keep mask drawn by `_keep_mask`."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, True)
    return x * _keep_mask(x, p) * (1.0 / (1.0 - p))  # scaled after the mask: 1/(1-p) is not exact in bf16


class Dropout(nn.Dropout):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)
