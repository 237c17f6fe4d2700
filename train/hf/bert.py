"""BERT <-> transformers' `BertForMaskedLM` / `BertForPreTraining`: weight names, config.json, and the layouts
published BERT checkpoints come in.

Our submodules have names of their own (`encoder.layers.0.ffn_in`), mapped one-to-one onto transformers'
(`bert.encoder.layer.0.intermediate.dense`); the vocabulary padding rows are cut off on the way out and put back as
zeros on the way in, and the tied decoder, which we keep once, is listed under transformers' two aliases.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import torch
from torch import nn

from prep.errors import BertError
from train.hf.renaming import config_of, from_hf, to_hf
from train.model import INIT_STD, BertForPretraining, ModelConfig

MODEL_TYPE = "bert"

HF_TIED_KEYS = {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
                "cls.predictions.decoder.bias": "cls.predictions.bias"}
"""transformers' aliases of tied tensors: to_hf_state_dict emits them (strict loading wants them); drop them
before writing safetensors, which refuses shared storage."""
_VOCAB_ROWS = {"encoder.embeddings.word.weight", "mlm_head.bias"}
# Buffers that older transformers versions saved; they carry no weights.
_HF_IGNORED = ("bert.embeddings.position_ids", "bert.embeddings.token_type_ids")
MLM_HEAD_PREFIX = "cls.predictions."
NSP_PREFIXES = ("cls.seq_relationship.", "bert.pooler.")


def hf_names(config: ModelConfig) -> dict[str, str]:
    """Every parameter name of BertForPretraining(config) -> its transformers name."""
    if config.norm != "post":
        raise BertError("only --norm post models have a transformers equivalent (BERT is post-LN); "
                        "this model is pre-LN")
    names = {
        "encoder.embeddings.word.weight": "bert.embeddings.word_embeddings.weight",
        "encoder.embeddings.position.weight": "bert.embeddings.position_embeddings.weight",
        "encoder.embeddings.token_type.weight": "bert.embeddings.token_type_embeddings.weight",
    }
    pairs = [("encoder.embeddings.norm", "bert.embeddings.LayerNorm"),
             ("mlm_head.dense", "cls.predictions.transform.dense"),
             ("mlm_head.norm", "cls.predictions.transform.LayerNorm")]
    for i in range(config.layers):
        ours, theirs = f"encoder.layers.{i}", f"bert.encoder.layer.{i}"
        pairs += [(f"{ours}.attention.query", f"{theirs}.attention.self.query"),
                  (f"{ours}.attention.key", f"{theirs}.attention.self.key"),
                  (f"{ours}.attention.value", f"{theirs}.attention.self.value"),
                  (f"{ours}.attention.output", f"{theirs}.attention.output.dense"),
                  (f"{ours}.attention_norm", f"{theirs}.attention.output.LayerNorm"),
                  (f"{ours}.ffn_in", f"{theirs}.intermediate.dense"),
                  (f"{ours}.ffn_out", f"{theirs}.output.dense"),
                  (f"{ours}.ffn_norm", f"{theirs}.output.LayerNorm")]
    if config.nsp:
        pairs += [("pooler", "bert.pooler.dense"), ("nsp_head", "cls.seq_relationship")]
    for ours, theirs in pairs:
        names[f"{ours}.weight"] = f"{theirs}.weight"
        names[f"{ours}.bias"] = f"{theirs}.bias"
    names["mlm_head.bias"] = "cls.predictions.bias"
    return names


def to_hf_state_dict(model: nn.Module | Mapping[str, torch.Tensor],
                     config: ModelConfig | None = None) -> dict[str, torch.Tensor]:
    """Our weights under transformers' names, vocabulary padding cut off, tied aliases included.

    Takes the model (compiled or DDP-wrapped is fine) or its state dict with `config`. Loads with strict=True
    into BertForMaskedLM, or into BertForPreTraining when config.nsp. Raises BertError if any weight would be
    left behind or any transformers weight would be missing.
    """
    config = config or config_of(model)
    return to_hf(model, config, hf_names(config), _VOCAB_ROWS, HF_TIED_KEYS)


def from_hf_state_dict(hf_state: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """The inverse of to_hf_state_dict: a state dict for BertForPretraining(config), vocabulary rows padded with
    zeros. Tied aliases, when present, must equal their source. Raises BertError on missing or unknown keys."""
    return from_hf(hf_state, config, hf_names(config), _VOCAB_ROWS, HF_TIED_KEYS, ignored=_HF_IGNORED)


def hf_config_dict(config: ModelConfig) -> dict:
    """The fields of transformers' BertConfig (config.json) for an exported post-LN model."""
    hf_names(config)  # refuses pre-LN
    return {
        "model_type": "bert",
        "architectures": ["BertForPreTraining" if config.nsp else "BertForMaskedLM"],
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden,
        "num_hidden_layers": config.layers,
        "num_attention_heads": config.heads,
        "intermediate_size": config.ffn,
        "hidden_act": "gelu",
        "hidden_dropout_prob": config.dropout,
        "attention_probs_dropout_prob": config.attention_dropout,
        "max_position_embeddings": config.max_positions,
        "type_vocab_size": config.type_vocab_size,
        "initializer_range": INIT_STD,
        "layer_norm_eps": config.layer_norm_eps,
        "pad_token_id": config.pad_id,
        "position_embedding_type": "absolute",
        "tie_word_embeddings": True,
    }


def config_from_hf(hf_config: Mapping) -> ModelConfig:
    """Our config for a transformers BertConfig dict (config.json); nsp is false and vocab_size is config.json's
    (`adapt_hf_state` and `load_hf_dir` settle both from the weights and vocab.txt).

    Raises BertError for what our BERT does not build: another activation or position embedding, a decoder.
    """
    if hf_config.get("model_type", MODEL_TYPE) != MODEL_TYPE:
        raise BertError(f"config.json describes a {hf_config['model_type']!r} model, not {MODEL_TYPE}")
    if hf_config.get("hidden_act", "gelu") != "gelu":
        raise BertError(f"config.json uses hidden_act {hf_config['hidden_act']!r}; berttrain's BERT uses exact "
                        f"'gelu'")
    if hf_config.get("position_embedding_type", "absolute") != "absolute":
        raise BertError(f"config.json uses {hf_config['position_embedding_type']!r} position embeddings; "
                        f"berttrain's BERT uses 'absolute'")
    if hf_config.get("is_decoder") or hf_config.get("add_cross_attention"):
        raise BertError("config.json describes a BERT decoder (cross-attention); berttrain reads encoders only")
    return ModelConfig(
        vocab_size=int(hf_config["vocab_size"]),
        hidden=int(hf_config["hidden_size"]),
        layers=int(hf_config["num_hidden_layers"]),
        heads=int(hf_config["num_attention_heads"]),
        ffn=int(hf_config["intermediate_size"]),
        max_positions=int(hf_config.get("max_position_embeddings", 512)),
        type_vocab_size=int(hf_config.get("type_vocab_size", 2)),
        dropout=float(hf_config.get("hidden_dropout_prob", 0.1)),
        attention_dropout=float(hf_config.get("attention_probs_dropout_prob", 0.1)),
        layer_norm_eps=float(hf_config.get("layer_norm_eps", 1e-12)),
        pad_id=int(hf_config.get("pad_token_id") or 0),
    )


def adapt_hf_state(hf_state: Mapping[str, torch.Tensor], config: ModelConfig, require_mlm_head: bool,
                   where: str) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Any published BERT checkpoint's tensors in the layout `from_hf_state_dict(state, config)` takes, with the
    config they call for.

    Renames legacy `gamma`/`beta` LayerNorm names and bare BertModel names; an NSP classifier sets config.nsp, a
    pooler without one is dropped; vocabulary rows past config.vocab_size (a vocab_size padded up in config.json)
    are cut off. Without a masked-LM head it raises BertError naming `where`, unless `require_mlm_head` is false
    (fine-tuning), when the head starts from BERT's initialisation.
    """
    hf_state = {_hf_name(k): v for k, v in hf_state.items()}
    nsp = "cls.seq_relationship.weight" in hf_state
    if not nsp:  # a pooler without its classifier is a BertModel's; our MLM-only model has no place for it
        hf_state = {k: v for k, v in hf_state.items() if not k.startswith(NSP_PREFIXES)}
    config = dataclasses.replace(config, nsp=nsp)
    # Rows past vocab.txt are ids no tokenizer produces.
    for name in ("bert.embeddings.word_embeddings.weight", "cls.predictions.bias", "cls.predictions.decoder.weight",
                 "cls.predictions.decoder.bias"):
        if name in hf_state and hf_state[name].shape[0] != config.vocab_size:
            hf_state[name] = hf_state[name][: config.vocab_size]
    if not any(k.startswith(MLM_HEAD_PREFIX) for k in hf_state):
        if require_mlm_head:
            raise BertError(f"{where} holds a bare BertModel without the masked-LM head (cls.predictions.*): "
                            f"continuing pretraining needs BertForMaskedLM or BertForPreTraining weights")
        fresh = to_hf_state_dict(BertForPretraining(config).state_dict(), config)
        hf_state.update({k: v for k, v in fresh.items() if k.startswith(MLM_HEAD_PREFIX) and k not in HF_TIED_KEYS})
    return config, hf_state


def _hf_name(name: str) -> str:
    """transformers' current name of a weight from any BERT checkpoint: legacy LayerNorm gamma/beta renamed, a bare
    BertModel's names put under `bert.`."""
    if name.endswith(".gamma"):
        name = name[: -len("gamma")] + "weight"
    elif name.endswith(".beta"):
        name = name[: -len("beta")] + "bias"
    if name.startswith(("embeddings.", "encoder.", "pooler.")):
        name = "bert." + name
    return name
