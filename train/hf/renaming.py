"""What every architecture's mapping does the same way: our state dict <-> transformers' under a table of names,
the vocabulary's padding rows cut off or added back, tied aliases written or checked."""

from __future__ import annotations

from typing import Collection, Mapping

import torch
from torch import nn

from prep.errors import BertError


def strip_wrappers(name: str) -> str:
    """Drops torch.compile's `_orig_mod.` and DDP's `module.` prefixes."""
    for prefix in ("_orig_mod.", "module."):
        while name.startswith(prefix):
            name = name[len(prefix):]
    return name.replace("._orig_mod.", ".")


def check_keys(have: set[str], want: set[str], what: str) -> None:
    missing, unknown = sorted(want - have), sorted(have - want)
    if missing or unknown:
        raise BertError(f"{what} does not match the model config: missing {missing[:5]}"
                        f"{' ...' if len(missing) > 5 else ''}, unmapped {unknown[:5]}"
                        f"{' ...' if len(unknown) > 5 else ''}")


def config_of(model) -> object:
    """The config of a model (compiled or DDP-wrapped is fine); TypeError for a state dict, which has none."""
    if not isinstance(model, nn.Module):
        raise TypeError("to_hf_state_dict needs `config` when given a state dict")
    inner = getattr(model, "_orig_mod", model)
    return getattr(inner, "module", inner).config


def to_hf(model: nn.Module | Mapping[str, torch.Tensor], config, names: Mapping[str, str],
          vocab_rows: Collection[str], tied: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """Our weights (a model, compiled or DDP-wrapped, or its state dict) renamed by `names` (ours -> theirs),
    the rows of `vocab_rows` cut to config.vocab_size, `tied` aliases (alias -> source) added. Copies: editing
    the result never touches the training weights."""
    if isinstance(model, nn.Module):
        model = model.state_dict()
    state = {strip_wrappers(k): v for k, v in model.items()}
    check_keys(set(state), set(names), "our checkpoint")
    out = {}
    for ours, theirs in names.items():
        tensor = state[ours].detach()
        out[theirs] = (tensor[: config.vocab_size] if ours in vocab_rows else tensor).clone()
    for alias, source in tied.items():
        out[alias] = out[source]
    return out


def from_hf(hf_state: Mapping[str, torch.Tensor], config, names: Mapping[str, str], vocab_rows: Collection[str],
            tied: Mapping[str, str], ignored: Collection[str] = ()) -> dict[str, torch.Tensor]:
    """The inverse of `to_hf`: vocabulary rows padded with zeros to config.padded_vocab_size; a tied alias, when
    present, must equal its source; `ignored` keys are dropped. Raises BertError on missing or unknown keys."""
    state = {k: v for k, v in hf_state.items() if k not in ignored}
    for alias, source in tied.items():
        if alias in state and source in state and not torch.equal(state.pop(alias), state[source]):
            raise BertError(f"{alias} differs from {source}: this checkpoint's decoder is not tied")
    check_keys(set(state), set(names.values()), "the transformers checkpoint")
    out = {}
    for ours, theirs in names.items():
        tensor = state[theirs]
        if ours in vocab_rows:
            if tensor.shape[0] != config.vocab_size:
                raise BertError(f"{theirs} has {tensor.shape[0]} rows but the vocabulary has {config.vocab_size}")
            pad = tensor.new_zeros((config.padded_vocab_size - config.vocab_size, *tensor.shape[1:]))
            tensor = torch.cat([tensor, pad])
        out[ours] = tensor
    return out
