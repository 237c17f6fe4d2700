"""The model: parity with Hugging Face BERT, the masked-positions-only head, vocabulary padding, and that it learns."""

import math

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from prep.errors import BertError  # noqa: E402
from train.hf.bert import from_hf_state_dict, hf_config_dict, to_hf_state_dict  # noqa: E402
from train.attention import attention  # noqa: E402
from train.dropout import dropout  # noqa: E402
from train.model import BertForPretraining, ModelConfig, count_parameters, flops_per_token  # noqa: E402

# 1000 is not a multiple of 64, so the padded-vocabulary path (1000 -> 1024 rows) is exercised.
VOCAB = 1000


def small_config(**overrides) -> ModelConfig:
    fields = dict(vocab_size=VOCAB, hidden=64, layers=2, heads=4, ffn=256, max_positions=64)
    fields.update(overrides)
    return ModelConfig(**fields)


def padded_batch(seed: int = 0, batch: int = 3, length: int = 24, predictions: int = 5):
    """Rows with [PAD] tails of different lengths, two segments, and masked positions inside the real tokens."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, VOCAB, (batch, length), generator=gen)
    lengths = [length, length - 7, length - 12]
    token_type_ids = torch.zeros(batch, length, dtype=torch.long)
    positions = torch.empty(batch, predictions, dtype=torch.long)
    for row, real in enumerate(lengths[:batch]):
        input_ids[row, real:] = 0
        token_type_ids[row, real // 2: real] = 1
        positions[row] = torch.randperm(real, generator=gen)[:predictions].sort().values
    return input_ids, token_type_ids, positions


def hf_model(config: ModelConfig, attn_implementation: str):
    hf_config = transformers.BertConfig(**hf_config_dict(config))
    cls = transformers.BertForPreTraining if config.nsp else transformers.BertForMaskedLM
    return cls._from_config(hf_config, attn_implementation=attn_implementation).eval()


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_logits_match_hugging_face_bert(attn_implementation):
    """Exported weights give transformers' BertForMaskedLM the same logits (1e-5, fp32) at the masked positions,
    with padding and two segments in the batch: the export is the model, not an approximation of it."""
    torch.manual_seed(0)
    config = small_config()
    ours = BertForPretraining(config).eval()
    theirs = hf_model(config, attn_implementation)
    theirs.load_state_dict(to_hf_state_dict(ours), strict=True)
    input_ids, token_type_ids, positions = padded_batch()

    with torch.no_grad():
        got = ours(input_ids.to(torch.uint16), positions, token_type_ids).mlm_logits
        full = theirs(input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=input_ids != 0).logits
    want = torch.gather(full, 1, positions[..., None].expand(-1, -1, VOCAB))
    assert got.shape == (3, 5, VOCAB)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_nsp_logits_match_hugging_face_bert_for_pretraining():
    """With --nsp the pooler and NSP classifier map onto BertForPreTraining, and both heads agree with it."""
    torch.manual_seed(1)
    config = small_config(nsp=True)
    ours = BertForPretraining(config).eval()
    theirs = hf_model(config, "sdpa")
    theirs.load_state_dict(to_hf_state_dict(ours), strict=True)
    input_ids, token_type_ids, positions = padded_batch(seed=1)

    with torch.no_grad():
        got = ours(input_ids, positions, token_type_ids)
        out = theirs(input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=input_ids != 0)
    want = torch.gather(out.prediction_logits, 1, positions[..., None].expand(-1, -1, VOCAB))
    torch.testing.assert_close(got.mlm_logits, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.nsp_logits, out.seq_relationship_logits, atol=1e-5, rtol=1e-5)


def test_hf_state_dict_round_trip_and_compiled_prefix():
    """from_hf(to_hf(model)) restores every tensor exactly, and `_orig_mod.` prefixes from torch.compile are
    stripped, so checkpoints of compiled runs export too."""
    torch.manual_seed(2)
    config = small_config()
    model = BertForPretraining(config)
    with torch.no_grad():
        # Padded rows are zero after a round trip (they are cut off on export), so start from zero to compare.
        model.encoder.embeddings.word.weight[VOCAB:] = 0
        model.mlm_head.bias.normal_()
        model.mlm_head.bias[VOCAB:] = 0
    state = model.state_dict()
    compiled_style = {f"_orig_mod.{k}": v for k, v in state.items()}

    restored = from_hf_state_dict(to_hf_state_dict(compiled_style, config), config)
    assert restored.keys() == state.keys()
    for key, tensor in state.items():
        assert torch.equal(restored[key], tensor), key
    BertForPretraining(config).load_state_dict(restored, strict=True)


def test_export_refuses_unmapped_or_missing_weights():
    """Every weight must land under a transformers name: an extra or missing key, or a pre-LN model (which BERT
    cannot express), is an error rather than a silently incomplete export."""
    config = small_config()
    state = BertForPretraining(config).state_dict()
    with pytest.raises(BertError, match=r"unmapped \['extra.weight'\]"):
        to_hf_state_dict({**state, "extra.weight": torch.zeros(1)}, config)
    hf_state = to_hf_state_dict(state, config)
    del hf_state["bert.encoder.layer.1.output.dense.bias"]
    with pytest.raises(BertError, match="missing"):
        from_hf_state_dict(hf_state, config)
    with pytest.raises(BertError, match="--norm post"):
        to_hf_state_dict(BertForPretraining(small_config(norm="pre")))


def test_mlm_head_runs_only_at_masked_positions():
    """The head (and its vocab-sized decoder matmul) sees B*P gathered vectors, or only the N valid ones with
    mlm_valid, never all B*L: skipping unmasked tokens is where the head's speed comes from."""
    torch.manual_seed(3)
    model = BertForPretraining(small_config()).eval()
    seen = []
    model.mlm_head.register_forward_hook(lambda module, args, out: seen.append((args[0].shape, out.shape)))
    input_ids, token_type_ids, positions = padded_batch()
    valid = torch.ones_like(positions, dtype=torch.bool)
    valid[1, 3:] = False

    with torch.no_grad():
        dense = model(input_ids, positions, token_type_ids).mlm_logits
        packed = model(input_ids, positions, token_type_ids, mlm_valid=valid).mlm_logits
    assert seen == [((3, 5, 64), (3, 5, VOCAB)), ((13, 64), (13, VOCAB))]
    torch.testing.assert_close(packed, dense[valid])
    torch.testing.assert_close(model.logits(input_ids, positions, token_type_ids), dense)


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_last_layer_at_positions_gives_the_full_runs_vectors_and_gradients(norm):
    """Asking the encoder for some positions runs its last layer at those alone, and gives the full run's vectors
    there (positions in padding and repeated ones included) and the same gradient for every encoder weight."""
    torch.manual_seed(4)
    model = BertForPretraining(small_config(norm=norm)).eval()  # no dropout, whose draws follow the shapes
    input_ids, token_type_ids, _ = padded_batch(seed=4)
    positions = torch.tensor([[0, 23, 5, 5, 12], [0, 16, 17, 20, 23], [1, 2, 11, 12, 0]])
    index = positions[..., None].expand(-1, -1, 64)
    weights = torch.randn(3, 5, 64)
    results = []
    for asked in (True, False):
        model.zero_grad()
        hidden = model.encoder(input_ids, token_type_ids, positions=positions.to(torch.int32)) if asked \
            else torch.gather(model.encoder(input_ids, token_type_ids), 1, index)
        (hidden * weights).sum().backward()
        results.append((hidden.detach(), {name: p.grad.clone() for name, p in model.encoder.named_parameters()}))
    (picked, grads), (full, full_grads) = results
    torch.testing.assert_close(picked, full, atol=1e-5, rtol=1e-5)
    assert grads.keys() == full_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, full_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_padded_vocab_rows_get_zero_probability():
    """The matrix has 1024 rows for speed but logits cover only the 1000 real ids, so sampling or argmax can
    never produce an id outside the vocabulary, even if a padded row's weights are large."""
    torch.manual_seed(4)
    config = small_config()
    model = BertForPretraining(config).eval()
    assert model.encoder.embeddings.word.weight.shape[0] == config.padded_vocab_size == 1024
    with torch.no_grad():
        model.encoder.embeddings.word.weight[VOCAB:] = 100.0
        model.mlm_head.bias[VOCAB:] = 1e4
    input_ids, token_type_ids, _ = padded_batch()
    logits = model.logits(input_ids, token_type_ids=token_type_ids)
    assert logits.shape == (3, 24, VOCAB)
    torch.testing.assert_close(logits.softmax(-1).sum(-1), torch.ones(3, 24))
    assert ModelConfig(vocab_size=30522, hidden=64, layers=1, heads=1, ffn=64).padded_vocab_size == 30528


def test_tiny_pre_ln_overfits_one_batch():
    """A tiny pre-LN model with NSP drives the loss on one fixed batch to near zero: gradients reach every part
    of the model and the heads are wired to the right targets."""
    torch.manual_seed(5)
    config = ModelConfig.from_size("tiny", VOCAB, norm="pre", nsp=True, dropout=0.0, attention_dropout=0.0,
                                   max_positions=64)
    model = BertForPretraining(config).train()
    input_ids, token_type_ids, positions = padded_batch(seed=5, length=32, predictions=6)
    labels = torch.gather(input_ids, 1, positions)
    input_ids = input_ids.scatter(1, positions, 3)  # 3 plays [MASK]
    nsp_labels = torch.tensor([0, 1, 1])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

    for _ in range(150):
        out = model(input_ids, positions, token_type_ids)
        loss = F.cross_entropy(out.mlm_logits.flatten(0, 1), labels.flatten()) + F.cross_entropy(
            out.nsp_logits, nsp_labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05


def test_named_sizes_and_config_round_trip():
    """Named sizes follow heads = H/64, ffn = 4H; a config saved with as_dict reads back equal; a bad flag value
    is a BertError naming the flag."""
    base = ModelConfig.from_size("base", 30522)
    assert (base.layers, base.hidden, base.heads, base.ffn) == (12, 768, 12, 3072)
    with torch.device("meta"):  # counts shapes without spending seconds on initialisation
        assert 109e6 < count_parameters(BertForPretraining(base)) < 111e6  # BERT-base has 110M
    narrow = ModelConfig.from_size("small", 1000, hidden=256)
    assert (narrow.layers, narrow.heads, narrow.ffn) == (4, 4, 1024)
    assert ModelConfig.from_dict(narrow.as_dict()) == narrow
    assert flops_per_token(base, 128, predictions_per_row=20) < flops_per_token(base, 128)
    # The last layer asked at 20 of 128 tokens: its query, output, FFN and attention shrink to that share.
    saved = (1 - 20 / 128) * (6 * (2 * 768 * 768 + 2 * 768 * 3072) + 12 * 768 * 128)
    assert math.isclose(flops_per_token(base, 128, 20, sparse_last_layer=True),
                        flops_per_token(base, 128, 20) - saved)
    with pytest.raises(BertError, match="--size"):
        ModelConfig.from_size("huge", 1000)
    with pytest.raises(BertError, match=r"--heads \(5\) must divide --hidden \(64\)"):
        small_config(heads=5)
    with pytest.raises(BertError, match="--norm"):
        small_config(norm="sandwich")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_dropout_keeps_1_minus_p_scaled_and_follows_the_seed(dtype):
    p = 0.1
    x = torch.full((256, 4096), 2.0, dtype=dtype, requires_grad=True)
    torch.manual_seed(7)
    out = dropout(x, p, training=True)
    kept = out != 0
    assert out.dtype == dtype
    assert abs(kept.float().mean().item() - (1 - p)) < 0.002  # 1M draws: the standard error is 0.0003
    assert torch.equal(out[kept], (x.detach() / (1 - p))[kept])  # kept values scaled exactly as F.dropout does
    out.sum().backward()
    assert torch.equal(x.grad != 0, kept)  # the gradient flows through the kept elements only
    torch.manual_seed(7)
    assert torch.equal(dropout(x, p, training=True), out)
    assert not torch.equal(dropout(x, p, training=True), out)
    assert dropout(x, p, training=False) is x and dropout(x, 0.0, training=True) is x


def test_cpu_attention_dropout_is_unbiased_and_ignores_padded_keys():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 6, 8) for _ in range(3))
    attn_mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])[:, None, None, :]
    exact = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    draws = torch.stack([attention(q, k, v, attn_mask, 0.1) for _ in range(4000)])
    assert torch.allclose(draws.mean(0), exact, atol=0.03)
    assert (draws != exact).any()
    v_other = v.clone()
    v_other[1, :, 4:] = 100.0  # values behind padded keys must never leak in
    torch.manual_seed(1)
    first = attention(q, k, v, attn_mask, 0.1)
    torch.manual_seed(1)
    assert torch.equal(attention(q, k, v_other, attn_mask, 0.1)[1], first[1])
