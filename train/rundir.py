"""The run directory: where it is, whether this command may use it (--resume, --force), and config.json, which
records every option, the model, the shards and the derived numbers of a run."""

from __future__ import annotations

import json
import math
import re
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

from prep.errors import BertError
from prep.locks import OutputBusy, output_lock
from prep.oserrors import os_error_message
from prep.outputs import refuse_existing, remove, write_atomic
from prep.shards import Dataset
from train import checkpoint as ckpt
from train.config import TrainConfig
from train.preempt import resume_command
from train.runtime import Runtime, on_main

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
RUNS_DIR = "runs"
RUN_DIR_FLAG = "--run-dir"
CLAIM_ATTEMPTS = 100


def next_run_dir(root: Path) -> Path:
    """`root/runN` for the next N: past every run there and every one a job has locked but not created yet."""
    names = [p.name for p in root.glob("run*")] + [p.name[1:].removesuffix(".lock") for p in root.glob(".run*.lock")]
    numbers = [int(m.group(1)) for name in names if (m := re.fullmatch(r"run(\d+)", name))]
    return root / f"run{max(numbers, default=0) + 1}"


@contextmanager
def claimed_run_dir(config: TrainConfig, runtime: Runtime) -> Iterator[TrainConfig]:
    """`config` with its run directory named (--run-dir, or the next free `runs/runN`), which rank 0 holds the
    lock of while the block runs, so that a second job on it refuses at start (`prep.locks`). An OS error in the
    block (a full disk) becomes a BertError naming the run, and saying how to continue it when it has a checkpoint.
    """
    with ExitStack() as held:
        def claim() -> str:
            if config.run_dir is not None:
                held.enter_context(output_lock(Path(config.run_dir), RUN_DIR_FLAG))
                return config.run_dir
            for _ in range(CLAIM_ATTEMPTS):
                run_dir = next_run_dir(Path(RUNS_DIR))
                try:
                    held.enter_context(output_lock(run_dir, RUN_DIR_FLAG))
                    return str(run_dir)
                except OutputBusy:
                    continue  # another job took this number a moment ago; its lock file now counts
            raise BertError(f"no free run directory in {RUNS_DIR}/ after {CLAIM_ATTEMPTS} tries: pass {RUN_DIR_FLAG}")

        try:
            run_dir = on_main(runtime, claim)
        except OSError as exc:
            raise BertError(os_error_message(exc, Path(config.run_dir or RUNS_DIR), RUN_DIR_FLAG)) from exc
        try:
            yield config.replace(run_dir=run_dir)
        except OSError as exc:
            raise BertError(run_os_error(exc, Path(run_dir))) from exc


def run_os_error(exc: OSError, run_dir: Path) -> str:
    """The line for an OS error of the run at `run_dir`; when it has a checkpoint, how to continue from it."""
    line = os_error_message(exc, run_dir, RUN_DIR_FLAG)
    if ckpt.latest_checkpoint(run_dir) is not None:
        line += f"; the checkpoints saved so far are intact: continue with `{resume_command(run_dir)}` once fixed"
    return line


def prepare_run_dir(config: TrainConfig) -> Path:
    """The run directory `claimed_run_dir` named, checked against --resume/--force and created (rank 0 only)."""
    run_dir = Path(config.run_dir)
    if config.resume:
        if not run_dir.is_dir():
            raise BertError(f"--resume: there is no run at {run_dir}")
        if ckpt.latest_checkpoint(run_dir) is None:
            raise BertError(f"--resume: {run_dir} has no complete checkpoint to continue from; "
                            f"start it again with --force")
        return run_dir
    if refuse_existing(run_dir, config.force, "pass --resume to continue it, --force to replace it, or another "
                       "--run-dir", noun="run directory"):
        remove(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def prepare_resume(config: TrainConfig) -> tuple[Path, Path]:
    """The run directory and the checkpoint --resume continues from (rank 0 only): the newest one whose every
    file matches its marker. Damaged newer ones are set aside (they would count as the latest for prune and
    resume) and what killed writes left is deleted, so that the run goes on among good checkpoints only."""
    run_dir = prepare_run_dir(config)
    checkpoint = ckpt.usable_checkpoint(run_dir, "--resume", hashed=None, set_aside=True)
    ckpt.remove_interrupted_saves(run_dir)
    for path in run_dir.glob(".*.tmp-*"):  # config.json or metrics.jsonl rewrites that were killed
        remove(path)
    return run_dir, checkpoint


def load_run_config(run_dir: Path) -> TrainConfig:
    """The TrainConfig saved in a run's config.json."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise BertError(f"{run_dir} is not a berttrain run: it has no {CONFIG_FILE}")
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BertError(f"{path} is not valid JSON ({exc}): the run's options are lost; start the run again "
                        f"with --force") from None
    return TrainConfig.from_dict(record["train"])


def dataset_summary(dataset: Dataset) -> dict:
    manifest = dataset.manifest
    return {
        "path": str(dataset.path),
        "format": manifest["format"],
        "version": manifest["version"],
        "max_len": dataset.max_len,
        "vocab": {k: v for k, v in dataset.vocab.items() if k != "file"},
        "options": manifest.get("options", {}),
        "seed": manifest.get("seed"),
        "splits": {name: {k: v for k, v in info.items() if k != "shards"}
                   for name, info in manifest["splits"].items()},
    }


def write_run_files(run_dir: Path, record: dict, step: int) -> None:
    """config.json from `record`; on resume (`step` > 0), metrics.jsonl cut back to the checkpoint's step so that
    the records continue without duplicates."""
    write_atomic(run_dir / CONFIG_FILE, json.dumps(record, indent=2, sort_keys=True) + "\n")
    metrics = run_dir / METRICS_FILE
    if step and metrics.is_file():
        kept = [line for line in metrics.read_text().splitlines() if _step_of(line) <= step]
        write_atomic(metrics, "".join(line + "\n" for line in kept))


def _step_of(line: str) -> float:
    """The step of a metrics.jsonl line; infinity for a line that a kill cut short (or an empty one), so that it
    goes."""
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:
        return math.inf
