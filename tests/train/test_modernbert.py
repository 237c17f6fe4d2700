"""ModernBERT: parity with transformers' ModernBertForMaskedLM both ways, its weight and config mapping, init,
config validation, and the BertForPretraining contract.

What transformers does that the parity tests pin down (modeling_modernbert.py, masking_utils.py, transformers 5):
- The sliding window is `config.sliding_window = local_attention // 2` tokens either side, inclusive: a query sees
  the keys with |q - k| <= local_attention // 2, i.e. local_attention + 1 of them. The `+ 1` on the attention
  module's `sliding_window` is for flash attention's bounds only; sdpa and eager get the window from the mask.
- Layer i is global when i % global_attn_every_n_layers == 0 (layer 0 first); its attn_norm is an Identity.
- The padding mask masks keys only: padded queries still attend (their outputs are garbage, never compared). A
  padded query farther than the window from every real key has no key at all; we add the diagonal so that it sees
  itself, which keeps every kernel finite (transformers' eager mask gives it uniform weights instead).
- norm_bias applies to every LayerNorm: embedding, layers, final_norm and the head's norm. The head's dense has
  classifier_bias (False), the decoder decoder_bias (True), tied to the token embeddings.
- RoPE: angles in fp32, cos/sin cast to the hidden states' dtype, the rotation itself in fp32; heads pair the
  first half of their dimensions with the second (rotate_half), not interleaved pairs.
- Init: truncated normals cut at 2 std; the tied matrix keeps the embedding's std 0.02 (the decoder's smaller std is
  never applied to it), and the [PAD] row is drawn like the others, not zeroed.
"""

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from prep.errors import BertError  # noqa: E402
from train.hf.modernbert import (  # noqa: E402
    HF_TIED_KEYS,
    config_from_hf,
    from_hf_state_dict,
    hf_config_dict,
    hf_names,
    to_hf_state_dict,
)
from train.model import flops_per_token as bert_flops_per_token  # noqa: E402
from train.model import ModelConfig, count_parameters  # noqa: E402
from train.modernbert import ModernBertConfig, ModernBertForPretraining, flops_per_token, glu_width  # noqa: E402

# 1000 is not a multiple of 64, so the padded-vocabulary path (1000 -> 1024 rows) is exercised.
VOCAB = 1000
# A 32-token window, so 128- and 512-token rows cross it; 4 layers with every 3rd global: layers 0 and 3 global.
SPECIAL = {"pad": 0, "cls": 2, "sep": 3, "mask": 4}
TINY = dict(vocab_size=VOCAB, hidden=64, layers=4, heads=2, intermediate=96, local_attention=32)


def tiny_config(**overrides) -> ModernBertConfig:
    return ModernBertConfig(**{**TINY, **overrides})


def hf_model(config: ModernBertConfig, attn_implementation: str = "sdpa", **hf_overrides):
    hf_config = transformers.ModernBertConfig(**{**hf_config_dict(config, SPECIAL), **hf_overrides})
    return transformers.ModernBertForMaskedLM._from_config(hf_config, attn_implementation=attn_implementation).eval()


def padded_batch(length: int, seed: int = 0, predictions: int = 12):
    """Three rows: full, half padding, and 10 real tokens then padding (most padded queries see no real key)."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, VOCAB, (3, length), generator=gen)
    lengths = [length, length // 2, 10]
    positions = torch.empty(3, predictions, dtype=torch.long)
    for row, real in enumerate(lengths):
        input_ids[row, real:] = 0
        positions[row] = torch.randint(0, real, (predictions,), generator=gen)
    return input_ids, positions


def hf_logits_at(model, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=(input_ids != 0).long()).logits
    return torch.gather(logits, 1, positions[..., None].expand(-1, -1, logits.shape[-1]))


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("length", [128, 512])
def test_logits_match_transformers_modernbert(attn_implementation, length):
    """Our random weights, mapped into transformers' ModernBertForMaskedLM, give the same logits (1e-5, fp32) at the
    masked positions, on padded rows 4x and 16x longer than the window: the mapping, the window's half-width, the
    global/local layer pattern, both RoPE bases and the GeGLU are the same function as transformers'."""
    torch.manual_seed(0)
    config = tiny_config()
    ours = ModernBertForPretraining(config).eval()
    theirs = hf_model(config, attn_implementation)
    theirs.load_state_dict(to_hf_state_dict(ours), strict=True)
    input_ids, positions = padded_batch(length)
    expected = hf_logits_at(theirs, input_ids, positions)
    assert torch.allclose(ours.logits(input_ids, positions), expected, atol=1e-5, rtol=0)
    output = ours(input_ids.to(torch.uint16), positions.to(torch.int32), token_type_ids=torch.ones_like(input_ids))
    assert output.nsp_logits is None
    assert torch.allclose(output.mlm_logits, expected, atol=1e-5, rtol=0)


def test_norm_bias_and_tanh_gelu_match_transformers():
    """With norm_bias the embedding, layer, final and head norms all carry biases, and gelu_pytorch_tanh is the tanh
    GELU in both the GeGLU and the head: random biases still give transformers' logits."""
    torch.manual_seed(1)
    config = tiny_config(norm_bias=True, hidden_activation="gelu_pytorch_tanh", global_attn_every_n_layers=2)
    ours = ModernBertForPretraining(config).eval()
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.5)
    theirs = hf_model(config)
    theirs.load_state_dict(to_hf_state_dict(ours), strict=True)
    input_ids, positions = padded_batch(128, seed=1)
    assert torch.allclose(ours.logits(input_ids, positions), hf_logits_at(theirs, input_ids, positions), atol=1e-5)


def test_window_radius_is_off_by_none():
    """The parity tests can see a window one token too wide: transformers at local_attention 34 (radius 17) differs
    from ours at 32 (radius 16) by over 10x the tolerance (near-uniform attention at init makes one key cheap)."""
    torch.manual_seed(0)
    config = tiny_config()
    ours = ModernBertForPretraining(config).eval()
    wider = hf_model(config, local_attention=34)
    wider.load_state_dict(to_hf_state_dict(ours), strict=True)
    input_ids, positions = padded_batch(128)
    assert (ours.logits(input_ids, positions) - hf_logits_at(wider, input_ids, positions)).abs().max() > 1e-4


def test_transformers_weights_load_into_ours():
    """transformers' own random init -> from_hf_state_dict -> our model: same logits, and config_from_hf reads
    transformers' config back into the config it was written from."""
    config = tiny_config(global_rope_theta=5000.0, local_rope_theta=300.0, global_attn_every_n_layers=2)
    torch.manual_seed(2)
    theirs = hf_model(config)
    assert config_from_hf(theirs.config.to_dict()) == config
    ours = ModernBertForPretraining(config).eval()
    ours.load_state_dict(from_hf_state_dict(theirs.state_dict(), config), strict=True)
    input_ids, positions = padded_batch(512, seed=2)
    assert torch.allclose(ours.logits(input_ids, positions), hf_logits_at(theirs, input_ids, positions), atol=1e-5)


@pytest.mark.parametrize("every", [3, 2], ids=["last-layer-global", "last-layer-local"])
def test_gradients_match_transformers(every):
    """The same masked-LM loss on padded rows gives every weight transformers' gradient (fp32, relative 1e-4): the
    training path is the same, tied decoder and a last layer run at the masked positions included, not only the
    logits."""
    torch.manual_seed(4)
    config = tiny_config(global_attn_every_n_layers=every)
    ours = ModernBertForPretraining(config).eval()
    theirs = hf_model(config)
    theirs.load_state_dict(to_hf_state_dict(ours), strict=True)
    input_ids, positions = padded_batch(128, seed=4)
    labels = torch.randint(0, VOCAB, positions.shape)
    torch.nn.functional.cross_entropy(ours(input_ids, positions).mlm_logits.flatten(0, 1), labels.flatten()).backward()
    logits = theirs(input_ids=input_ids, attention_mask=(input_ids != 0).long()).logits
    picked = torch.gather(logits, 1, positions[..., None].expand(-1, -1, VOCAB))
    torch.nn.functional.cross_entropy(picked.flatten(0, 1), labels.flatten()).backward()
    reference = dict(theirs.named_parameters())
    for name, param in ours.named_parameters():
        grad, expected = param.grad[: reference[name].shape[0]], reference[name].grad
        assert torch.allclose(grad, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item()), name


@pytest.mark.parametrize("every, layers", [(3, 4), (2, 4), (2, 2)],
                         ids=["last-layer-global", "last-layer-local", "only-the-last-layer-local"])
def test_last_layer_at_positions_gives_the_full_runs_vectors(every, layers):
    """Asking for some positions runs the last layer at those alone, and gives what the full run gives there:
    positions in padding, repeated, and at both ends of a row crossing the window included."""
    torch.manual_seed(5)
    model = ModernBertForPretraining(tiny_config(global_attn_every_n_layers=every, layers=layers)).model.eval()
    input_ids, _ = padded_batch(128, seed=5)
    positions = torch.tensor([[0, 127, 64, 64, 5], [0, 63, 64, 100, 127], [9, 10, 11, 0, 120]])
    with torch.no_grad():
        full = model(input_ids)
        picked = model(input_ids, positions=positions.to(torch.int32))
    assert picked.shape == (3, 5, 64)
    assert torch.allclose(picked, torch.gather(full, 1, positions[..., None].expand(-1, -1, 64)), atol=1e-5, rtol=0)


def test_state_dict_mapping_round_trip_and_refusals():
    """to_hf then from_hf restores every weight exactly, padding rows as zeros; compiled prefixes are stripped; the
    names are exactly the two models' parameter names; missing, unmapped or untied weights are refused."""
    torch.manual_seed(0)
    config = tiny_config(norm_bias=True)
    ours = ModernBertForPretraining(config)
    names = hf_names(config)
    assert set(names) == set(ours.state_dict())
    assert set(names.values()) | set(HF_TIED_KEYS) == set(hf_model(config).state_dict())
    state = {f"_orig_mod.{k}": v for k, v in ours.state_dict().items()}
    exported = to_hf_state_dict(state, config)
    assert exported["model.embeddings.tok_embeddings.weight"].shape == (VOCAB, 64)
    assert exported["decoder.bias"].shape == (VOCAB,)
    restored = from_hf_state_dict(exported, config)
    for name, tensor in ours.state_dict().items():
        if name in ("model.embeddings.tok_embeddings.weight", "decoder.bias"):
            assert torch.equal(restored[name][:VOCAB], tensor[:VOCAB])
            assert not restored[name][VOCAB:].any()
        else:
            assert torch.equal(restored[name], tensor)
    missing = r"our checkpoint does not match the model config: missing \['head.norm.bias'\]"
    with pytest.raises(BertError, match=missing):
        to_hf_state_dict({k: v for k, v in ours.state_dict().items() if k != "head.norm.bias"}, config)
    untied = dict(exported, **{"decoder.weight": exported["decoder.weight"] + 1})
    with pytest.raises(BertError, match="decoder.weight differs from model.embeddings.tok_embeddings.weight"):
        from_hf_state_dict(untied, config)
    with pytest.raises(BertError, match=r"unmapped \['head.dense.bias'\]"):
        from_hf_state_dict(dict(exported, **{"head.dense.bias": torch.zeros(64)}), config)


def test_hf_config_dict_and_config_from_hf():
    """hf_config_dict is accepted by transformers' ModernBertConfig with the layer pattern, RoPE bases, half window
    and special ids intact; config_from_hf reads a transformers 4.x config.json (no layer_types) and refuses what
    our model cannot build."""
    config = tiny_config(global_attn_every_n_layers=2, local_attention=64)
    hf = transformers.ModernBertConfig(**hf_config_dict(config, SPECIAL))
    assert hf.layer_types == ["full_attention", "sliding_attention"] * 2
    assert hf.rope_parameters["full_attention"]["rope_theta"] == 160_000.0
    assert hf.rope_parameters["sliding_attention"]["rope_theta"] == 10_000.0
    assert hf.sliding_window == 32
    assert (hf.pad_token_id, hf.cls_token_id, hf.sep_token_id, hf.bos_token_id, hf.mask_token_id) == (0, 2, 3, 2, 4)
    assert config_from_hf(hf_config_dict(config, SPECIAL)) == config
    legacy = {k: v for k, v in hf_config_dict(config, SPECIAL).items() if k not in ("layer_types", "rope_parameters")}
    assert config_from_hf({**legacy, "global_rope_theta": 5e4}) == tiny_config(
        global_attn_every_n_layers=2, local_attention=64, global_rope_theta=5e4)
    with pytest.raises(BertError, match="config.json sets attention_bias=True; our ModernBERT supports only False"):
        config_from_hf({**hf_config_dict(config, SPECIAL), "attention_bias": True})
    irregular = ["full_attention", "sliding_attention", "full_attention", "full_attention"]
    with pytest.raises(BertError, match="are not global every n-th layer from 0"):
        config_from_hf({**hf_config_dict(config, SPECIAL), "layer_types": irregular})
    with pytest.raises(BertError, match=r"needs the ids of the special tokens \['mask'\]"):
        hf_config_dict(config, {"pad": 0, "cls": 2, "sep": 3})
    with pytest.raises(BertError, match=r"the vocabulary's \[PAD\] is id 1 but the model was built with pad id 0"):
        hf_config_dict(config, {**SPECIAL, "pad": 1})
    with pytest.raises(BertError, match="config.json has no pad_token_id"):
        config_from_hf({**hf_config_dict(config, SPECIAL), "pad_token_id": None})


@pytest.mark.parametrize("overrides, message", [
    (dict(hidden=0), "--hidden must be a positive integer, got 0"),
    (dict(heads=3), r"--heads \(3\) must divide --hidden \(64\) into an even head width"),
    (dict(heads=64), r"--heads \(64\) must divide --hidden \(64\) into an even head width"),
    (dict(local_attention=33), "--local-attention must be even .* got 33"),
    (dict(global_attn_every_n_layers=0), "--global-attn-every-n-layers must be a positive integer, got 0"),
    (dict(local_rope_theta=0.0), "--local-rope-theta must be a positive number, got 0.0"),
    (dict(mlp_dropout=1.0), r"--mlp-dropout must be in \[0, 1\), got 1.0"),
    (dict(hidden_activation="relu"), "hidden_activation must be one of gelu, gelu_pytorch_tanh, got 'relu'"),
    (dict(pad_id=VOCAB), f"pad id {VOCAB} is outside the vocabulary of {VOCAB} entries"),
    (dict(nsp=True), "--nsp is not available with ModernBERT"),
    (dict(arch="bert"), "model config names arch 'bert', not 'modernbert'"),
])
def test_config_validation_names_the_flag(overrides, message):
    with pytest.raises(BertError, match=message):
        tiny_config(**overrides)


def test_named_sizes_and_config_round_trip():
    """from_size uses BERT's named sizes with heads = hidden / 64 and GeGLU widths that keep BERT's MLP parameter
    count within 7%; as_dict/from_dict round-trips, unknown fields are refused."""
    widths = {name: ModernBertConfig.from_size(name, VOCAB).intermediate
              for name in ("tiny", "mini", "small", "medium", "base", "large")}
    assert widths == {"tiny": 320, "mini": 704, "small": 1344, "medium": 1344, "base": 2048, "large": 2752}
    for name in widths:
        ours, bert = ModernBertConfig.from_size(name, VOCAB), ModelConfig.from_size(name, VOCAB)
        assert (ours.layers, ours.hidden, ours.heads) == (bert.layers, bert.hidden, bert.heads)
        assert abs(3 * ours.hidden * ours.intermediate / (2 * bert.hidden * bert.ffn) - 1) < 0.07
    overridden = ModernBertConfig.from_size("base", VOCAB, hidden=256, layers=3)
    assert (overridden.heads, overridden.intermediate, overridden.layers) == (4, glu_width(256), 3)
    trainer_flags = ModernBertConfig.from_size("tiny", VOCAB, ffn=1152, dropout=0.1, attention_dropout=0.05,
                                               max_positions=1024, pad_id=3)
    assert (trainer_flags.intermediate, trainer_flags.embedding_dropout, trainer_flags.mlp_dropout,
            trainer_flags.attention_dropout, trainer_flags.max_positions, trainer_flags.pad_id) == (
        1152, 0.1, 0.1, 0.05, 1024, 3)
    with pytest.raises(BertError, match=r"options \['norm'\] do not apply to a ModernBERT model"):
        ModernBertConfig.from_size("tiny", VOCAB, norm="pre")
    config = tiny_config(norm_bias=True, mlp_dropout=0.1)
    assert config.as_dict()["arch"] == "modernbert"
    assert ModernBertConfig.from_dict(config.as_dict()) == config
    with pytest.raises(BertError, match=r"unknown fields \['ffn'\]"):
        ModernBertConfig.from_dict({**config.as_dict(), "ffn": 256})
    with pytest.raises(BertError, match="unknown model size 'huge' for --size"):
        ModernBertConfig.from_size("huge", VOCAB)


def test_init_matches_transformers_statistics_and_follows_the_seed():
    """Each tensor's init has transformers' std (within 5%) and bound (truncation at 2 std): 0.02 for the
    embeddings, Wqkv and Wi, 0.02/sqrt(2*layers) for the Wo's and the head's dense; norms 1, biases 0.
    torch.manual_seed alone fixes every weight."""
    config = tiny_config(vocab_size=4000, hidden=128, layers=6, heads=2, intermediate=192)
    torch.manual_seed(3)
    ours = ModernBertForPretraining(config)
    theirs = dict(hf_model(config).named_parameters())
    for name, param in ours.named_parameters():
        reference = theirs[name]
        param = param[: config.vocab_size] if param.shape[0] == config.padded_vocab_size else param
        if param.ndim == 1:
            assert torch.equal(param, reference), name
            continue
        std = reference.std().item()
        assert abs(param.std().item() / std - 1) < 0.05, name
        assert param.abs().max() <= reference.abs().max() * 1.001 + 1e-6, name
        assert param.abs().max() > reference.abs().max() * 0.95, name
    assert math.isclose(ours.model.layers[0].attn.Wo.weight.abs().max().item(), 2 * 0.02 / math.sqrt(12),
                        rel_tol=1e-3)
    torch.manual_seed(3)
    again = ModernBertForPretraining(config)
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), again.state_dict().values()))


def test_gradient_reaches_every_parameter_with_dropout_and_padding():
    """One backward through the training forward (CPU dropout in embeddings, attention and MLP, padded rows whose
    padded queries see no real key in the local layers) gives every parameter a finite, non-zero gradient."""
    torch.manual_seed(0)
    config = tiny_config(norm_bias=True, embedding_dropout=0.1, attention_dropout=0.1, mlp_dropout=0.1)
    model = ModernBertForPretraining(config).train()
    input_ids, positions = padded_batch(128)
    labels = torch.randint(0, VOCAB, positions.shape)
    valid = torch.ones_like(positions, dtype=torch.bool)
    valid[2, 6:] = False
    logits = model(input_ids, positions, mlm_valid=valid).mlm_logits
    assert logits.shape == (int(valid.sum()), VOCAB)
    torch.nn.functional.cross_entropy(logits, labels[valid]).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())
    assert model.input_embeddings is model.model.embeddings.tok_embeddings
    with pytest.raises(BertError, match="rows of 8193 tokens exceed the model's --max-positions 8192"):
        model(torch.ones(1, 8193, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long))


def test_flops_count_the_window():
    """Local layers count only the keys inside the window (counted here from the mask itself); with a window wider
    than the row the count is BERT's for the same matmul weights."""
    config = tiny_config()
    seq_len = 128
    band = (torch.arange(seq_len)[:, None] - torch.arange(seq_len)[None, :]).abs() <= config.local_attention // 2
    keys = 2 * seq_len + 2 * band.sum().item() / seq_len  # layers 0 and 3 global, 1 and 2 local
    matmuls = 4 * (4 * 64 * 64 + 3 * 64 * 96) + (64 * 64 + config.padded_vocab_size * 64) * 20 / seq_len
    assert math.isclose(flops_per_token(config, seq_len, 20), 6 * matmuls + 12 * 64 * keys)
    # Only 20 of 128 tokens ask in the last layer (global): its q, Wo, GeGLU and attention shrink to that share.
    saved = (1 - 20 / seq_len) * (6 * (2 * 64 * 64 + 3 * 64 * 96) + 12 * 64 * seq_len)
    assert math.isclose(flops_per_token(config, seq_len, 20, sparse_last_layer=True),
                        6 * matmuls + 12 * 64 * keys - saved)
    # A GeGLU of half width 96 holds the weights of a 144-wide BERT MLP, so only attention could differ.
    wide = tiny_config(local_attention=1024)
    bert = ModelConfig(vocab_size=VOCAB, hidden=64, layers=4, heads=2, ffn=144)
    assert math.isclose(flops_per_token(wide, seq_len, 20), bert_flops_per_token(bert, seq_len, 20))
