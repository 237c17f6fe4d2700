"""The run directory: where it is, whether this command may use it (--resume, --force), and config.json, which
records every option, the model, the shards and the derived numbers of a run."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prep.errors import BertError
from prep.outputs import refuse_existing, remove, write_atomic
from prep.shards import Dataset
from train import checkpoint as ckpt
from train.config import TrainConfig

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
RUNS_DIR = "runs"


def next_run_dir(root: Path) -> Path:
    numbers = [int(m.group(1)) for p in root.glob("run*") if (m := re.fullmatch(r"run(\d+)", p.name))]
    return root / f"run{max(numbers, default=0) + 1}"


def prepare_run_dir(config: TrainConfig) -> Path:
    """The run directory, checked against --resume/--force and created (rank 0 only)."""
    if config.run_dir is None:
        run_dir = next_run_dir(Path(RUNS_DIR))
    else:
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


def load_run_config(run_dir: Path) -> TrainConfig:
    """The TrainConfig saved in a run's config.json."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise BertError(f"{run_dir} is not a berttrain run: it has no {CONFIG_FILE}")
    return TrainConfig.from_dict(json.loads(path.read_text())["train"])



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
        kept = [line for line in metrics.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        write_atomic(metrics, "".join(line + "\n" for line in kept))
