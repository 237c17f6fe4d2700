"""One writer per output: a second job on an output refuses at start naming the first (pid, host, start time), even
with --force, and deletes none of its work; a lock left by a killed job, or kept by children it forked, is taken
over."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from prep.locks import OutputBusy, lock_path, output_lock, process_alive
from tests.jobs import (ENV, REPO_ROOT, busy_message, error_line, finish, holder_text, processes_in_group, run_job,
                        start_job, stop_once_locked)

# Holds the lock of argv[1]; with argv[2] == "fork", forks a child that sleeps on (and says when it runs, so past
# the fork handlers); prints the pids, then sleeps.
HOLDER = """
import os, sys, time
from prep.locks import output_lock
with output_lock(sys.argv[1], "-o"):
    child = 0
    if sys.argv[2] == "fork":
        ready, tell = os.pipe()
        child = os.fork()
        if child == 0:
            os.write(tell, b"r")
            time.sleep(60)
            os._exit(0)
        os.read(ready, 1)
    print(os.getpid(), child, flush=True)
    time.sleep(60)
"""


def start_holder(out, fork=False) -> tuple[subprocess.Popen, int]:
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(out), "fork" if fork else "-"], cwd=REPO_ROOT,
                               env=ENV, stdout=subprocess.PIPE, text=True)
    pid, child = map(int, process.stdout.readline().split())
    assert pid == process.pid
    return process, child


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait()


def test_a_held_lock_refuses_another_holder_naming_it_and_is_gone_after(tmp_path):
    """Another process holds the lock: taking it fails with a message naming that process, its host, its start and
    its command; within one process, too, an output has one holder. The lock file is deleted on release."""
    out = tmp_path / "data"
    holder, _ = start_holder(out)
    try:
        record = json.loads(lock_path(out).read_text())
        assert record["pid"] == holder.pid and record["host"] == socket.gethostname()
        with pytest.raises(OutputBusy) as refused:
            with output_lock(out, "-o"):
                pass
        assert str(refused.value) == busy_message(out, record, "-o")
    finally:
        kill(holder)
    with output_lock(out, "-o") as path:
        with pytest.raises(OutputBusy, match=rf"pid {os.getpid()} on host "):
            with output_lock(out, "-o"):
                pass
        assert path == tmp_path / ".data.lock" and json.loads(path.read_text())["pid"] == os.getpid()
    assert os.listdir(tmp_path) == []


def test_a_killed_holders_lock_is_taken_over_even_while_its_forked_child_lives(tmp_path, capsys):
    """SIGKILL the holder of a lock while a child it forked still runs: the kernel dropped the lock with the holder
    (the child never held it), so the next job takes it over and says whose it was."""
    out = tmp_path / "data"
    holder, child = start_holder(out, fork=True)
    record = json.loads(lock_path(out).read_text())
    kill(holder)
    try:
        assert process_alive(child) and lock_path(out).exists()
        with output_lock(out, "-o"):
            assert json.loads(lock_path(out).read_text())["pid"] == os.getpid()
    finally:
        os.kill(child, signal.SIGKILL)
    note = capsys.readouterr().err.strip()
    assert note == f"note: taking over the lock of {out} from a job that is gone ({holder_text(record)})"


@pytest.fixture(scope="module")
def long_corpus(tmp_path_factory, wiki_valid, wiki_test):
    """Both WikiText-2 splits, 2.5 MB: a shard job that runs long enough to be caught mid-write."""
    path = tmp_path_factory.mktemp("corpus") / "long.txt"
    path.write_bytes(wiki_valid.read_bytes() + wiki_test.read_bytes())
    return path


def shard_args(corpus, vocab_dir, out, *extra):
    return ("shard", "-i", corpus, "--vocab", vocab_dir, "-o", out, "--max-len", 64, "--quiet", *extra)


def test_a_second_shard_job_on_a_dataset_refuses_and_the_first_finishes_intact(tmp_path, vocab_dir, long_corpus):
    """Two `bertprep shard` jobs on one output: the second, with or without --force, refuses at start with a line
    naming the first, and touches nothing beside the output; the first, stopped meanwhile, goes on to a dataset
    that verifies."""
    out = tmp_path / "data" / "wiki_64"
    first = start_job("prep", *shard_args(long_corpus, vocab_dir, out, "--workers", 1))
    try:
        record = stop_once_locked(first, out)
        assert record["command"].startswith("python -m prep shard -i ")
        beside = sorted(os.listdir(out.parent))
        for extra in ((), ("--force",)):
            second = run_job("prep", *shard_args(long_corpus, vocab_dir, out, *extra))
            assert error_line(second) == busy_message(out, record, "-o")
            assert sorted(os.listdir(out.parent)) == beside
    finally:
        status, _, stderr = finish(first)
    assert status == 0, stderr
    assert run_job("prep", "verify", out).returncode == 0
    assert os.listdir(out.parent) == ["wiki_64"]


def test_a_sigkilled_shard_jobs_lock_and_staging_give_way_to_the_next_job(tmp_path, vocab_dir, long_corpus):
    """SIGKILL the main process of a `bertprep shard` job with two workers mid-write: the kernel kills its workers
    with it (none goes on writing into the dead job's staging), and its lock file and staging stay behind. The next
    job takes the lock over (saying whose it was), deletes that staging and writes a dataset that verifies."""
    out = tmp_path / "data" / "wiki_64"
    out.parent.mkdir()
    first = start_job("prep", *shard_args(long_corpus, vocab_dir, out, "--workers", 2), start_new_session=True)
    try:
        staging = re.compile(rf"\.wiki_64\.partial-{first.pid}-[0-9a-f]+")
        deadline = time.monotonic() + 60
        while not (any(staging.fullmatch(name) for name in os.listdir(out.parent))
                   and len(processes_in_group(first.pid)) == 3):  # the main process and its two workers
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.002)
        record = json.loads(lock_path(out).read_text())
        kill(first)  # the main process alone
        deadline = time.monotonic() + 10
        while processes_in_group(first.pid):
            assert time.monotonic() < deadline, f"workers outlived their job: {processes_in_group(first.pid)}"
            time.sleep(0.01)

        second = run_job("prep", *shard_args(long_corpus, vocab_dir, out, "--workers", 1))
        assert second.returncode == 0, second.stderr
        assert second.stderr.strip() == \
            f"note: taking over the lock of {out} from a job that is gone ({holder_text(record)})"
    finally:
        try:
            os.killpg(first.pid, signal.SIGKILL)  # whatever is left of the job when a check above failed
        except ProcessLookupError:
            pass
    assert os.listdir(out.parent) == ["wiki_64"]
    assert run_job("prep", "verify", out).returncode == 0
