"""Where a run's model comes from (a named size, a checkpoint or run of ours, a Hugging Face directory), and the
check that the shards fit it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from prep.errors import BertError
from prep.shards import FORMAT_VERSION, Dataset, file_sha256
from train import checkpoint as ckpt
from train.config import TrainConfig
from train.hf.files import is_hf_dir, load_hf_dir
from train.model import ModelConfig


@dataclass(frozen=True)
class ModelSource:
    """The model a run starts from."""

    config: ModelConfig
    weights: dict | None
    """Initial weights, or None for a fresh initialisation."""
    name: str
    """Where it comes from, for messages: "--size small", "--init-from runs/a", "run runs/a"."""
    vocab_sha256: str | None
    """The sha256 of the vocabulary it was trained with, when known."""


def check_dataset(dataset: Dataset, model_config: ModelConfig, vocab_sha256: str | None, source: str) -> None:
    """Refuses shards that the model cannot read: another vocabulary, or rows longer than its position table.

    `source` names where the model's vocabulary comes from, for the message (e.g. "run runs/run3").
    """
    if dataset.manifest.get("version") != FORMAT_VERSION:  # open_dataset checks this too; kept for clarity
        raise BertError(f"{dataset.path}: shard format version {dataset.manifest.get('version')}, this berttrain "
                        f"reads version {FORMAT_VERSION}")
    if vocab_sha256 is not None and vocab_sha256 != dataset.vocab["sha256"]:
        raise BertError(
            f"the vocabulary of {dataset.path} (sha256 {dataset.vocab['sha256'][:12]}…) is not the one of {source} "
            f"(sha256 {vocab_sha256[:12]}…): token ids would mean other words; make the shards with the same "
            f"vocab.txt (`bertprep shard --vocab ...`)"
        )
    if dataset.vocab["size"] != model_config.vocab_size:
        raise BertError(f"{dataset.path} has a vocabulary of {dataset.vocab['size']} tokens but the model of "
                        f"{source} has {model_config.vocab_size}")
    if dataset.max_len > model_config.max_positions:
        raise BertError(
            f"{dataset.path} has rows of {dataset.max_len} tokens but the model of {source} has only "
            f"{model_config.max_positions} positions: make shards with --max-len {model_config.max_positions} or "
            f"less, or start a new run with --init-from (which grows the position table)"
        )


def grow_positions(state: dict, model_config: ModelConfig, max_positions: int) -> tuple[dict, ModelConfig]:
    """Weights and config with a position table of `max_positions` rows: the trained rows kept, new rows drawn
    as at initialisation (phase 2 at 512 tokens after phase 1 at 128)."""
    key = "encoder.embeddings.position.weight"
    old = state[key]
    new = torch.empty((max_positions, old.shape[1]), dtype=old.dtype).normal_(0.0, 0.02)
    new[: old.shape[0]] = old
    return {**state, key: new}, ModelConfig.from_dict({**model_config.as_dict(), "max_positions": max_positions})


def initial_model(config: TrainConfig, dataset: Dataset) -> ModelSource:
    """The model a new run starts from: --init-from's weights (grown to the shards' row length), or a fresh --size."""
    vocab, nsp = dataset.vocab, dataset.has_nsp
    if config.init_from:
        path = Path(config.init_from)
        if is_hf_dir(path):  # a published Hugging Face BERT: weights, config.json and vocab.txt
            saved, state, vocab_file = load_hf_dir(path)
            source, vocab_sha256 = path, file_sha256(vocab_file)
        else:
            source = ckpt.resolve_checkpoint(path)
            saved = ModelConfig.from_dict(ckpt.load_model_config(source))
            state = ckpt.load_weights(source)
            vocab_sha256 = ckpt.read_info(source).get("vocab_sha256")
        dropout = config.model_dropout
        fields = {**saved.as_dict(), "dropout": dropout, "attention_dropout": dropout, "nsp": nsp}
        model_config = ModelConfig.from_dict(fields)
        if not nsp:
            state = {k: v for k, v in state.items() if not k.startswith(("pooler.", "nsp_head."))}
        if dataset.max_len > model_config.max_positions:
            state, model_config = grow_positions(state, model_config, dataset.max_len)
        return ModelSource(model_config, state, f"--init-from {source}", vocab_sha256)
    max_positions = config.max_positions or max(512, dataset.max_len)
    model_config = ModelConfig.from_size(config.size, int(vocab["size"]), pad_id=int(vocab["special"]["pad"]),
                                         nsp=nsp, max_positions=max_positions, **config.model_overrides())
    return ModelSource(model_config, None, f"--size {config.size}", None)


def resumed_model(run_dir: Path, checkpoint: Path) -> ModelSource:
    """The model of a run being resumed: its checkpoint's config and weights."""
    return ModelSource(ModelConfig.from_dict(ckpt.load_model_config(checkpoint)), ckpt.load_weights(checkpoint),
                       f"run {run_dir}", ckpt.read_info(checkpoint).get("vocab_sha256"))
