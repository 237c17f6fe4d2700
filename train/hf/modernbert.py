"""Our ModernBERT (`train.modernbert`) <-> transformers' `ModernBertForMaskedLM`: weight names and config.json.

The submodules carry transformers' names, so the mapping is the identity on names; what it does is cut the
vocabulary padding rows off (transformers pads nothing) and add them back, and handle the tied decoder weight,
which we keep once (as the embedding) and transformers lists under two names.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from prep.errors import BertError
from train.hf.renaming import config_of, from_hf, to_hf
from train.modernbert import ACTIVATIONS, INIT_CUTOFF, INIT_STD, ModernBertConfig

HF_TIED_KEYS = {"decoder.weight": "model.embeddings.tok_embeddings.weight"}
"""transformers' aliases of tied tensors: to_hf_state_dict emits them (strict loading wants them); drop them
before writing safetensors, which refuses shared storage."""
_VOCAB_ROWS = {"model.embeddings.tok_embeddings.weight", "decoder.bias"}
_GLOBAL, _LOCAL = "full_attention", "sliding_attention"


def hf_names(config: ModernBertConfig) -> dict[str, str]:
    """Every parameter name of ModernBertForPretraining(config) -> its transformers name."""
    norms = ["model.embeddings.norm", "model.final_norm", "head.norm"]
    matrices = ["model.embeddings.tok_embeddings", "head.dense"]
    for i in range(config.layers):
        layer = f"model.layers.{i}"
        norms += [f"{layer}.attn_norm"] * (i > 0) + [f"{layer}.mlp_norm"]
        matrices += [f"{layer}.attn.Wqkv", f"{layer}.attn.Wo", f"{layer}.mlp.Wi", f"{layer}.mlp.Wo"]
    names = [f"{m}.weight" for m in matrices + norms] + ["decoder.bias"]
    if config.norm_bias:
        names += [f"{n}.bias" for n in norms]
    return {name: name for name in names}


def to_hf_state_dict(model: nn.Module | Mapping[str, torch.Tensor],
                     config: ModernBertConfig | None = None) -> dict[str, torch.Tensor]:
    """Our weights under transformers' names, vocabulary padding cut off, tied aliases included.

    Takes the model (compiled or DDP-wrapped is fine) or its state dict with `config`. Loads with strict=True into
    ModernBertForMaskedLM. Raises BertError if any weight would be left behind or any transformers weight missing.
    """
    config = config or config_of(model)
    return to_hf(model, config, hf_names(config), _VOCAB_ROWS, HF_TIED_KEYS)


def from_hf_state_dict(hf_state: Mapping[str, torch.Tensor],
                       config: ModernBertConfig) -> dict[str, torch.Tensor]:
    """The inverse of to_hf_state_dict: a state dict for ModernBertForPretraining(config), vocabulary rows padded
    with zeros. Tied aliases, when present, must equal their source. Raises BertError on missing or unknown keys."""
    return from_hf(hf_state, config, hf_names(config), _VOCAB_ROWS, HF_TIED_KEYS)


def adapt_hf_state(hf_state: Mapping[str, torch.Tensor], config: ModernBertConfig, require_mlm_head: bool,
                   where: str) -> tuple[ModernBertConfig, dict[str, torch.Tensor]]:
    """Published ModernBERTs pad their vocabulary rows (50,368 for 50,280 tokens): the rows past the tokenizer's
    `config.vocab_size`, which no token id reaches, are dropped."""
    state = dict(hf_state)
    for name in (*_VOCAB_ROWS, *HF_TIED_KEYS):
        if name in state and state[name].shape[0] > config.vocab_size:
            state[name] = state[name][: config.vocab_size]
    return config, state


def hf_config_dict(config: ModernBertConfig, special: Mapping[str, int]) -> dict:
    """The fields of transformers' ModernBertConfig (config.json); `ModernBertConfig(**d)` accepts them.

    `special` maps pad, cls, sep and mask to their ids; pad must be config.pad_id. bos/eos are cls/sep, as in
    ModernBERT's own configs. Both the layer pattern and RoPE bases are written twice:
    as `layer_types`/`rope_parameters` (transformers 5) and as `global_attn_every_n_layers`/`*_rope_theta` (4.x).
    """
    missing = sorted({"pad", "cls", "sep", "mask"} - set(special))
    if missing:
        raise BertError(f"hf_config_dict needs the ids of the special tokens {missing}")
    if special["pad"] != config.pad_id:
        raise BertError(f"the vocabulary's [PAD] is id {special['pad']} but the model was built with pad id "
                        f"{config.pad_id}")
    layer_types = [_GLOBAL if config.is_global(i) else _LOCAL for i in range(config.layers)]
    return {
        "model_type": "modernbert",
        "architectures": ["ModernBertForMaskedLM"],
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden,
        "intermediate_size": config.intermediate,
        "num_hidden_layers": config.layers,
        "num_attention_heads": config.heads,
        "hidden_activation": config.hidden_activation,
        "classifier_activation": config.hidden_activation,
        "max_position_embeddings": config.max_positions,
        "initializer_range": INIT_STD,
        "initializer_cutoff_factor": INIT_CUTOFF,
        "norm_eps": config.norm_eps,
        "norm_bias": config.norm_bias,
        "attention_bias": False,
        "mlp_bias": False,
        "classifier_bias": False,
        "decoder_bias": True,
        "embedding_dropout": config.embedding_dropout,
        "attention_dropout": config.attention_dropout,
        "mlp_dropout": config.mlp_dropout,
        "local_attention": config.local_attention,
        "layer_types": layer_types,
        "rope_parameters": {_GLOBAL: {"rope_type": "default", "rope_theta": float(config.global_rope_theta)},
                            _LOCAL: {"rope_type": "default", "rope_theta": float(config.local_rope_theta)}},
        "global_attn_every_n_layers": config.global_attn_every_n_layers,
        "global_rope_theta": float(config.global_rope_theta),
        "local_rope_theta": float(config.local_rope_theta),
        "pad_token_id": config.pad_id,
        "cls_token_id": special["cls"],
        "sep_token_id": special["sep"],
        "bos_token_id": special["cls"],
        "eos_token_id": special["sep"],
        "mask_token_id": special["mask"],
        "tie_word_embeddings": True,
    }


def config_from_hf(hf_config: Mapping) -> ModernBertConfig:
    """Our config for a transformers ModernBERT config dict (config.json, or `config.to_dict()`).

    Reads transformers 5's `layer_types`/`rope_parameters` or 4.x's `global_attn_every_n_layers`/`*_rope_theta`.
    Raises BertError for what our model does not build: biases in attention, MLP or head transform, no decoder
    bias, an untied decoder, a layer pattern other than every-n-th global, scaled RoPE, an unknown activation.
    """
    hf = hf_config
    if hf.get("model_type", "modernbert") != "modernbert":
        raise BertError(f"config.json describes a {hf['model_type']!r} model, not modernbert")
    for field, supported in (("attention_bias", False), ("mlp_bias", False), ("classifier_bias", False),
                             ("decoder_bias", True), ("tie_word_embeddings", True)):
        if hf.get(field, supported) != supported:
            raise BertError(f"config.json sets {field}={hf[field]!r}; our ModernBERT supports only {supported}")
    activation = hf.get("hidden_activation", "gelu")
    if hf.get("classifier_activation", activation) != activation:
        raise BertError(f"config.json's classifier_activation {hf['classifier_activation']!r} differs from its "
                        f"hidden_activation {activation!r}; our ModernBERT uses one activation for both")
    if activation not in ACTIVATIONS:
        raise BertError(f"config.json's hidden_activation {activation!r} is not one of {', '.join(ACTIVATIONS)}")
    heads, hidden = hf.get("num_attention_heads", 12), hf.get("hidden_size", 768)
    if hf.get("head_dim") not in (None, hidden // heads):
        raise BertError(f"config.json sets head_dim {hf['head_dim']}, not hidden_size / num_attention_heads")
    if hf.get("pad_token_id") is None:
        raise BertError("config.json has no pad_token_id; add the id of the tokenizer's [PAD] token")
    layers = hf.get("num_hidden_layers", 22)
    every_n = _global_every_n(hf, layers)
    global_theta, local_theta = _rope_theta(hf, _GLOBAL, 160_000.0), _rope_theta(hf, _LOCAL, 10_000.0)
    return ModernBertConfig(
        vocab_size=hf.get("vocab_size", 50368), hidden=hidden, layers=layers, heads=heads,
        intermediate=hf.get("intermediate_size", 1152), max_positions=hf.get("max_position_embeddings", 8192),
        local_attention=hf.get("local_attention", 128), global_attn_every_n_layers=every_n,
        global_rope_theta=global_theta, local_rope_theta=local_theta,
        embedding_dropout=hf.get("embedding_dropout", 0.0), attention_dropout=hf.get("attention_dropout", 0.0),
        mlp_dropout=hf.get("mlp_dropout", 0.0), hidden_activation=activation, norm_eps=hf.get("norm_eps", 1e-5),
        norm_bias=hf.get("norm_bias", False), pad_id=hf["pad_token_id"])


def _global_every_n(hf: Mapping, layers: int) -> int:
    """n such that layers 0, n, 2n, ... are the global ones; from `layer_types` when the config has it."""
    every_n = hf.get("global_attn_every_n_layers", 3)
    layer_types = hf.get("layer_types")
    if layer_types is None:
        return every_n
    global_layers = [i for i, kind in enumerate(layer_types) if kind == _GLOBAL]
    if len(global_layers) > 1:
        every_n = global_layers[1]
    elif global_layers == [0]:
        every_n = max(every_n, layers)
    expected = [_GLOBAL if i % every_n == 0 else _LOCAL for i in range(layers)]
    if list(layer_types) != expected:
        raise BertError(f"config.json's layer_types {list(layer_types)} are not global every n-th layer from 0, "
                        "the only pattern our ModernBERT builds")
    return every_n


def _rope_theta(hf: Mapping, layer_type: str, default: float) -> float:
    params = (hf.get("rope_parameters") or {}).get(layer_type)
    if params is None:
        return hf.get("global_rope_theta" if layer_type == _GLOBAL else "local_rope_theta", default)
    if params.get("rope_type", "default") != "default":
        raise BertError(f"config.json's {layer_type} layers use RoPE type {params['rope_type']!r}; "
                        "our ModernBERT supports only the default")
    return params["rope_theta"]
