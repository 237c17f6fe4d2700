"""The masked-LM loss: summed cross-entropy of low-precision logits, computed in float32.

On a CPU, `F.cross_entropy(logits.float())` makes full-size float32 copies of the logits, their log-softmax and its
gradient, each larger than the cache at a few thousand slots x the vocabulary, and reads the logits again for the
backward. `MaskedLmLoss` works through row blocks that fit in the cache and forms the gradient (softmax - one_hot)
in the same pass as the loss, in the logits' dtype, as autocast's own cast would return it; backward only scales
it. Other devices keep the fused kernel.
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
    """Cross-entropy by row blocks; the forward keeps d(sum)/d(logits) when the logits need a gradient, and the
    backward scales it in place (so it runs once per forward, as a training step's does)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        rows = max(1, _BLOCK_FLOATS // logits.shape[1])
        counted = labels != IGNORE_INDEX
        targets = torch.where(counted, labels, 0)[:, None]
        weight = counted[:, None].float()
        log_norm = torch.empty(len(logits), 1, dtype=torch.float32, device=logits.device)
        grad = torch.empty_like(logits) if ctx.needs_input_grad[0] else None
        scratch = torch.empty(min(rows, len(logits)), logits.shape[1], dtype=torch.float32, device=logits.device)
        for start in range(0, len(logits), rows):
            block = slice(start, start + rows)
            exps = scratch[: len(logits[block])].copy_(logits[block])
            top = exps.amax(-1, keepdim=True)
            total = exps.sub_(top).exp_().sum(-1, keepdim=True)
            log_norm[block] = total.log().add_(top)
            if grad is not None:
                probs = exps.mul_(weight[block] / total)
                grad[block] = probs.scatter_add_(1, targets[block], -weight[block])
        ctx.grad = grad
        picked = logits.gather(1, targets).float()
        return ((log_norm - picked) * weight).sum()

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            raise RuntimeError("the masked-LM loss's gradient was used already: backward runs once per forward")
        return grad.mul_(grad_loss), None
