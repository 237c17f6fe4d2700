"""SIGKILL at any moment of `berttrain run` (mid-step, mid-save, mid-evaluation, while a resume starts up), then
`--resume`, again and again: the finished run's records are exactly those of a run never killed, and nothing a
killed write left behind remains. The same for `berttrain export`, re-run plainly: the export of a job never
killed, byte for byte."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from click.testing import CliRunner

from train import checkpoint as ckpt
from train.cli import main
from train.config import TrainConfig
from train.loop import run
from train.rundir import METRICS_FILE
from tests.jobs import Moment, check_kills_then_rerun, staging_of, started

REPO_ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
# Saves every 3 steps and evaluates every 10, so that kills land in saves and evaluations as well as in steps.
RUN = dict(size="tiny", layers=1, hidden=64, dropout=0.1, steps=30, batch_size=16, save_every=3, keep_last=2,
           eval_every=10, eval_rows=64, log_every=1, precision="fp32", device="cpu", seed=13)
TIMING_KEYS = ("tokens_per_s", "data_wait_frac")
KILLS = 4
SEED = 2024


def _records(run_dir):
    lines = (run_dir / METRICS_FILE).read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in lines]


def _last_logged_step(run_dir) -> int:
    path = run_dir / METRICS_FILE
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")] \
        if path.is_file() else []
    return max(steps, default=0)


def _kill_once(run_dir, wiki_shards, rng, log) -> str:
    """Starts `berttrain run` (resuming when there is a checkpoint) and SIGKILLs it at a seeded moment: during
    start-up after a seeded delay, or a seeded delay after a seeded step's record appears. Returns the moment."""
    start = ["--resume"] if ckpt.latest_checkpoint(run_dir) else ["--shards", str(wiki_shards), "--force", "--masking",
                                                                  "dynamic", *_flags(RUN)]
    proc = subprocess.Popen([sys.executable, "-m", "train", "run", "--run-dir", str(run_dir), "--quiet", *start],
                            cwd=REPO_ROOT, env=ENV, stdout=log, stderr=log)
    try:
        if rng.random() < 0.25:
            moment = f"{rng.uniform(0.3, 3.0):.2f} s after start"
            time.sleep(float(moment.split()[0]))
        else:
            target, extra_s = _last_logged_step(run_dir) + rng.randint(1, 5), rng.uniform(0.0, 0.03)
            moment = f"{extra_s * 1000:.0f} ms after step {target}'s record"
            while proc.poll() is None and _last_logged_step(run_dir) < target:
                time.sleep(0.005)
            time.sleep(extra_s)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    return moment if proc.returncode == -signal.SIGKILL else f"{moment} (finished first)"


def _flags(options: dict) -> list[str]:
    return [word for name, value in options.items() for word in (f"--{name.replace('_', '-')}", str(value))]


def test_sigkill_at_seeded_moments_then_resume_gives_the_straight_records(wiki_shards, tmp_path):
    """Four kills at seeded moments (steps, the saves every 3 steps, the evaluations every 10, a resume starting
    up), each followed by `--resume` (or, before any checkpoint exists, a fresh start): the finished run's loss,
    learning rate, gradient norm and validation records equal a straight run's bit for bit (CPU, fp32, dropout and
    dynamic masks on), and the run directory holds no staging directory, temporary file or incomplete or
    unverifiable checkpoint."""
    straight = tmp_path / "straight"
    run(TrainConfig(shards=str(wiki_shards), run_dir=str(straight), masking="dynamic", **RUN), progress=False)
    run_dir = tmp_path / "killed"
    rng = random.Random(SEED)
    with open(tmp_path / "killed.log", "w") as log:
        moments = [_kill_once(run_dir, wiki_shards, rng, log) for _ in range(KILLS)]

    args = ["--resume"] if ckpt.latest_checkpoint(run_dir) else ["--shards", str(wiki_shards), "--force",
                                                                 "--masking", "dynamic", *_flags(RUN)]
    result = CliRunner().invoke(main, ["run", "--run-dir", str(run_dir), "--quiet", *args])
    assert result.exit_code == 0, (moments, result.output)
    assert _records(run_dir) == _records(straight), moments

    leftovers = [str(p) for p in run_dir.rglob(".*")]
    assert leftovers == [], moments
    for path in ckpt.checkpoints_dir(run_dir).glob("step-*"):
        assert ckpt.is_complete(path), (path, moments)
        ckpt.verify_checkpoint(path)


def export_moments(out) -> list[Moment]:
    def writing(process):  # the weights, config and tokenizer files go into the staging directory
        return staging_of(process, out) is not None

    return [Moment("start", started, 1.0), Moment("its staging appeared", writing, 0.001)]


def test_sigkill_of_export_at_seeded_moments_then_a_plain_rerun_writes_the_clean_bytes(tiny_run, tmp_path):
    """Four `berttrain export --hf` jobs SIGKILLed at seeded moments (a seeded share of a clean export's time, and
    while its files are written): none leaves an export directory that transformers could open half-written, and
    the same command run again, without --force, writes every file (weights, config, tokenizer files, berttrain.json,
    which names the same checkpoint and no time) byte for byte as an export never killed, with no staging directory
    or lock file left beside it."""
    check_kills_then_rerun("train", lambda out: ("export", "--run", tiny_run, "--hf", out), tmp_path, export_moments,
                           rounds=2)
