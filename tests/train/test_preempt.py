"""Preemption: SIGTERM (what Slurm and Kubernetes send before SIGKILL) or SIGINT makes `berttrain run` finish the
step, save it, print the command that resumes it and exit 143 or 130; under torchrun every rank stops after the same
step whichever was signalled; the resumed run has exactly the losses of one never stopped; a second signal stops at
once, even while the process waits inside C."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from train import checkpoint as ckpt
from train.config import TrainConfig
from train.loop import build, fit, run
from train.preempt import Preempted
from train.rundir import METRICS_FILE
from train.runtime import setup, teardown

REPO_ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
# Long enough never to finish before the signal lands; the tests stop it within a few steps.
LONG = dict(size="tiny", layers=1, hidden=64, dropout=0.0, masking="dynamic", steps=300, batch_size=16,
            save_every=50, keep_last=5, eval_every=0, log_every=1, precision="fp32", device="cpu", seed=21)


def _config(shards, run_dir, **options) -> TrainConfig:
    return TrainConfig(shards=str(shards), run_dir=str(run_dir), **{**LONG, **options})


def _flags(options: dict) -> list[str]:
    return [word for name, value in options.items() for word in (f"--{name.replace('_', '-')}", str(value))]


def _losses(run_dir):
    records = []
    for line in (run_dir / METRICS_FILE).read_text().splitlines():
        record = json.loads(line)
        if "split" not in record:
            records.append((record["step"], record["loss"], record["lr"], record["grad_norm"]))
    return records


def _wait_for_step(run_dir, step, proc, timeout_s=120):
    """Waits until metrics.jsonl has a record of `step` or later (the run is training)."""
    deadline = time.monotonic() + timeout_s
    path = run_dir / METRICS_FILE
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it was signalled"
        if path.is_file() and any(json.loads(line)["step"] >= step for line in path.read_text().splitlines()
                                  if line.endswith("}")):
            return
        time.sleep(0.02)
    raise AssertionError(f"no step {step} within {timeout_s} s")


def _stopped_step(stderr: str, signame: str, run_dir, resume: str) -> int:
    """The step of the line the run prints when stopped, checked against its checkpoint and resume command."""
    line = next(line for line in stderr.splitlines() if line.startswith(f"stopped by {signame} after step "))
    step = int(line.split()[5])
    saved = ckpt.checkpoints_dir(run_dir) / ckpt.checkpoint_name(step)
    assert line == f"stopped by {signame} after step {step} of 300, saved as {saved}; resume with: {resume}"
    ckpt.verify_checkpoint(saved)
    assert ckpt.latest_checkpoint(run_dir) == saved
    assert _losses(run_dir)[-1][0] == step  # no step was trained past the checkpoint
    return step


def test_sigint_mid_run_saves_that_step_and_resume_gives_the_straight_losses(wiki_shards, tmp_path):
    """SIGINT raised during step 5 (as Ctrl-C would): the step ends, is saved, and `Preempted` carries exit status
    130; resuming it gives bit for bit the losses of a run never stopped (CPU, fp32, dynamic masks)."""
    config = _config(wiki_shards, tmp_path / "stopped")
    runtime = setup(config.device, config.precision)
    trainer = build(config, runtime)
    forwards = []

    def interrupt(module, inputs, output):
        forwards.append(1)
        if len(forwards) == 5:
            os.kill(os.getpid(), signal.SIGINT)

    trainer.model.register_forward_hook(interrupt)
    with pytest.raises(Preempted) as stopped:
        fit(trainer, progress=False)
    teardown(runtime)
    step = stopped.value.step
    assert stopped.value.exit_status == 130 and 5 <= step < 300
    assert ckpt.latest_checkpoint(tmp_path / "stopped").name == ckpt.checkpoint_name(step)
    run(config.replace(resume=True), progress=False, stop_at=step + 3)
    run(_config(wiki_shards, tmp_path / "straight"), progress=False, stop_at=step + 3)
    assert _losses(tmp_path / "stopped") == _losses(tmp_path / "straight")


def test_sigterm_to_a_real_run_exits_143_with_the_resume_command(wiki_shards, tmp_path):
    """`berttrain run` in a process of its own, sent SIGTERM while it trains, saves and exits 143 printing the
    exact command that continues it; that continuation gives the straight run's losses exactly."""
    run_dir = tmp_path / "stopped"
    options = {k: v for k, v in LONG.items() if k != "masking"}
    proc = subprocess.Popen([sys.executable, "-m", "train", "run", "--shards", str(wiki_shards), "--run-dir",
                             str(run_dir), "--masking", "dynamic", "--quiet", *_flags(options)],
                            cwd=REPO_ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_step(run_dir, 3, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-3000:]
    assert stdout == ""
    assert "SIGTERM: finishing this step, then saving a checkpoint (send it again to stop at once)" in stderr
    step = _stopped_step(stderr, "SIGTERM", run_dir, f"berttrain run --run-dir {run_dir} --resume")

    run(_config(wiki_shards, run_dir, resume=True), progress=False, stop_at=step + 2)
    run(_config(wiki_shards, tmp_path / "straight"), progress=False, stop_at=step + 2)
    assert _losses(run_dir) == _losses(tmp_path / "straight")


def _worker_pid(parent_pid: int, rank: int) -> int:
    """The pid of torchrun's worker of `rank`, from /proc."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError):
            continue
        if ppid == parent_pid and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    raise AssertionError(f"no worker of rank {rank} under {parent_pid}")


def test_sigterm_to_one_torchrun_worker_stops_every_rank_at_the_same_step(wiki_shards, tmp_path):
    """Two gloo processes of 8 rows; only rank 1 gets SIGTERM. Rank 0, never signalled, stops after the same step
    (else one of them would wait forever in the next collective), saves it, and prints the torchrun command that
    resumes; both exit 143. Resumed in one process of 16 rows, steps go on as in a straight run."""
    run_dir = tmp_path / "stopped"
    options = {k: v for k, v in LONG.items() if k not in ("masking", "batch_size")}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "train", "run", "--shards", str(wiki_shards), "--run-dir", str(run_dir),
                             "--masking", "dynamic", "--batch-size", "8", "--quiet", *_flags(options)],
                            cwd=REPO_ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_step(run_dir, 3, proc)
    os.kill(_worker_pid(proc.pid, 1), signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0  # torchrun reports its workers' 143 as a failure
    for rank in (0, 1):
        assert re.search(rf"rank\s*: {rank} \(local_rank: {rank}\)\s+exitcode\s*: 143", stderr), stderr[-3000:]
    step = _stopped_step(stderr, "SIGTERM", run_dir,
                         f"torchrun --standalone --nproc_per_node 2 -m train run --run-dir {run_dir} --resume")

    run(_config(wiki_shards, run_dir, resume=True), progress=False, stop_at=step + 2)
    run(_config(wiki_shards, tmp_path / "straight"), progress=False, stop_at=step + 2)
    got, expected = _losses(run_dir), _losses(tmp_path / "straight")
    assert [r[0] for r in got] == [r[0] for r in expected]
    for a, b in zip(got, expected):
        assert a == pytest.approx(b, rel=1e-4)


_SECOND_SIGNAL = """
import os, signal, threading, time
from train.preempt import StopRequests

with StopRequests() as requests:
    def send():
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # the same request twice (Slurm and torchrun both send it)
        time.sleep(1.5)
        print(requests.signum, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=send).start()
    os.read(os.pipe()[0], 1)  # waits inside C forever, as a collective whose peer died does
"""


def test_a_second_signal_stops_at_once_even_inside_c():
    """The first SIGTERM is recorded, the same one delivered again right after is not a second request, and a
    second one a moment later ends the process at once with 143, though its main thread never returns from C."""
    done = subprocess.run([sys.executable, "-c", _SECOND_SIGNAL], cwd=REPO_ROOT, env=ENV, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 143, done.stderr
    assert done.stdout == f"{int(signal.SIGTERM)}\n"
    assert done.stderr.count("SIGTERM: finishing this step") == 1
    assert done.stderr.strip().endswith("SIGTERM again: stopping at once")
