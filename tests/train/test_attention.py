"""On a CPU attention runs in float32 whatever autocast says, and hands back v's dtype."""

import torch
import torch.nn.functional as F

from train.attention import attention


def test_cpu_attention_is_float32_sdpa_under_bf16_autocast():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 40, 16).to(torch.bfloat16) for _ in range(3))
    distance = (torch.arange(40)[:, None] - torch.arange(40)[None, :]).abs()
    attn_mask = (distance <= 8)[None, None] & (torch.arange(40) < 33)[None, None, None, :]
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_mask).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = attention(q, k, v, attn_mask)
        rotated = attention(q.float(), k.float(), v, attn_mask)  # RoPE hands over float32 q and k
    assert got.dtype == rotated.dtype == torch.bfloat16
    assert torch.equal(got, want) and torch.equal(rotated, want)
    assert not torch.equal(F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask), want)  # bf16 differs


def test_gradients_reach_bf16_inputs_in_their_dtype():
    q, k, v = (torch.randn(1, 2, 8, 4, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    attention(q, k, v, None).float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.bfloat16 for t in (q, k, v))
