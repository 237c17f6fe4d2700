"""The shard job's worker processes."""

import signal
import subprocess
import sys
import time

import pytest

from prep.locks import process_alive
from prep.pool import WorkerPool
from tests.jobs import ENV, REPO_ROOT


def _nothing() -> None:
    pass


def _sigterm_kills() -> bool:
    return signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_workers_die_of_sigterm_whatever_handler_the_main_process_has():
    """The pool stops its workers with SIGTERM while it holds its task queue's lock. A worker must die of that
    signal at once: one that inherited the CLI's Python-level handler and got the signal just as it blocked on that
    lock never ran the handler, and `bertprep shard` hung at its end now and then on a busy machine."""
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)  # as the CLI's handler does
    try:
        with WorkerPool(2, _nothing, (), ()) as pool:
            in_workers = pool.ordered([(_sigterm_kills, ())] * 4)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert in_workers == [True] * 4


# A job whose two workers each sleep through a long task; prints the workers' pids, then waits for them.
LONG_TASKS = r"""
import os, sys, time
from prep.pool import WorkerPool
def nap(seconds):
    os.write(1, f"{os.getpid()}\n".encode())  # one write: the two workers' lines never interleave
    time.sleep(seconds)
with WorkerPool(2, lambda: None, (), ()) as pool:
    pool.ordered([(nap, (60,)), (nap, (60,))])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernel's parent-death signal is Linux's")
def test_workers_mid_task_die_with_a_sigkilled_main_process():
    """kill -9 of a job's main process (the OOM killer's way) takes its workers with it at once, even mid-task:
    an orphan would otherwise go on writing into the dead job's staging directory while the next job deletes it."""
    job = subprocess.Popen([sys.executable, "-c", LONG_TASKS], cwd=REPO_ROOT, env=ENV, stdout=subprocess.PIPE,
                           text=True)
    try:
        workers = [int(job.stdout.readline()) for _ in range(2)]
        job.send_signal(signal.SIGKILL)
        job.wait()
        deadline = time.monotonic() + 5  # against the tasks' 60 s
        while any(process_alive(pid) for pid in workers):
            assert time.monotonic() < deadline, f"workers {workers} outlived their job's main process"
            time.sleep(0.01)
    finally:
        job.kill()
