"""Checkpoints: `RUN/checkpoints/step-00001000/` holding the weights, the model config beside them, the training
state, and a completion marker written last that proves the rest.

A save goes to a hidden `.step-00001000.partial-PID-HEX` directory that is renamed into place when every file is on
disk, then the marker is written (temporary name, rename): `COMPLETE` = {"step", "files": {name: {"bytes",
"sha256"}}}. A checkpoint without its marker, or a partial directory, is a save that was killed halfway: nothing
reads it, the next prune or resume deletes it. A save that fails (a full disk) deletes what it wrote and raises; the
checkpoints before it stay as they were. A checkpoint whose files no longer match its marker (truncated, changed,
missing) is damaged: commands that look for the newest checkpoint of a run skip it and say so; one named explicitly
is an error. Markers written before they listed files (`{"step"}` alone) still count; their torch files are checked
by the zip CRCs torch writes, their JSON files by parsing.
"""

from __future__ import annotations

import json
import os
import re
import sys
import zipfile
from pathlib import Path
from typing import Collection

import torch

from prep.errors import BertError
from prep.locks import process_alive
from prep.outputs import open_atomic, remove, staged_dir, staging_owner, write_atomic
from prep.shards import file_sha256

CHECKPOINTS_DIR = "checkpoints"
MODEL_WEIGHTS_FILE = "model.pt"  # the model's state dict, nothing else: all that --init-from needs
MODEL_CONFIG_FILE = "model.json"  # ModelConfig.as_dict()
TRAINING_STATE_FILE = "state.pt"  # optimizer, scaler, RNGs, data position: what --resume needs besides weights
INFO_FILE = "info.json"  # step, vocabulary and data facts, readable without torch
COMPLETE_MARKER = "COMPLETE"
BEST_FILE = "best.json"  # in checkpoints/: which checkpoint has the lowest validation loss
DAMAGED_SUFFIX = ".damaged"  # a damaged checkpoint that --resume set aside, as `step-00001000.damaged`
_NAME_RE = re.compile(r"step-(\d{8,})")
_TEMPORARY_RE = re.compile(r"\..+\.tmp-\d+")  # prep.outputs.temporary_name of a write that was killed

WEIGHT_FILES = (MODEL_WEIGHTS_FILE, MODEL_CONFIG_FILE, INFO_FILE)
"""What reading a checkpoint's model takes (eval, predict, export, finetune, report, --init-from)."""
ALL_FILES = (*WEIGHT_FILES, TRAINING_STATE_FILE)
"""What every checkpoint holds, and --resume reads."""

# Keys of the training state dict.
KEY_STEP = "step"
KEY_OPTIMIZER = "optimizer"
KEY_SCALER = "scaler"
KEY_RNG = "rng"
KEY_DATA = "data"
KEY_PROGRESS = "progress"


class DamagedCheckpoint(BertError):
    """A complete checkpoint whose files do not match its marker (or, for an old marker, cannot be read)."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"checkpoint {path} is damaged: {reason}")
        self.path, self.reason = Path(path), reason


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


def is_complete(path: Path) -> bool:
    return (Path(path) / COMPLETE_MARKER).is_file()


class _KeepsWriteError:
    """A file whose failed write keeps its OSError, which torch's zip writer turns into a RuntimeError without it."""

    def __init__(self, raw):
        self.raw, self.error = raw, None

    def write(self, data) -> int:
        try:
            return self.raw.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.raw.flush()


def save_torch_file(obj, path: Path, fsync: bool = False) -> None:
    """torch.save(obj) to `path`, flushed to disk with `fsync`; a failed write (a full disk) raises its OSError,
    naming `path`, rather than torch's RuntimeError."""
    with open_atomic(path, fsync=fsync) as raw:
        f = _KeepsWriteError(raw)
        try:
            torch.save(obj, f)
        except RuntimeError:
            if f.error is None:
                raise
            raise f.error from None


def _write_json_atomic(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True), fsync=True)


def _file_records(directory: Path) -> dict:
    """{name: {"bytes", "sha256"}} of every file in `directory`."""
    return {path.name: {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
            for path in sorted(directory.iterdir()) if path.is_file()}


def _remove_checkpoint(path: Path) -> None:
    """Deletes a checkpoint directory marker first, so that a delete killed halfway leaves an incomplete one."""
    (path / COMPLETE_MARKER).unlink(missing_ok=True)
    remove(path)


def save_checkpoint(run_dir: Path, step: int, model_state: dict, model_config: dict, training_state: dict,
                    info: dict) -> Path:
    """Writes checkpoint `step` of the run; returns its directory. Replaces an incomplete one of the same step."""
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    if final.is_dir():
        _remove_checkpoint(final)  # what an earlier save of this step left, complete or not
    with staged_dir(final) as partial:  # on an error (a full disk) deleted, the checkpoints before untouched
        save_torch_file(model_state, partial / MODEL_WEIGHTS_FILE, fsync=True)
        save_torch_file({KEY_STEP: step, **training_state}, partial / TRAINING_STATE_FILE, fsync=True)
        _write_json_atomic(partial / MODEL_CONFIG_FILE, model_config)
        _write_json_atomic(partial / INFO_FILE, {"step": step, **info})
        files = _file_records(partial)  # hashed from the page cache, just written
    try:
        _write_json_atomic(final / COMPLETE_MARKER, {"step": step, "files": files})
    except BaseException:
        remove(final, ignore_errors=True)  # without its marker nothing reads it: give its space back at once
        raise
    return final


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every complete checkpoint of the run (damaged or not), by step."""
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
    """The complete checkpoint with the highest step, or None (unverified: see `newest_verified`)."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def _read_marker(path: Path) -> dict:
    try:
        marker = json.loads((path / COMPLETE_MARKER).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DamagedCheckpoint(path, f"its {COMPLETE_MARKER} marker is unreadable ({exc})") from None
    if not isinstance(marker, dict) or not isinstance(marker.get("files", {}), dict):
        raise DamagedCheckpoint(path, f"its {COMPLETE_MARKER} marker is not one berttrain writes")
    return marker


def verify_checkpoint(path: Path, hashed: Collection[str] | None = None) -> bool:
    """Checks a complete checkpoint against its marker: every file it lists is there with its size, and the files
    named in `hashed` (every file when None) have its sha256. A size costs a stat and a hash a read, so callers
    hash what they are about to read anyway. Raises DamagedCheckpoint naming the first file that fails; returns
    whether the marker lists the files (False for an older one, checked by `_verify_unlisted`)."""
    path = Path(path)
    marker = _read_marker(path)
    if "files" not in marker:
        _verify_unlisted(path, hashed)
        return False
    files = marker["files"]
    if not all(isinstance(r, dict) and isinstance(r.get("bytes"), int) and isinstance(r.get("sha256"), str)
               for r in files.values()):
        raise DamagedCheckpoint(path, f"its {COMPLETE_MARKER} marker has a file record berttrain does not write")
    for name in ALL_FILES:
        if name not in files:
            raise DamagedCheckpoint(path, f"its {COMPLETE_MARKER} marker does not list {name}")
    for name, record in sorted(files.items()):
        file = path / name
        if not file.is_file():
            raise DamagedCheckpoint(path, f"{name} is missing")
        size = file.stat().st_size
        if size != record["bytes"]:
            raise DamagedCheckpoint(path, f"{name} has {size:,} bytes, its {COMPLETE_MARKER} marker says "
                                          f"{record['bytes']:,} (truncated or overwritten)")
    for name, record in sorted(files.items()):
        if (hashed is None or name in hashed) and file_sha256(path / name) != record["sha256"]:
            raise DamagedCheckpoint(path, f"{name} does not match the sha256 in its {COMPLETE_MARKER} marker "
                                          f"(its bytes changed after the save)")
    return True


def _verify_unlisted(path: Path, hashed: Collection[str] | None) -> None:
    """A checkpoint whose marker predates file records: what can be checked without them."""
    for name in ALL_FILES:
        if not (path / name).is_file():
            raise DamagedCheckpoint(path, f"{name} is missing")
    for name in (MODEL_CONFIG_FILE, INFO_FILE):
        try:
            json.loads((path / name).read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DamagedCheckpoint(path, f"{name} is not valid JSON ({exc})") from None
    for name in (MODEL_WEIGHTS_FILE, TRAINING_STATE_FILE):
        if hashed is None or name in hashed:
            try:
                with zipfile.ZipFile(path / name) as archive:
                    bad = archive.testzip()
            except (zipfile.BadZipFile, OSError, EOFError) as exc:
                raise DamagedCheckpoint(path, f"{name} is not a readable torch file ({exc})") from None
            if bad is not None:
                raise DamagedCheckpoint(path, f"{name} fails its CRC check at {bad}")


def newest_verified(run_dir: Path, hashed: Collection[str] | None = None
                    ) -> tuple[Path | None, list[DamagedCheckpoint]]:
    """The newest complete checkpoint of the run that verifies (None if none does), and the newer damaged ones
    passed over, newest first."""
    skipped = []
    for _, path in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(path, hashed)
        except DamagedCheckpoint as exc:
            skipped.append(exc)
            continue
        return path, skipped
    return None, skipped


def usable_checkpoint(run_dir: Path, what: str, hashed: Collection[str] | None = None,
                      set_aside: bool = False) -> Path:
    """`newest_verified`, saying on stderr which damaged checkpoints it skipped (with `set_aside`, renamed to
    `step-NNNNNNNN.damaged`); BertError when there is none."""
    run_dir = Path(run_dir)
    found, skipped = newest_verified(run_dir, hashed)
    if found is not None:
        for exc in skipped:
            note = ""
            if set_aside:
                note = f", set aside as {_set_aside(exc.path).name}"
            print(f"skipping {exc}; using {found.name}{note}", file=sys.stderr)
        return found
    if skipped:
        reasons = "; ".join(f"{exc.path.name}: {exc.reason}" for exc in skipped)
        raise BertError(f"{what} {run_dir}: every checkpoint is damaged ({reasons})")
    raise BertError(f"{what} {run_dir}: the run has no complete checkpoint yet in {checkpoints_dir(run_dir)}")


def looks_like_checkpoint(path: Path) -> bool:
    """Whether `path` names one checkpoint (rather than a run): its name, its weights or its marker say so."""
    path = Path(path)
    return bool(_NAME_RE.fullmatch(path.name)) or (path / MODEL_WEIGHTS_FILE).is_file() or is_complete(path)


def resolve_checkpoint(path: Path, what: str = "--init-from", hashed: Collection[str] | None = WEIGHT_FILES
                       ) -> Path:
    """A checkpoint directory from a run directory (its newest checkpoint that verifies, damaged newer ones
    skipped with a line on stderr) or a checkpoint directory (which must verify)."""
    path = Path(path)
    if looks_like_checkpoint(path):
        if not path.is_dir():
            raise BertError(f"{what} {path}: no such checkpoint directory")
        if not is_complete(path):
            raise BertError(f"{what} {path}: the checkpoint is incomplete (its save was interrupted); "
                            f"use an earlier one from {path.parent}")
        try:
            verify_checkpoint(path, hashed)
        except DamagedCheckpoint as exc:
            raise BertError(f"{what} {path}: damaged: {exc.reason}; use an earlier checkpoint "
                            f"(`berttrain verify --run {path.parent.parent}` lists the good ones)") from None
        return path
    if not path.is_dir():
        raise BertError(f"{what} {path}: no such run or checkpoint directory")
    return usable_checkpoint(path, what, hashed)


def verify_run(run_dir: Path) -> list[dict]:
    """Every checkpoint directory of the run (or the one checkpoint `run_dir` names) by step, every file hashed:
    {"checkpoint", "step", "status": "ok", "damaged" or "incomplete" (a save that was killed: never read),
    "reason", "listed" (for an ok one, whether its marker records sizes and hashes)}."""
    run_dir = Path(run_dir)
    if looks_like_checkpoint(run_dir) and run_dir.is_dir():
        candidates = [run_dir]
    else:
        root = checkpoints_dir(run_dir)
        candidates = [p for p in root.iterdir() if _NAME_RE.fullmatch(p.name) and p.is_dir()] if root.is_dir() else []
    found = []
    for path in candidates:
        match = _NAME_RE.fullmatch(path.name)
        step = int(match.group(1)) if match else -1
        entry = {"checkpoint": path, "step": step, "status": "ok", "reason": None, "listed": False}
        if not is_complete(path):
            entry.update(status="incomplete", reason="no COMPLETE marker: a save that was interrupted")
        else:
            try:
                entry["listed"] = verify_checkpoint(path)
            except DamagedCheckpoint as exc:
                entry.update(status="damaged", reason=exc.reason)
        found.append(entry)
    return sorted(found, key=lambda entry: entry["step"])


def _set_aside(path: Path) -> Path:
    """Renames a damaged checkpoint to `step-NNNNNNNN.damaged` (replacing an older one of that name), out of the
    way of resume and prune; returns the new path."""
    target = path.with_name(path.name + DAMAGED_SUFFIX)
    remove(target)
    os.replace(path, target)
    return target


def _interrupted_save(path: Path) -> tuple[int, int | None] | None:
    """(step, pid of the job writing it) of what a save that did not finish leaves in a checkpoints directory: a
    staging directory (`.step-N.partial-PID-HEX`, `.step-N.old-PID-HEX`; pid None in older names) or a step
    directory without its marker (pid None). None for anything else."""
    staging = staging_owner(path)
    if staging is not None:
        match = _NAME_RE.fullmatch(staging[0])
        return (int(match.group(1)), staging[1]) if match else None
    match = _NAME_RE.fullmatch(path.name)
    if match and path.is_dir() and not is_complete(path):
        return int(match.group(1)), None
    return None


def remove_interrupted_saves(run_dir: Path) -> list[Path]:
    """Deletes what killed saves left in the run's checkpoints directory (partial and incomplete checkpoints,
    temporary files); returns what it deleted. Only while no save is running: at resume."""
    root = checkpoints_dir(run_dir)
    deleted = []
    for path in sorted(root.iterdir()) if root.is_dir() else ():
        if _interrupted_save(path) is not None or _TEMPORARY_RE.fullmatch(path.name):
            remove(path)
            deleted.append(path)
    return deleted


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
    keep = {step for step, _ in complete[-keep_last:]} if keep_last else set()
    if best is not None:
        keep.add(best["step"])
    latest = complete[-1][0] if complete else -1
    deleted = []
    for step, path in complete:
        if step not in keep:
            _remove_checkpoint(path)
            deleted.append(path)
    root = checkpoints_dir(run_dir)
    for path in sorted(root.iterdir()) if root.is_dir() else ():
        save = _interrupted_save(path)
        if save is None or save[0] >= latest:
            continue
        if save[1] is not None and process_alive(save[1]):
            continue  # never a live job's save in progress
        remove(path, ignore_errors=True)
        deleted.append(path)
    return deleted
