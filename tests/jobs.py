"""Real `bertprep`/`berttrain` jobs in processes of their own, for the tests of faults and of one writer per output."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from prep.locks import lock_path

REPO_ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}


def job_command(module: str, *args) -> list[str]:
    """`python -m prep ...` or `python -m train ...`."""
    return [sys.executable, "-m", module, *map(str, args)]


def run_job(module: str, *args, prefix: tuple = (), **popen) -> subprocess.CompletedProcess:
    """Runs a job to its end; its output as text. `prefix` goes before the interpreter (`setpriv ...`)."""
    return subprocess.run([*prefix, *job_command(module, *args)], cwd=REPO_ROOT, env=ENV, capture_output=True,
                          text=True, timeout=300, **popen)


def start_job(module: str, *args, **popen) -> subprocess.Popen:
    return subprocess.Popen(job_command(module, *args), cwd=REPO_ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


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
