"""Scaled dot-product attention for both architectures, in the precision each device computes it fastest.

On a CPU the fused bf16 kernel loses to fp32 at our sizes (its backward ran 2.2x slower at 32 x 4 heads x 128
tokens x 64 on a 2-core EPYC with native bf16), so a CPU's fused path attends in fp32 whatever autocast says.
Dropout needs the unfused path (two matmuls and a softmax), where bf16 matmuls win, so it keeps autocast's dtype, as
other devices do everywhere: their flash kernels are built for it. The output has v's dtype either way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from train.dropout import dropout


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
              dropout_p: float = 0.0) -> torch.Tensor:
    """q, k, v [B, heads, L, D]; attn_mask bool broadcastable to [B, 1, L, L], true where a query may see a key.

    Returns [B, heads, L, D] in v's dtype (q and k may be float32, as rotated by RoPE). Dropout on the
    probabilities when dropout_p > 0.
    """
    if q.device.type != "cpu" or dropout_p:
        q, k = q.to(v.dtype), k.to(v.dtype)  # RoPE's float32; a no-op under CUDA's autocast, which casts all three
        if q.device.type == "cpu":
            return _attention_with_dropout(q, k, v, attn_mask, dropout_p)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
    with torch.autocast("cpu", enabled=False):
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_mask)
    return out.to(v.dtype)


def _attention_with_dropout(q, k, v, attn_mask: torch.Tensor | None, dropout_p: float) -> torch.Tensor:
    """What `scaled_dot_product_attention` computes on a CPU when it must drop out (its fused CPU kernel cannot, so
    it takes this same unfused path), with the dropout mask drawn by `train.dropout`."""
    scores = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    return dropout(scores.softmax(-1), dropout_p, True).to(v.dtype) @ v
