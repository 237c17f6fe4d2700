"""Hugging Face model directories on disk, for any architecture we map: config.json, the weights
(model.safetensors or pytorch_model.bin, sharded or not), and the tokenizer files beside them.

`load_hf_dir` reads a directory into our parameter names through the mapping its config.json's `model_type`
names (`train.hf.mapping_for`); the writers here are what `berttrain export` builds a directory from.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
from pathlib import Path

import torch

from prep.errors import BertError
from prep.wordpiece import SPECIAL_TOKENS, Vocab
from train.checkpoint import save_torch_file
from train.hf import mapping_for

HF_CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX_FILE = "model.safetensors.index.json"
PYTORCH_FILE = "pytorch_model.bin"
PYTORCH_INDEX_FILE = "pytorch_model.bin.index.json"
VOCAB_FILE = "vocab.txt"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
TOKENIZER_FILE = "tokenizer.json"
EXPORT_RECORD_FILE = "berttrain.json"  # where an export came from; transformers ignores it
WEIGHT_FORMATS = ("auto", "safetensors", "pytorch")
# transformers' names of the special tokens, in SPECIAL_TOKENS order.
HF_SPECIAL_NAMES = ("pad_token", "unk_token", "cls_token", "sep_token", "mask_token")


def is_hf_dir(path: Path) -> bool:
    """True for a Hugging Face model directory (its config.json names a model_type); a run's config.json does not."""
    config_file = Path(path) / HF_CONFIG_FILE
    if not config_file.is_file():
        return False
    try:
        return "model_type" in json.loads(config_file.read_text(encoding="utf-8"))
    except ValueError:
        return False


def load_hf_dir(path: Path, require_mlm_head: bool = True) -> tuple[object, dict[str, torch.Tensor], Path]:
    """(model config, state dict in our names, vocabulary file) of a Hugging Face model directory.

    Reads config.json, the weights (model.safetensors, pytorch_model.bin, or their sharded indexes) and the
    vocabulary (vocab.txt, else tokenizer.json), and maps them with the mapping of config.json's model_type. The
    config's vocab_size is the vocabulary's token count:
    rows beyond it are dropped. For BERT it takes BertForMaskedLM and BertForPreTraining checkpoints (the NSP head
    comes along as config.nsp), legacy `gamma`/`beta` LayerNorm names and bare BertModel names; without a
    masked-LM head it raises BertError, unless `require_mlm_head` is false (fine-tuning), when the head starts
    from its initialisation. Raises BertError for an architecture we do not map or a weight it cannot place.
    """
    path = Path(path)
    hf_config = read_hf_config(path)
    try:
        mapping = mapping_for(hf_config.get("model_type"))
        config = mapping.config_from_hf(hf_config)
    except BertError as exc:
        raise BertError(f"{path}: {exc}") from None
    vocab_file = next((path / name for name in (VOCAB_FILE, TOKENIZER_FILE) if (path / name).is_file()), None)
    if vocab_file is None:
        raise BertError(f"{path} has neither {VOCAB_FILE} nor {TOKENIZER_FILE}: berttrain needs the vocabulary the "
                        f"model was trained with")
    vocab_tokens = len(Vocab.load(vocab_file))
    if vocab_tokens > config.vocab_size:
        raise BertError(f"{vocab_file} has {vocab_tokens} tokens but {path / HF_CONFIG_FILE} says vocab_size "
                        f"{config.vocab_size}: they do not belong together")
    config = dataclasses.replace(config, vocab_size=vocab_tokens)
    hf_state = read_hf_weights(path)
    adapt = getattr(mapping, "adapt_hf_state", None)  # optional: only families with legacy layouts need one
    if adapt is not None:
        config, hf_state = adapt(hf_state, config, require_mlm_head, str(path))
    return config, mapping.from_hf_state_dict(hf_state, config), vocab_file


def read_hf_config(path: Path) -> dict:
    """config.json of a Hugging Face directory; BertError when the directory or the file is missing."""
    if not path.is_dir():
        raise BertError(f"no such directory {path}")
    config = read_json(path / HF_CONFIG_FILE)
    if config is None:
        raise BertError(f"{path} has no {HF_CONFIG_FILE}: it is not a Hugging Face model directory")
    return config


def read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the directory's weights as float32 (fp16/bf16 checkpoints are widened), by name."""
    files = []
    for index_name in (SAFETENSORS_INDEX_FILE, PYTORCH_INDEX_FILE):
        index = read_json(path / index_name)
        if index is not None:
            files = [path / name for name in dict.fromkeys(index["weight_map"].values())]
            break
    else:
        for name in (SAFETENSORS_FILE, PYTORCH_FILE):
            if (path / name).is_file():
                files = [path / name]
                break
    if not files:
        raise BertError(f"{path} has no weights: expected {SAFETENSORS_FILE} or {PYTORCH_FILE}")
    state = {}
    for file in files:
        if file.suffix == ".safetensors":
            try:
                from safetensors.torch import load_file
            except ImportError:
                raise BertError(f"{file} is in safetensors format: pip install safetensors") from None
            state.update(load_file(str(file)))
        else:
            state.update(torch.load(file, map_location="cpu", weights_only=True))
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def has_safetensors() -> bool:
    return importlib.util.find_spec("safetensors") is not None


def write_hf_weights(out_dir: Path, weights: dict[str, torch.Tensor], weights_format: str) -> str:
    """Writes `weights` (no two sharing memory) as model.safetensors or, for "pytorch", pytorch_model.bin into
    `out_dir`; returns the file's name."""
    if weights_format == "safetensors":
        from safetensors.torch import save

        # Serialised here and written by Python, whose OSError (a full disk) says what failed; the library's own
        # writer reports it as an error of its own type.
        (out_dir / SAFETENSORS_FILE).write_bytes(save(weights, metadata={"format": "pt"}))
        return SAFETENSORS_FILE
    save_torch_file(weights, out_dir / PYTORCH_FILE)
    return PYTORCH_FILE


def write_tokenizer_files(out_dir: Path, vocab_file: Path, vocab: Vocab, lowercase: bool,
                          model_max_length: int) -> None:
    """What transformers' AutoTokenizer opens with no code of ours: for a WordPiece vocab.txt, vocab.txt,
    special_tokens_map.json, tokenizer_config.json (BertTokenizer) and, when `tokenizers` is installed,
    tokenizer.json; for a Hugging Face tokenizer.json, the file itself with the other two naming its specials."""
    if vocab_file.suffix == ".json":
        _write_tokenizer_json_files(out_dir, vocab_file, vocab, model_max_length)
        return
    shutil.copyfile(vocab_file, out_dir / VOCAB_FILE)
    special = dict(zip(HF_SPECIAL_NAMES, SPECIAL_TOKENS))
    write_json(out_dir / SPECIAL_TOKENS_MAP_FILE, special)
    write_json(out_dir / TOKENIZER_CONFIG_FILE, {
        "tokenizer_class": "BertTokenizer",
        "do_lower_case": lowercase,
        "strip_accents": None,  # None: strip exactly when lowercasing, as our tokenizer does
        "tokenize_chinese_chars": True,
        "model_max_length": model_max_length,
        **special,
    })
    tokenizer_json = _tokenizer_json(vocab, lowercase)
    if tokenizer_json is not None:
        (out_dir / TOKENIZER_FILE).write_text(tokenizer_json, encoding="utf-8")


def _write_tokenizer_json_files(out_dir: Path, vocab_file: Path, vocab, model_max_length: int) -> None:
    """tokenizer.json copied as it was imported, and the special tokens it was read with, by transformers' names."""
    shutil.copyfile(vocab_file, out_dir / TOKENIZER_FILE)
    special = {f"{role}_token": token for role, token in vocab.special_tokens.items() if token is not None}
    write_json(out_dir / SPECIAL_TOKENS_MAP_FILE, special)
    write_json(out_dir / TOKENIZER_CONFIG_FILE, {"tokenizer_class": "PreTrainedTokenizerFast",
                                                 "model_max_length": model_max_length, **special})


def _tokenizer_json(vocab: Vocab, lowercase: bool) -> str | None:
    """The `tokenizers` serialisation of BertTokenizer on this vocabulary, or None without the package."""
    try:
        from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
        from tokenizers.models import WordPiece
    except ImportError:
        return None
    ids = {token: i for i, token in enumerate(vocab.tokens)}  # duplicates: the last line wins, as in vocab.txt
    tokenizer = Tokenizer(WordPiece(ids, unk_token="[UNK]", max_input_chars_per_word=100))
    tokenizer.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                                      lowercase=lowercase)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0", pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab.special.cls), ("[SEP]", vocab.special.sep)])
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    # Special tokens are matched in the raw text, case-sensitively, before normalisation: as our tokenizer does.
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS])
    return tokenizer.to_str(pretty=True)


def hf_lowercase(path: Path) -> bool:
    """Whether a Hugging Face directory's tokenizer lowercases: tokenizer_config.json's do_lower_case, else
    inferred from vocab.txt (uncased when no token has an uppercase letter)."""
    config = read_json(Path(path) / TOKENIZER_CONFIG_FILE) or {}
    if "do_lower_case" in config:
        return bool(config["do_lower_case"])
    return Vocab.load(Path(path) / VOCAB_FILE).lowercase


def hf_model_max_length(path: Path) -> int | None:
    """tokenizer_config.json's model_max_length, or None when it is absent or transformers' "unknown" sentinel."""
    value = (read_json(Path(path) / TOKENIZER_CONFIG_FILE) or {}).get("model_max_length")
    # transformers writes a huge sentinel (1e30) when no length is known.
    return int(value) if isinstance(value, (int, float)) and 0 < value < 1e9 else None


def read_json(path: Path) -> dict | None:
    """A JSON object file, or None when the file is missing or holds no object; BertError when it is not JSON."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise BertError(f"{path} is not valid JSON ({exc})") from None
    return data if isinstance(data, dict) else None


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
