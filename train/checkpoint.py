"""Checkpoints: `RUN/checkpoints/step-00001000/` holding the weights, the model config beside them, the training
state, and a completion marker written last.

A save goes to a hidden `.step-00001000.partial` directory that is renamed into place when every file is on disk,
then the marker is written (temporary name, rename). A checkpoint without its marker, or a partial directory, is a
save that was killed halfway: resume and `--init-from` never read it, the next prune deletes it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from prep.errors import BertError
from prep.outputs import remove, staged_dir, write_atomic

CHECKPOINTS_DIR = "checkpoints"
MODEL_WEIGHTS_FILE = "model.pt"  # the model's state dict, nothing else: all that --init-from needs
MODEL_CONFIG_FILE = "model.json"  # ModelConfig.as_dict()
TRAINING_STATE_FILE = "state.pt"  # optimizer, scaler, RNGs, data position: what --resume needs besides weights
INFO_FILE = "info.json"  # step, vocabulary and data facts, readable without torch
COMPLETE_MARKER = "COMPLETE"
BEST_FILE = "best.json"  # in checkpoints/: which checkpoint has the lowest validation loss
_NAME_RE = re.compile(r"step-(\d{8,})")

# Keys of the training state dict.
KEY_STEP = "step"
KEY_OPTIMIZER = "optimizer"
KEY_SCALER = "scaler"
KEY_RNG = "rng"
KEY_DATA = "data"
KEY_PROGRESS = "progress"


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


def is_complete(path: Path) -> bool:
    return (Path(path) / COMPLETE_MARKER).is_file()


def _fsync_write(path: Path, write) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _write_json_atomic(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True), fsync=True)


def save_checkpoint(run_dir: Path, step: int, model_state: dict, model_config: dict, training_state: dict,
                    info: dict) -> Path:
    """Writes checkpoint `step` of the run; returns its directory. Replaces an incomplete one of the same step."""
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    remove(final)  # what an earlier save of this step left, complete or not
    with staged_dir(final) as partial:
        _fsync_write(partial / MODEL_WEIGHTS_FILE, lambda f: torch.save(model_state, f))
        _fsync_write(partial / TRAINING_STATE_FILE, lambda f: torch.save({KEY_STEP: step, **training_state}, f))
        _write_json_atomic(partial / MODEL_CONFIG_FILE, model_config)
        _write_json_atomic(partial / INFO_FILE, {"step": step, **info})
    _write_json_atomic(final / COMPLETE_MARKER, {"step": step})
    return final


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every complete checkpoint of the run, by step."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _NAME_RE.fullmatch(path.name)
        if match and path.is_dir() and is_complete(path):
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def resolve_checkpoint(path: Path, what: str = "--init-from") -> Path:
    """A checkpoint directory from a run directory (its latest complete checkpoint) or a checkpoint directory."""
    path = Path(path)
    if (path / MODEL_WEIGHTS_FILE).is_file() or _NAME_RE.fullmatch(path.name):
        if not is_complete(path):
            raise BertError(f"{what} {path}: the checkpoint is incomplete (its save was interrupted); "
                            f"use an earlier one from {path.parent}")
        return path
    if not path.is_dir():
        raise BertError(f"{what} {path}: no such run or checkpoint directory")
    latest = latest_checkpoint(path)
    if latest is None:
        raise BertError(f"{what} {path}: the run has no complete checkpoint in {checkpoints_dir(path)}")
    return latest


def read_info(checkpoint: Path) -> dict:
    return json.loads((Path(checkpoint) / INFO_FILE).read_text())


def load_model_config(checkpoint: Path) -> dict:
    return json.loads((Path(checkpoint) / MODEL_CONFIG_FILE).read_text())


def load_weights(checkpoint: Path, map_location="cpu") -> dict:
    return torch.load(Path(checkpoint) / MODEL_WEIGHTS_FILE, map_location=map_location, weights_only=True)


def load_training_state(checkpoint: Path, map_location="cpu") -> dict:
    return torch.load(Path(checkpoint) / TRAINING_STATE_FILE, map_location=map_location, weights_only=True)


def read_best(run_dir: Path) -> dict | None:
    """{"step", "mlm_loss"} of the best checkpoint so far, or None."""
    path = checkpoints_dir(run_dir) / BEST_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def write_best(run_dir: Path, step: int, mlm_loss: float) -> None:
    _write_json_atomic(checkpoints_dir(run_dir) / BEST_FILE, {"step": step, "mlm_loss": mlm_loss,
                                                              "checkpoint": checkpoint_name(step)})


def prune(run_dir: Path, keep_last: int) -> list[Path]:
    """Deletes all but the `keep_last` latest complete checkpoints and the best one, and every interrupted save
    older than the latest complete checkpoint; returns what it deleted."""
    complete = list_checkpoints(run_dir)
    best = read_best(run_dir)
    keep = {step for step, _ in complete[len(complete) - keep_last:]} if keep_last else set()
    if best is not None:
        keep.add(best["step"])
    latest = complete[-1][0] if complete else -1
    deleted = []
    for step, path in complete:
        if step not in keep:
            shutil.rmtree(path)
            deleted.append(path)
    root = checkpoints_dir(run_dir)
    for path in root.iterdir() if root.is_dir() else ():
        match = _NAME_RE.fullmatch(path.name.removeprefix(".").removesuffix(".partial"))
        if match and int(match.group(1)) < latest and (path.name.startswith(".") or not is_complete(path)):
            shutil.rmtree(path, ignore_errors=True)
            deleted.append(path)
    return deleted
