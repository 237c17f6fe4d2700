"""`berttrain export`: a run's (or a Hugging Face directory's) weights as a directory that `transformers` opens
with no code of ours."""

from __future__ import annotations

from pathlib import Path

import torch

from prep.errors import BertError
from prep.outputs import refuse_existing, staged_dir
from prep.wordpiece import Vocab
from train.arch import arch_of
from train.hf import mapping_for
from train.hf.files import (EXPORT_RECORD_FILE, HF_CONFIG_FILE, WEIGHT_FORMATS, has_safetensors, write_hf_weights,
                            write_json, write_tokenizer_files)
from train.pretrained import load_pretrained

EXPORT_FORMAT = "berttrain-hf-export"


def export_hf(source: Path, out_dir: Path, checkpoint: Path | None = None, vocab: Path | None = None,
              weights_format: str = "auto", force: bool = False) -> dict:
    """`berttrain export`: a directory that `transformers` opens with no code of ours; returns its record.

    Writes config.json (BertForMaskedLM, BertForPreTraining for a BERT with the NSP head, or
    ModernBertForMaskedLM), the weights
    (model.safetensors, or pytorch_model.bin when safetensors is not installed or `weights_format` is "pytorch"),
    vocab.txt, tokenizer_config.json, special_tokens_map.json, tokenizer.json when `tokenizers` is installed,
    and berttrain.json (where the export came from). Every weight must land under its transformers name, checked
    against transformers' own model when it is installed. Built in a hidden sibling directory, renamed when
    complete.
    """
    if weights_format not in WEIGHT_FORMATS:
        raise BertError(f"--format must be one of {', '.join(WEIGHT_FORMATS)}, got {weights_format!r}")
    out_dir = Path(out_dir)
    refuse_existing(out_dir, force, "pass --force to replace it, or another --hf directory")
    pretrained = load_pretrained(source, checkpoint, vocab)
    config = pretrained.config
    arch = arch_of(config)
    mapping = mapping_for(arch)
    if arch == "bert" and config.norm != "post":
        raise BertError(f"{pretrained.source} is a pre-LN model (--norm pre): transformers' BERT is post-LN, so "
                        f"it has no BertForMaskedLM equivalent; export needs a run trained with --norm post")
    vocab_obj = pretrained.vocab
    if pretrained.vocab_file.suffix != ".json" and Vocab.sentencepiece_style(vocab_obj.tokens):
        raise BertError(f"the vocabulary of {pretrained.source} is a SentencePiece one (unigram/bpe), which "
                        f"transformers' BertTokenizer cannot read; export needs a WordPiece vocabulary")
    hf_state = mapping.to_hf_state_dict(pretrained.state, config)
    # safetensors refuses tensors sharing memory; transformers re-ties the aliases when it loads.
    weights = {k: v.contiguous() for k, v in hf_state.items() if k not in mapping.HF_TIED_KEYS}
    if arch == "bert":
        hf_config = mapping.hf_config_dict(config)
    else:
        specials = vocab_obj.special
        hf_config = mapping.hf_config_dict(config, {"pad": specials.pad, "cls": specials.cls, "sep": specials.sep,
                                                     "mask": specials.mask})
    _check_with_transformers(weights, hf_config, mapping.HF_TIED_KEYS)
    if weights_format == "auto":
        weights_format = "safetensors" if has_safetensors() else "pytorch"
    elif weights_format == "safetensors" and not has_safetensors():
        raise BertError("--format safetensors needs the safetensors package: pip install safetensors")

    model_max_length = pretrained.usable_len
    with staged_dir(out_dir) as partial:
        weights_file = write_hf_weights(partial, weights, weights_format)
        write_json(partial / HF_CONFIG_FILE, hf_config)
        write_tokenizer_files(partial, pretrained.vocab_file, vocab_obj, pretrained.lowercase, model_max_length)
        record = {
            "format": EXPORT_FORMAT,
            "source": pretrained.source,
            "step": pretrained.step,
            "trained_max_len": pretrained.max_len,
            "model_max_length": model_max_length,
            "architecture": hf_config["architectures"][0],
            "weights": weights_file,
            "tensors": len(weights),
            "parameters": sum(v.numel() for v in weights.values()),
            "vocab_sha256": vocab_obj.sha256,
            "lowercase": pretrained.lowercase,
            "model": config.as_dict(),
        }
        write_json(partial / EXPORT_RECORD_FILE, record)
    return {**record, "out_dir": str(out_dir), "files": sorted(p.name for p in out_dir.iterdir())}


def _check_with_transformers(weights: dict[str, torch.Tensor], hf_config: dict, tied_keys) -> None:
    """Every weight we write must be one transformers' model has, of its shape, and none may be missing: it
    would only warn and start a missing one at random. Skipped when transformers is not installed."""
    try:
        import transformers
    except ImportError:
        return
    model_class = getattr(transformers, hf_config["architectures"][0])
    with torch.device("meta"):  # shapes and names only, no memory
        model = model_class(transformers.CONFIG_MAPPING[hf_config["model_type"]](**hf_config))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()
                if k not in tied_keys and not k.endswith(("position_ids", "token_type_ids"))}
    written = {k: tuple(v.shape) for k, v in weights.items()}
    missing, unknown = sorted(set(expected) - set(written)), sorted(set(written) - set(expected))
    wrong = sorted(k for k in set(expected) & set(written) if expected[k] != written[k])
    if missing or unknown or wrong:
        raise BertError(f"the export does not match transformers {transformers.__version__}'s "
                        f"{hf_config['architectures'][0]}: missing {missing[:5]}, unknown {unknown[:5]}, wrong shape "
                        f"{wrong[:5]}; transformers would start those weights at random")
