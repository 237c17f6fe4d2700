"""The masked-LM loss: summed cross-entropy of low-precision logits, computed in float32.

On a CPU, `F.cross_entropy(logits.float())` makes full-size float32 copies of the logits, their log-softmax and its
gradient, each larger than the cache at a few thousand slots x the vocabulary. `MaskedLmLoss` works through
row blocks that fit in the cache and keeps only one float per row between forward and backward; its gradient
comes out in the logits' dtype, as autocast's own cast would return it. Other devices keep the fused kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
_BLOCK_FLOATS = 1 << 20  # a row block's float32 logits: 4 MB, within a CPU's L2 + L3 share


def masked_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over rows of -log softmax(logits)[label], in float32; logits [N, V] (any float dtype), labels [N] int64,
    IGNORE_INDEX where a row counts for nothing."""
    if logits.device.type != "cpu":
        return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return MaskedLmLoss.apply(logits, labels)


class MaskedLmLoss(torch.autograd.Function):
    """Cross-entropy by row blocks: forward keeps logsumexp per row; backward is softmax - one_hot, block by block."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        rows = max(1, _BLOCK_FLOATS // logits.shape[1])
        log_norm = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        for start in range(0, len(logits), rows):
            log_norm[start : start + rows] = torch.logsumexp(logits[start : start + rows].float(), dim=-1)
        counted = labels != IGNORE_INDEX
        targets = torch.where(counted, labels, 0)
        picked = logits.gather(1, targets[:, None])[:, 0].float()
        ctx.save_for_backward(logits, log_norm, targets, counted)
        ctx.rows = rows
        return ((log_norm - picked) * counted).sum()

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        logits, log_norm, targets, counted = ctx.saved_tensors
        rows = ctx.rows
        row_scale = grad_loss * counted
        grad = torch.empty_like(logits)
        for start in range(0, len(logits), rows):
            block = slice(start, start + rows)
            probs = (logits[block].float() - log_norm[block, None]).exp_()
            probs.scatter_add_(1, targets[block, None], torch.full_like(log_norm[block, None], -1.0))
            grad[block] = probs.mul_(row_scale[block, None])
        return grad, None
