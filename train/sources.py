"""Where a run's model comes from (a named size, a checkpoint or run of ours, a Hugging Face directory), and the
check that the shards fit it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from prep.errors import BertError
from prep.shards import FORMAT_VERSION, Dataset, file_sha256
from train import checkpoint as ckpt
from train.config import TrainConfig
from train.hf.files import is_hf_dir, load_hf_dir
from train.arch import arch_of, config_for_size, model_config_from_dict
from train.model import ModelConfig
from train.modernbert import ModernBertConfig


@dataclass(frozen=True)
class ModelSource:
    """The model a run starts from."""

    config: ModelConfig | ModernBertConfig
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
    """The model a new run starts from: --init-from's weights (BERT's position table grown to the shards' row
    length), or a fresh --size of --arch."""
    vocab, nsp = dataset.vocab, dataset.has_nsp
    if nsp and config.modern:
        raise BertError(f"{dataset.path} has NSP labels, and --arch modernbert has no segments or NSP head: make "
                        f"shards without --nsp")
    if config.init_from:
        path = Path(config.init_from)
        if is_hf_dir(path):  # a published Hugging Face model: weights, config.json and its vocabulary
            saved, state, vocab_file = load_hf_dir(path)
            source, vocab_sha256 = path, file_sha256(vocab_file)
        else:
            source = ckpt.resolve_checkpoint(path)
            saved = model_config_from_dict(ckpt.load_model_config(source))
            state = ckpt.load_weights(source)
            vocab_sha256 = ckpt.read_info(source).get("vocab_sha256")
        if arch_of(saved) != config.arch:
            raise BertError(f"--init-from {source} holds a {arch_of(saved)} model: pass --arch {arch_of(saved)}")
        return _continued(config, dataset, saved, state, f"--init-from {source}", vocab_sha256)
    max_positions = config.max_positions or max(512, dataset.max_len)
    fields = dict(pad_id=int(vocab["special"]["pad"]), max_positions=max_positions, **config.model_overrides())
    if not config.modern:
        fields["nsp"] = nsp
    model_config = config_for_size(config.arch, config.size, int(vocab["size"]), **fields)
    return ModelSource(model_config, None, f"--size {config.size}", None)


def _continued(config: TrainConfig, dataset: Dataset, saved, state: dict, name: str,
               vocab_sha256: str | None) -> ModelSource:
    """The weights of another run or model, with this run's dropout, heads and row length."""
    saved = saved.with_dropout(config.model_dropout)
    if config.modern:  # rotary positions need no table: the longest row is only a number
        longest = max(saved.max_positions, dataset.max_len)
        return ModelSource(dataclasses.replace(saved, max_positions=longest), state, name, vocab_sha256)
    nsp = dataset.has_nsp
    model_config = dataclasses.replace(saved, nsp=nsp)
    if not nsp:
        state = {k: v for k, v in state.items() if not k.startswith(("pooler.", "nsp_head."))}
    if dataset.max_len > model_config.max_positions:
        state, model_config = grow_positions(state, model_config, dataset.max_len)
    return ModelSource(model_config, state, name, vocab_sha256)


def resumed_model(run_dir: Path, checkpoint: Path) -> ModelSource:
    """The model of a run being resumed: its checkpoint's config and weights."""
    return ModelSource(model_config_from_dict(ckpt.load_model_config(checkpoint)), ckpt.load_weights(checkpoint),
                       f"run {run_dir}", ckpt.read_info(checkpoint).get("vocab_sha256"))
