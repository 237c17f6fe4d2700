"""Real torch.distributed: `torchrun --nproc_per_node 2 -m train run` with gloo on the CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from train.config import TrainConfig
from train.loop import run
from train.rundir import METRICS_FILE

REPO_ROOT = Path(__file__).resolve().parents[2]


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]


@pytest.mark.parametrize("arch", ["bert", "modernbert"])
def test_two_processes_of_8_rows_match_one_process_of_16_and_resume_under_torchrun(wiki_shards, tmp_path, arch):
    """A run stopped at step 4 by one process of 16 rows is resumed by `torchrun` with two gloo processes of 8
    rows each: steps 5-8 and the final validation equal those of one process running 8 steps straight (dropout 0,
    fp32; dynamic masks, which are drawn per global batch, included). Only rank 0 writes. The data path makes
    tensors over read-only maps without copying and without torch's non-writable warning."""
    options = dict(shards=str(wiki_shards), arch=arch, size="tiny", layers=1, hidden=64, dropout=0.0, masking="dynamic",
                   steps=8, batch_size=16, precision="fp32", device="cpu", log_every=1, eval_every=8,
                   eval_rows=256, save_every=4, seed=11)
    straight = run(TrainConfig(run_dir=str(tmp_path / "straight"), **options), progress=False)
    run(TrainConfig(run_dir=str(tmp_path / "split"), **options), progress=False, stop_at=4)

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "train", "run", "--run-dir", str(tmp_path / "split"), "--resume", "--batch-size", "8",
               "--quiet"]
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run ") == 1  # one summary: rank 0's
    assert "not writable" not in done.stderr  # tensors over the read-only maps, without torch's warning

    expected, got = _records(tmp_path / "straight"), _records(tmp_path / "split")
    assert [r["step"] for r in got] == [r["step"] for r in expected]  # no record twice
    for a, b in zip(expected, got):
        for key in ("loss", "mlm_loss", "grad_norm"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4), (a["step"], key)
    assert got[-1]["split"] == "val" and got[-1]["rows"] == 256
    assert got[-1]["mlm_loss"] == pytest.approx(straight["eval"]["mlm_loss"], rel=1e-4)
    config = json.loads((tmp_path / "split" / "config.json").read_text())
    assert config["world_size"] == 2 and config["train"]["batch_size"] == 8
