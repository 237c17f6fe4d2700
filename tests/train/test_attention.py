"""Attention on a CPU: bf16 through two matmuls and a softmax (faster there than either fused kernel), fp32
through the fused kernel; either way the dtype of v comes back, and masks, scale and gradients are those of
`scaled_dot_product_attention`."""

import pytest
import torch
import torch.nn.functional as F

from train.attention import attention, key_mask


def _inputs(dtype):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 40, 16, dtype=dtype) for _ in range(3))
    distance = (torch.arange(40)[:, None] - torch.arange(40)[None, :]).abs()
    attn_mask = (distance <= 8)[None, None] & (torch.arange(40) < 33)[None, None, None, :]
    return q, k, v, attn_mask


def test_fp32_is_the_fused_kernel_exactly():
    q, k, v, attn_mask = _inputs(torch.float32)
    assert torch.equal(attention(q, k, v, attn_mask), F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask))


@pytest.mark.parametrize("masked", [True, False])
def test_bf16_matches_fp32_attention_within_bf16_rounding(masked):
    q, k, v, attn_mask = _inputs(torch.bfloat16)
    attn_mask = attn_mask if masked else None
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = attention(q, k, v, attn_mask)
        rotated = attention(q.float(), k.float(), v, attn_mask)  # q and k are cast to v's dtype
    assert got.dtype == rotated.dtype == torch.bfloat16
    assert torch.equal(got, rotated)
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)
    assert (got.float() - want).abs().max() > 0  # computed in bf16, not in fp32


def test_a_masked_key_gets_no_weight():
    q, k, v, attn_mask = _inputs(torch.bfloat16)
    changed = v.clone()
    changed[:, :, 35:] = 100.0  # keys 33.. are padding for every query
    assert torch.equal(attention(q, k, v, attn_mask), attention(q, k, changed, attn_mask))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gradients_match_the_fused_kernels_in_the_inputs_dtype(dtype):
    q, k, v, attn_mask = _inputs(dtype)
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    reference = [t.float().clone().requires_grad_() for t in (q, k, v)]
    grad_out = torch.randn(2, 4, 40, 16)
    attention(*inputs, attn_mask).float().backward(grad_out)
    F.scaled_dot_product_attention(*reference, attn_mask=attn_mask).backward(grad_out)
    for got, want in zip(inputs, reference):
        assert got.grad.dtype == dtype
        tolerance = 1e-5 if dtype == torch.float32 else 5e-2
        torch.testing.assert_close(got.grad.float(), want.grad, atol=tolerance, rtol=tolerance)


def test_a_batch_without_padding_needs_no_key_mask():
    real = torch.ones(3, 10, dtype=torch.long)
    assert key_mask(real) is None
    real[1, 7:] = 0
    mask = key_mask(real)
    assert mask.shape == (3, 1, 1, 10) and mask.dtype == torch.bool
    assert torch.equal(mask[:, 0, 0], real.bool())
