"""Hugging Face interop: our models' weights and config.json <-> transformers' names, one module per architecture.

- `bert.py` (and one sibling per further architecture): the mapping of one model family. Each defines
  `hf_names(config)`, `to_hf_state_dict(model_or_state, config)`, `from_hf_state_dict(hf_state, config)`,
  `hf_config_dict(config, ...)` and `config_from_hf(hf_config)`; it may also define
  `adapt_hf_state(hf_state, config, require_mlm_head, where) -> (config, hf_state)` for the layouts published
  checkpoints come in (legacy names, extra heads, padded vocabularies), which `load_hf_dir` then applies.
- `files.py`: Hugging Face directories on disk, architecture-neutral: config.json, weights, tokenizer files,
  `is_hf_dir`, `load_hf_dir` (which picks the mapping by config.json's `model_type`).
- `export.py`: `berttrain export` (`export_hf`).
"""

from __future__ import annotations

from types import ModuleType

from prep.errors import BertError
from train.hf import bert, modernbert

MAPPINGS: dict[str, ModuleType] = {"bert": bert, "modernbert": modernbert}
"""transformers' `model_type` -> the module mapping that architecture onto ours (the same names as --arch)."""


def mapping_for(model_type: str | None) -> ModuleType:
    """The mapping module for a config.json's `model_type`; BertError naming the ones we read for any other."""
    if model_type not in MAPPINGS:
        raise BertError(f"Hugging Face model_type {model_type!r} has no mapping in berttrain; it reads "
                        f"{', '.join(repr(name) for name in MAPPINGS)}")
    return MAPPINGS[model_type]
