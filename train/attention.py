"""Scaled dot-product attention for both architectures, in the kernel each device computes it fastest with.

On a CPU, in bf16, two matmuls and a softmax beat both fused kernels at our lengths: forward and backward at 32
rows x 4 heads x 64 dims on a 2-core EPYC with native bf16 took 9 ms at 128 tokens (fused: 17 ms in fp32, 26 ms
in bf16) and 138 ms at 512 (235 / 220 ms). The price is memory: backward keeps the L x L probabilities, B x heads x
L^2 x 2 bytes a layer (200 MB for 32 rows of 512 tokens at 12 heads). CPU fp32 keeps the fused kernel unless it must
drop out, which it cannot do with our dropout masks; other devices always take the fused kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from train.dropout import dropout


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
              dropout_p: float = 0.0) -> torch.Tensor:
    """q, k, v [B, heads, L, D]; attn_mask bool broadcastable to [B, 1, L, L], true where a query may see a key.

    Computes in v's dtype (q and k are cast to it) and returns [B, heads, L, D] in it.
    Dropout on the probabilities when dropout_p > 0.
    """
    q, k = q.to(v.dtype), k.to(v.dtype)  # a no-op under CUDA's autocast, which casts all three
    if q.device.type == "cpu" and (dropout_p or v.dtype != torch.float32):
        return _unfused_attention(q, k, v, attn_mask, dropout_p)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)


def key_mask(attention_mask: torch.Tensor) -> torch.Tensor | None:
    """attention_mask [B, L] (true/1 = real token) as a key mask [B, 1, 1, L]; on a CPU None when every token is
    real, as in almost every batch of packed rows, so that masking is skipped (worth 4% of a CPU step). Other
    devices keep the mask: finding out would stall their queue of kernels (and break a compiled graph)."""
    if attention_mask.device.type == "cpu" and bool(attention_mask.all()):
        return None
    return attention_mask.bool()[:, None, None, :]


def _unfused_attention(q, k, v, attn_mask: torch.Tensor | None, dropout_p: float) -> torch.Tensor:
    """What `scaled_dot_product_attention` computes on a CPU when it takes its unfused path, with the dropout mask
    drawn by `train.dropout`. The scores are scaled and masked in place: nothing of them is kept for backward."""
    scores = (q @ k.transpose(-2, -1)).mul_(q.shape[-1] ** -0.5)
    if attn_mask is not None:
        scores.masked_fill_(~attn_mask, float("-inf"))
    return dropout(scores.softmax(-1), dropout_p, True) @ v
