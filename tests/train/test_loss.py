"""The masked-LM loss by row blocks gives what `F.cross_entropy` gives: the same sum and, in the logits' dtype,
the same gradient (formed in the forward, scaled in the backward); ignored rows count for nothing, whatever their
logits."""

import pytest
import torch
import torch.nn.functional as F

from train import loss as loss_module
from train.loss import IGNORE_INDEX, MaskedLmLoss, masked_lm_loss_sum


def _logits_and_labels(rows=300, vocab=1000, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=gen) * 3).to(dtype)
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    labels[::5] = IGNORE_INDEX
    return logits, labels


def _reference(logits, labels):
    leaf = logits.detach().clone().requires_grad_()
    loss = F.cross_entropy(leaf.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    (loss * 0.37).backward()
    return loss.detach(), leaf.grad


def _ours(logits, labels):
    leaf = logits.detach().clone().requires_grad_()
    loss = masked_lm_loss_sum(leaf, labels)
    (loss * 0.37).backward()
    return loss.detach(), leaf.grad


@pytest.mark.parametrize("block_floats", [1 << 20, 7 * 1000, 999])  # one block; 7-row blocks, the last short; 1 row
def test_float32_logits_give_cross_entropy_exactly(monkeypatch, block_floats):
    monkeypatch.setattr(loss_module, "_BLOCK_FLOATS", block_floats)
    logits, labels = _logits_and_labels()
    (want, want_grad), (got, got_grad) = _reference(logits, labels), _ours(logits, labels)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-7)


def test_bf16_logits_give_the_gradient_autocast_would_in_bf16():
    logits, labels = _logits_and_labels(dtype=torch.bfloat16)
    (want, want_grad), (got, got_grad) = _reference(logits, labels), _ours(logits, labels)
    assert got_grad.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    # Ours rounds softmax - one_hot to bf16, then its product with the scale; the reference rounds that product
    # once. Each element is within two bf16 steps of it (the last bit of either rounding).
    difference = (got_grad.float() - want_grad.float()).abs()
    assert (difference <= 2 ** -6 * want_grad.float().abs()).all()
    assert difference.max() > 0  # rounded in bf16, not kept in float32


def test_ignored_rows_count_for_nothing():
    logits, labels = _logits_and_labels()
    loss, grad = _ours(logits, labels)
    ignored = labels == IGNORE_INDEX
    assert torch.equal(grad[ignored], torch.zeros_like(grad[ignored]))
    changed = logits.clone()
    changed[ignored] = 1e4  # would dominate the sum if an ignored row were counted
    assert _ours(changed, labels)[0] == loss
    assert _ours(logits, torch.full_like(labels, IGNORE_INDEX))[0] == 0


def test_forward_without_gradient_and_non_contiguous_logits():
    logits, labels = _logits_and_labels(vocab=1024)
    labels = torch.where(labels == IGNORE_INDEX, labels, labels % 1000)
    sliced = logits[:, :1000]  # the decoder's view without its padding columns
    want = F.cross_entropy(sliced, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    torch.testing.assert_close(MaskedLmLoss.apply(sliced, labels), want, rtol=1e-6, atol=0)


def test_a_second_backward_through_one_forward_is_refused():
    logits, labels = _logits_and_labels()
    loss = masked_lm_loss_sum(logits.requires_grad_(), labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward runs once per forward"):
        loss.backward()
