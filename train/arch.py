"""The architectures a run can train, by --arch name. Each lives in a module of its own (model.py, modernbert.py)
with a config class and a model class of one interface; this table is the only place that knows them all."""

from __future__ import annotations

from typing import Mapping

from torch import nn

from prep.errors import BertError
from train.model import BertForPretraining, ModelConfig
from train.modernbert import ModernBertConfig, ModernBertForPretraining

ARCHS = {"bert": (ModelConfig, BertForPretraining), "modernbert": (ModernBertConfig, ModernBertForPretraining)}
DEFAULT_ARCH = "bert"  # model.json files written before --arch existed are BERT's


def model_config_from_dict(data: Mapping):
    """The config of the architecture `data["arch"]` names (BERT when absent), as saved in model.json."""
    arch = data.get("arch", DEFAULT_ARCH)
    if arch not in ARCHS:
        raise BertError(f"model config names architecture {arch!r}; this berttrain knows {', '.join(ARCHS)}")
    return ARCHS[arch][0].from_dict(data)


def arch_of(config) -> str:
    return getattr(config, "arch", DEFAULT_ARCH)


def new_model(config) -> nn.Module:
    """A freshly initialised pretraining model for `config` (seed torch first)."""
    return ARCHS[arch_of(config)][1](config)


def config_for_size(arch: str, size: str, vocab_size: int, **overrides):
    return ARCHS[arch][0].from_size(size, vocab_size, **overrides)
