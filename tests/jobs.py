"""Real `bertprep`/`berttrain` jobs in processes of their own, for the tests of faults and of one writer per output."""

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from prep.locks import lock_path
from prep.outputs import remove

REPO_ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
KILL_SEED = 2024  # the order and delays of the kills in `check_kills_then_rerun`


def job_command(module: str, *args) -> list[str]:
    """`python -m prep ...` or `python -m train ...`."""
    return [sys.executable, "-m", module, *map(str, args)]


def run_job(module: str, *args, prefix: tuple = (), **popen) -> subprocess.CompletedProcess:
    """Runs a job to its end; its output as text. `prefix` goes before the interpreter (`setpriv ...`)."""
    return subprocess.run([*prefix, *job_command(module, *args)], cwd=REPO_ROOT, env=ENV, capture_output=True,
                          text=True, timeout=300, **popen)


def start_job(module: str, *args, **popen) -> subprocess.Popen:
    """Starts a job; its output comes through pipes unless `popen` says otherwise (`stdout=log`)."""
    return subprocess.Popen(job_command(module, *args), cwd=REPO_ROOT, env=ENV,
                            **{"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, **popen})


def stop_once_locked(process: subprocess.Popen, out: Path, timeout_s: float = 120) -> dict:
    """Waits until `process` holds the lock of `out` (its record names it) and stops it there (SIGSTOP), so that a
    second job meets the first one mid-write however fast it is; returns the lock record."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the job ended before it was seen holding the lock: {process.communicate()}"
        try:
            record = json.loads(lock_path(out).read_text())
        except (OSError, json.JSONDecodeError):
            record = None
        if record and record.get("pid") == process.pid:
            process.send_signal(signal.SIGSTOP)
            return record
        time.sleep(0.002)
    raise AssertionError(f"{process.args} did not lock {out} within {timeout_s} s")


def holder_text(record: dict) -> str:
    """How a refusal or a take-over names the job of a lock record."""
    return f"pid {record['pid']} on host {record['host']}, started {record['started']} ({record['command']})"


def busy_message(out: Path, record: dict, flag: str) -> str:
    """The refusal of a second job on `out` while the job of `record` writes it."""
    return (f"{out} is being written by another job: {holder_text(record)}; wait for it to finish or stop it, or "
            f"write elsewhere with {flag} (--force does not take over an output another job is writing)")


def finish(process: subprocess.Popen) -> tuple[int, str, str]:
    """Lets a stopped job go on (SIGCONT) and waits for it: (exit status, stdout, stderr)."""
    process.send_signal(signal.SIGCONT)
    stdout, stderr = process.communicate(timeout=300)
    return process.returncode, stdout, stderr


def error_line(result: subprocess.CompletedProcess) -> str:
    """The message of a user error: exit status 1 and exactly one line on stderr, `Error: MESSAGE`, no traceback."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0].removeprefix("Error: ")


def tree_bytes(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` by relative path, with its bytes: to show an output untouched."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(Path(directory).rglob("*")) if p.is_file()}


def tree_digests(directory: Path) -> dict[str, str]:
    """Every file under `directory` by relative path, with its sha256: to compare outputs of megabytes, and to say
    which file differs in a readable failure."""
    return {name: hashlib.sha256(data).hexdigest() for name, data in tree_bytes(directory).items()}


def beside(out: Path) -> list[str]:
    """What the directory of `out` holds, `out` included: after a job completes, only `out` should be there."""
    return sorted(os.listdir(Path(out).parent))


def staging_of(process: subprocess.Popen, out: Path) -> Path | None:
    """The staging directory of the job `process` beside `out` (`.NAME.partial-PID-HEX`), or None while there is
    none."""
    return next(out.parent.glob(f".{out.name}.partial-{process.pid}-*"), None)


@dataclass(frozen=True)
class Moment:
    """A moment to kill a job at: once `event` holds (it is polled with the job's process), a seeded delay of up to
    `max_delay_share` of a clean job's duration later."""

    name: str
    event: Callable[[subprocess.Popen], bool]
    max_delay_share: float


def started(process: subprocess.Popen) -> bool:
    """The event of a job that has started: the moment after it is a seeded share of a clean job's time."""
    return True


def kill_at(process: subprocess.Popen, moment: Moment, clean_s: float, rng: random.Random,
            whole_group: bool = False) -> str:
    """SIGKILLs the job at `moment`, its delay drawn from `rng`: its process group (a job started with
    `start_new_session`) when `whole_group`, else its main process alone, as a kill -9 of its pid does (its workers
    die with it where the kernel can arrange that). Waits for the main process; returns how the moment went, for the
    failure message of a test."""
    delay_s = rng.uniform(0.0, moment.max_delay_share) * clean_s
    while process.poll() is None and not moment.event(process):
        time.sleep(0.002)
    time.sleep(delay_s)
    try:
        if whole_group:
            os.killpg(process.pid, signal.SIGKILL)
        else:
            process.send_signal(signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()
    how = f"{delay_s * 1000:.0f} ms after {moment.name}, {'its process group' if whole_group else 'its main process'}"
    return how if process.returncode == -signal.SIGKILL else f"{how} (finished first: exit {process.returncode})"


def check_kills_then_rerun(module: str, args_for: Callable[[Path], tuple], tmp_path: Path,
                           moments_for: Callable[[Path], list[Moment]], rounds: int) -> None:
    """The fault test of a command that writes one output (`args_for(out)`): a clean job, then jobs SIGKILLed
    `rounds` times at each of `moments_for(out)`, in a seeded order with seeded delays, then the same command once
    more. Each kill leaves the output missing or whole; the last job completes with exactly the clean job's files,
    and nothing else (staging, a lock file) is left beside the output."""
    clean_out = tmp_path / "clean" / "out"
    begun = time.monotonic()
    clean_job = run_job(module, *args_for(clean_out))
    clean_s = time.monotonic() - begun
    assert clean_job.returncode == 0, clean_job.stderr
    clean = tree_digests(clean_out)

    out = tmp_path / "killed" / "out"
    out.parent.mkdir()
    rng = random.Random(KILL_SEED)
    moments = moments_for(out) * rounds
    rng.shuffle(moments)
    jobs, report = [], []
    try:
        with open(tmp_path / "killed.log", "w") as log:
            for i, moment in enumerate(moments):
                jobs.append(start_job(module, *args_for(out), stdout=log, stderr=log, start_new_session=True))
                # Half the kills reach the main process alone, as a kill -9 of its pid does.
                report.append(kill_at(jobs[-1], moment, clean_s, rng, whole_group=i % 2 == 0))
                if out.exists():  # killed after its final rename: the output must be whole
                    assert tree_digests(out) == clean, report
                    report[-1] += " (after the output was in place)"
                    remove(out)  # so that the next job is a plain run again
        rerun = run_job(module, *args_for(out))
    finally:
        _kill_groups(jobs)
    assert rerun.returncode == 0, (report, rerun.stderr)
    assert tree_digests(out) == clean, report
    assert beside(out) == ["out"], report


def _kill_groups(jobs: list[subprocess.Popen]) -> None:
    """What is left of killed jobs, if anything still runs."""
    for job in jobs:
        try:
            os.killpg(job.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def processes_in_group(group: int) -> list[int]:
    """Live processes of a process group (workers outliving their job would be re-parented, but keep its group)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            if fields[0] != "Z" and int(fields[3]) == group:
                found.append(int(entry.name))
    return found
