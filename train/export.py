"""Trained weights in and out: open a run (or a Hugging Face BERT directory) with its vocabulary, and
`berttrain export`, which writes a directory that `transformers` opens with no code of ours.

`load_pretrained` is what predict, finetune and report start from; `load_hf_dir` reads a Hugging Face BERT directory
(one we exported or a published checkpoint) into our parameter names, for --init-from.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from prep.errors import BertError
from prep.shards import file_sha256, read_manifest
from prep.vocab import load_tokenizer, load_vocab_record, resolve_vocab_file
from prep.wordpiece import SPECIAL_TOKENS, Vocab
from train import checkpoint as ckpt
from train.model import (HF_TIED_KEYS, BertForPretraining, ModelConfig, from_hf_state_dict, hf_config_dict,
                         to_hf_state_dict)

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
EXPORT_FORMAT = "berttrain-hf-export"
WEIGHT_FORMATS = ("auto", "safetensors", "pytorch")
# transformers' names of the special tokens, in SPECIAL_TOKENS order.
HF_SPECIAL_NAMES = ("pad_token", "unk_token", "cls_token", "sep_token", "mask_token")
MLM_HEAD_PREFIX = "cls.predictions."
NSP_PREFIXES = ("cls.seq_relationship.", "bert.pooler.")


@dataclass(frozen=True)
class Pretrained:
    """Weights of a trained BERT (our parameter names) with the vocabulary its token ids refer to."""

    config: ModelConfig
    state: dict[str, torch.Tensor]
    vocab_file: Path
    lowercase: bool
    source: str
    """Where the weights come from, for messages: "checkpoint runs/x/checkpoints/step-00000300" or a directory."""
    step: int | None = None
    """Pretraining steps behind the weights, when known."""
    max_len: int | None = None
    """Length of the rows the model was trained on, when known: positions beyond it never saw training."""
    checkpoint: Path | None = None
    """The checkpoint directory, for weights from a run."""
    shards: Path | None = None
    """The dataset the checkpoint was trained on, as its info.json records it."""

    @property
    def vocab(self) -> Vocab:
        return Vocab.load(self.vocab_file, lowercase=self.lowercase)

    def tokenizer(self):
        """Our tokenizer for the vocabulary (WordPiece, or SentencePiece when spm.model lies beside vocab.txt)."""
        return load_tokenizer(self.vocab_file, lowercase=self.lowercase)

    def model(self, device: torch.device | str = "cpu") -> BertForPretraining:
        """A BertForPretraining holding the weights, in eval mode, on `device`."""
        model = BertForPretraining(self.config)
        model.load_state_dict(self.state)
        return model.to(device).eval()

    @property
    def usable_len(self) -> int:
        """The longest input worth feeding: the trained row length where known, else the position table."""
        return min(self.max_len or self.config.max_positions, self.config.max_positions)


def is_hf_dir(path: Path) -> bool:
    """True for a Hugging Face model directory (its config.json names a model_type); a run's config.json does not."""
    config_file = Path(path) / HF_CONFIG_FILE
    if not config_file.is_file():
        return False
    try:
        return "model_type" in json.loads(config_file.read_text(encoding="utf-8"))
    except ValueError:
        return False


def load_pretrained(source: Path, checkpoint: Path | None = None, vocab: Path | None = None,
                    require_mlm_head: bool = True) -> Pretrained:
    """The weights and vocabulary of a run directory (its latest complete checkpoint, or `checkpoint`), a
    checkpoint directory, or a Hugging Face BERT directory.

    A run does not copy vocab.txt: it is read from the shards the checkpoint was trained on (info.json's
    `shards`) and checked against the checkpoint's vocab_sha256. `vocab` (a vocab.txt or a directory holding one)
    replaces it, for shards that moved; it must have the same sha256.
    """
    source = Path(source)
    if checkpoint is None and is_hf_dir(source):
        config, state, vocab_file = load_hf_dir(source, require_mlm_head=require_mlm_head)
        if vocab is not None:
            vocab_file = _same_vocab(resolve_vocab_file(vocab), Vocab.load(vocab_file).sha256, str(source))
        record = _read_json(source / EXPORT_RECORD_FILE) or {}
        return Pretrained(config, state, vocab_file, hf_lowercase(source), f"Hugging Face directory {source}",
                          step=record.get("step"), max_len=_hf_model_max_length(source))
    if checkpoint is not None:
        where = ckpt.resolve_checkpoint(Path(checkpoint), "--checkpoint")
    elif not source.exists():
        raise BertError(f"--run {source}: no such run, checkpoint or Hugging Face directory")
    else:
        where = ckpt.resolve_checkpoint(source, "--run")
    info = ckpt.read_info(where)
    config = ModelConfig.from_dict(ckpt.load_model_config(where))
    state = {_bare_name(k): v for k, v in ckpt.load_weights(where).items()}
    sha256 = info.get("vocab_sha256")
    if vocab is not None:
        vocab_file = _same_vocab(resolve_vocab_file(vocab), sha256, f"checkpoint {where}")
        record = load_vocab_record(vocab_file)
        lowercase = bool(record["lowercase"]) if record is not None else _shards_lowercase(info)
    else:
        vocab_file, lowercase = _run_vocab(info, where)
    return Pretrained(config, state, vocab_file, lowercase, f"checkpoint {where}", step=info.get("step"),
                      max_len=info.get("max_len"), checkpoint=where,
                      shards=Path(info["shards"]) if "shards" in info else None)


def _bare_name(name: str) -> str:
    """A parameter name without torch.compile's `_orig_mod.` or DDP's `module.` wrappers."""
    for prefix in ("_orig_mod.", "module."):
        while name.startswith(prefix):
            name = name[len(prefix):]
    return name.replace("._orig_mod.", ".")


def _run_vocab(info: dict, where: Path) -> tuple[Path, bool]:
    """(vocab.txt, lowercase) of the shards a checkpoint was trained on, checked against its vocab_sha256."""
    if "shards" not in info:
        raise BertError(f"checkpoint {where} does not say which shards it was trained on: pass --vocab "
                        f"(the vocab.txt of its shards)")
    shards = Path(info["shards"])
    try:
        manifest = read_manifest(shards)
    except BertError:
        raise BertError(f"the vocabulary of checkpoint {where} lives in its shards {shards}, which are not there "
                        f"any more: pass --vocab with the vocab.txt the shards were made with") from None
    vocab_file = _same_vocab(shards / manifest["vocab"]["file"], info.get("vocab_sha256"), f"checkpoint {where}")
    return vocab_file, bool(manifest["vocab"]["lowercase"])


def _shards_lowercase(info: dict) -> bool:
    try:
        return bool(read_manifest(Path(info["shards"]))["vocab"]["lowercase"])
    except (BertError, KeyError):
        raise BertError("the --vocab given has no vocab.json saying whether it is cased, and the run's shards are "
                        "gone: pass the directory `bertprep vocab` wrote") from None


def _same_vocab(vocab_file: Path, sha256: str | None, what: str) -> Path:
    if not vocab_file.is_file():
        raise BertError(f"the vocabulary of {what} ({vocab_file}) is missing: pass --vocab")
    actual = file_sha256(vocab_file)
    if sha256 is not None and actual != sha256:
        raise BertError(f"{vocab_file} (sha256 {actual[:12]}…) is not the vocabulary {what} was trained with "
                        f"(sha256 {sha256[:12]}…): token ids would mean other words; pass the right --vocab")
    return vocab_file


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise BertError(f"{path} is not valid JSON ({exc})") from None
    return data if isinstance(data, dict) else None


# --- Hugging Face directories in ------------------------------------------------------------------------------

def load_hf_dir(path: Path, require_mlm_head: bool = True) -> tuple[ModelConfig, dict[str, torch.Tensor], Path]:
    """(model config, state dict in our names, vocab.txt) of a Hugging Face BERT directory.

    Reads config.json, the weights (model.safetensors, pytorch_model.bin, or their sharded indexes) and vocab.txt.
    Takes BertForMaskedLM and BertForPreTraining checkpoints (the NSP head comes along as config.nsp), legacy
    `gamma`/`beta` LayerNorm names and bare BertModel names. Vocabulary rows beyond vocab.txt's tokens are dropped.
    Without a masked-LM head it raises BertError, unless `require_mlm_head` is false (fine-tuning), when the head
    starts from BERT's initialisation. Raises BertError for any other architecture or a weight it cannot place.
    """
    path = Path(path)
    hf_config = _read_hf_config(path)
    vocab_file = path / VOCAB_FILE
    if not vocab_file.is_file():
        raise BertError(f"{path} has no {VOCAB_FILE}: berttrain needs the WordPiece vocabulary the model was "
                        f"trained with")
    vocab_tokens = len(Vocab.load(vocab_file))
    hf_state = {_hf_name(k): v for k, v in _read_hf_weights(path).items()}
    nsp = "cls.seq_relationship.weight" in hf_state
    if not nsp:  # a pooler without its classifier is a BertModel's; our MLM-only model has no place for it
        hf_state = {k: v for k, v in hf_state.items() if not k.startswith(NSP_PREFIXES)}
    vocab_size = int(hf_config["vocab_size"])
    if vocab_tokens > vocab_size:
        raise BertError(f"{vocab_file} has {vocab_tokens} tokens but {path / HF_CONFIG_FILE} says vocab_size "
                        f"{vocab_size}: they do not belong together")
    config = ModelConfig(
        vocab_size=vocab_tokens,
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
        nsp=nsp,
    )
    # Rows past vocab.txt (a vocab_size padded up in config.json) are ids no tokenizer produces.
    for name in ("bert.embeddings.word_embeddings.weight", "cls.predictions.bias", "cls.predictions.decoder.weight",
                 "cls.predictions.decoder.bias"):
        if name in hf_state and hf_state[name].shape[0] != vocab_tokens:
            hf_state[name] = hf_state[name][:vocab_tokens]
    if not any(k.startswith(MLM_HEAD_PREFIX) for k in hf_state):
        if require_mlm_head:
            raise BertError(f"{path} holds a bare BertModel without the masked-LM head (cls.predictions.*): "
                            f"continuing pretraining needs BertForMaskedLM or BertForPreTraining weights")
        fresh = to_hf_state_dict(BertForPretraining(config).state_dict(), config)
        hf_state.update({k: v for k, v in fresh.items() if k.startswith(MLM_HEAD_PREFIX) and k not in HF_TIED_KEYS})
    return config, from_hf_state_dict(hf_state, config), vocab_file


def hf_lowercase(path: Path) -> bool:
    """Whether a Hugging Face directory's tokenizer lowercases: tokenizer_config.json's do_lower_case, else
    inferred from vocab.txt (uncased when no token has an uppercase letter)."""
    config = _read_json(Path(path) / TOKENIZER_CONFIG_FILE) or {}
    if "do_lower_case" in config:
        return bool(config["do_lower_case"])
    return Vocab.load(Path(path) / VOCAB_FILE).lowercase


def _hf_model_max_length(path: Path) -> int | None:
    value = (_read_json(Path(path) / TOKENIZER_CONFIG_FILE) or {}).get("model_max_length")
    # transformers writes a huge sentinel (1e30) when no length is known.
    return int(value) if isinstance(value, (int, float)) and 0 < value < 1e9 else None


def _read_hf_config(path: Path) -> dict:
    if not path.is_dir():
        raise BertError(f"no such directory {path}")
    config = _read_json(path / HF_CONFIG_FILE)
    if config is None:
        raise BertError(f"{path} has no {HF_CONFIG_FILE}: it is not a Hugging Face model directory")
    if config.get("model_type") != "bert":
        raise BertError(f"{path} holds a {config.get('model_type')!r} model; berttrain reads BERT (model_type "
                        f"'bert') only")
    if config.get("hidden_act", "gelu") != "gelu":
        raise BertError(f"{path} uses hidden_act {config['hidden_act']!r}; berttrain's BERT uses exact 'gelu'")
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise BertError(f"{path} uses {config['position_embedding_type']!r} position embeddings; berttrain's BERT "
                        f"uses 'absolute'")
    if config.get("is_decoder") or config.get("add_cross_attention"):
        raise BertError(f"{path} is a BERT decoder (cross-attention); berttrain reads encoders only")
    return config


def _read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the directory's weights as float32 (fp16/bf16 checkpoints are widened), by name."""
    files = []
    for index_name in (SAFETENSORS_INDEX_FILE, PYTORCH_INDEX_FILE):
        index = _read_json(path / index_name)
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


# --- Hugging Face directories out -----------------------------------------------------------------------------

def export_hf(source: Path, out_dir: Path, checkpoint: Path | None = None, vocab: Path | None = None,
              weights_format: str = "auto", force: bool = False) -> dict:
    """`berttrain export`: a directory that `transformers` opens with no code of ours; returns its record.

    Writes config.json (BertForMaskedLM, or BertForPreTraining for a model with the NSP head), the weights
    (model.safetensors, or pytorch_model.bin when safetensors is not installed or `weights_format` is "pytorch"),
    vocab.txt, tokenizer_config.json, special_tokens_map.json, tokenizer.json when `tokenizers` is installed,
    and berttrain.json (where the export came from). Every weight must land under its transformers name, checked
    against transformers' own model when it is installed. Built in a hidden sibling directory, renamed when
    complete.
    """
    if weights_format not in WEIGHT_FORMATS:
        raise BertError(f"--format must be one of {', '.join(WEIGHT_FORMATS)}, got {weights_format!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not force:
        raise BertError(f"{out_dir} already exists: pass --force to replace it, or another --hf directory")
    pretrained = load_pretrained(source, checkpoint, vocab)
    config = pretrained.config
    if config.norm != "post":
        raise BertError(f"{pretrained.source} is a pre-LN model (--norm pre): transformers' BERT is post-LN, so "
                        f"it has no BertForMaskedLM equivalent; export needs a run trained with --norm post")
    vocab_obj = pretrained.vocab
    if Vocab.sentencepiece_style(vocab_obj.tokens):
        raise BertError(f"the vocabulary of {pretrained.source} is a SentencePiece one (unigram/bpe), which "
                        f"transformers' BertTokenizer cannot read; export needs a WordPiece vocabulary")
    hf_state = to_hf_state_dict(pretrained.state, config)
    # safetensors refuses tensors sharing memory; transformers re-ties the aliases when it loads.
    weights = {k: v.contiguous() for k, v in hf_state.items() if k not in HF_TIED_KEYS}
    hf_config = hf_config_dict(config)
    _check_with_transformers(weights, hf_config)
    if weights_format == "auto":
        weights_format = "safetensors" if _has_safetensors() else "pytorch"
    elif weights_format == "safetensors" and not _has_safetensors():
        raise BertError("--format safetensors needs the safetensors package: pip install safetensors")

    model_max_length = pretrained.usable_len
    partial = out_dir.parent / f".{out_dir.name}.partial"
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    try:
        if weights_format == "safetensors":
            from safetensors.torch import save_file

            weights_file = SAFETENSORS_FILE
            save_file(weights, str(partial / weights_file), metadata={"format": "pt"})
        else:
            weights_file = PYTORCH_FILE
            torch.save(weights, partial / weights_file)
        shutil.copyfile(pretrained.vocab_file, partial / VOCAB_FILE)
        _write_json(partial / HF_CONFIG_FILE, hf_config)
        special = dict(zip(HF_SPECIAL_NAMES, SPECIAL_TOKENS))
        _write_json(partial / SPECIAL_TOKENS_MAP_FILE, special)
        _write_json(partial / TOKENIZER_CONFIG_FILE, {
            "tokenizer_class": "BertTokenizer",
            "do_lower_case": pretrained.lowercase,
            "strip_accents": None,  # None: strip exactly when lowercasing, as our tokenizer does
            "tokenize_chinese_chars": True,
            "model_max_length": model_max_length,
            **special,
        })
        tokenizer_json = _tokenizer_json(vocab_obj, pretrained.lowercase)
        if tokenizer_json is not None:
            (partial / TOKENIZER_FILE).write_text(tokenizer_json, encoding="utf-8")
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
        _write_json(partial / EXPORT_RECORD_FILE, record)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if out_dir.is_dir():
        shutil.rmtree(out_dir)
    elif out_dir.exists():
        out_dir.unlink()
    os.replace(partial, out_dir)
    return {**record, "out_dir": str(out_dir), "files": sorted(p.name for p in out_dir.iterdir())}


def _has_safetensors() -> bool:
    return importlib.util.find_spec("safetensors") is not None


def _check_with_transformers(weights: dict[str, torch.Tensor], hf_config: dict) -> None:
    """Every weight we write must be one transformers' model has, of its shape, and none may be missing: it
    would only warn and start a missing one at random. Skipped when transformers is not installed."""
    try:
        import transformers
    except ImportError:
        return
    model_class = getattr(transformers, hf_config["architectures"][0])
    with torch.device("meta"):  # shapes and names only, no memory
        model = model_class(transformers.BertConfig(**hf_config))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()
                if k not in HF_TIED_KEYS and not k.endswith(("position_ids", "token_type_ids"))}
    written = {k: tuple(v.shape) for k, v in weights.items()}
    missing, unknown = sorted(set(expected) - set(written)), sorted(set(written) - set(expected))
    wrong = sorted(k for k in set(expected) & set(written) if expected[k] != written[k])
    if missing or unknown or wrong:
        raise BertError(f"the export does not match transformers {transformers.__version__}'s "
                        f"{hf_config['architectures'][0]}: missing {missing[:5]}, unknown {unknown[:5]}, wrong shape "
                        f"{wrong[:5]}; transformers would start those weights at random")


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


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")

