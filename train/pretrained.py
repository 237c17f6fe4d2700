"""Trained weights with their vocabulary, from a run, a checkpoint or a Hugging Face directory: what predict,
finetune, report and export start from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from prep.errors import BertError
from prep.shards import file_sha256, read_manifest
from prep.vocab import load_tokenizer, load_vocab_record, resolve_vocab_file
from prep.wordpiece import Vocab
from train import checkpoint as ckpt
from train.hf.files import (EXPORT_RECORD_FILE, hf_lowercase, hf_model_max_length, is_hf_dir, load_hf_dir,
                            read_json)
from train.hf.renaming import strip_wrappers
from train.arch import model_config_from_dict, new_model
from train.model import ModelConfig
from train.modernbert import ModernBertConfig


@dataclass(frozen=True)
class Pretrained:
    """Weights of a trained BERT (our parameter names) with the vocabulary its token ids refer to."""

    config: ModelConfig | ModernBertConfig
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

    def model(self, device: torch.device | str = "cpu") -> torch.nn.Module:
        """The pretraining model of its architecture holding the weights, in eval mode, on `device`."""
        model = new_model(self.config)
        model.load_state_dict(self.state)
        return model.to(device).eval()

    @property
    def usable_len(self) -> int:
        """The longest input worth feeding: the trained row length where known, else the position table."""
        return min(self.max_len or self.config.max_positions, self.config.max_positions)


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
        record = read_json(source / EXPORT_RECORD_FILE) or {}
        return Pretrained(config, state, vocab_file, hf_lowercase(source), f"Hugging Face directory {source}",
                          step=record.get("step"), max_len=hf_model_max_length(source))
    if checkpoint is not None:
        where = ckpt.resolve_checkpoint(Path(checkpoint), "--checkpoint")
    elif not source.exists():
        raise BertError(f"--run {source}: no such run, checkpoint or Hugging Face directory")
    else:
        where = ckpt.resolve_checkpoint(source, "--run")
    info = ckpt.read_info(where)
    config = model_config_from_dict(ckpt.load_model_config(where))
    state = {strip_wrappers(k): v for k, v in ckpt.load_weights(where).items()}
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
