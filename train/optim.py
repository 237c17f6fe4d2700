"""AdamW with BERT's parameter groups and the kernel that is fastest on the device."""

from __future__ import annotations

import torch
from torch import nn

BETAS = (0.9, 0.98)
EPS = 1e-6


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups of the trainable parameters: weight decay on matrices (and embeddings), none on biases and
    LayerNorm parameters."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float] = BETAS,
                   eps: float = EPS) -> torch.optim.AdamW:
    groups = param_groups(model, weight_decay)
    kernel = "fused" if fused_adamw_is_fast(next(model.parameters()).device) else "foreach"
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **{kernel: True})


def fused_adamw_is_fast(device: torch.device) -> bool:
    """The fused AdamW kernel wins on CUDA and on AVX-512 CPUs; on an AVX2-only CPU (torch 2.13) foreach wins by far
    (docs/benchmarks.md)."""
    return device.type == "cuda" or (device.type == "cpu"
                                     and torch.backends.cpu.get_cpu_capability().startswith("AVX512"))
