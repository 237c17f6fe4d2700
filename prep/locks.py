"""One writer per output: a job that writes a dataset, vocabulary, run, export or fine-tuned model first takes an
exclusive lock on it, so that a second job on the same output refuses at start, naming the first.

The lock is `.NAME.lock` beside the output, held with `flock` on an open descriptor and recording the holder as
JSON (pid, host, start time, command) for the refusal message. The kernel drops a `flock` when its holder dies, so a
lock file left by a killed job is known to be stale, exactly, and the next job takes it over. The descriptor is not
inherited: it is closed on exec and, in processes forked while it is held (shard workers, data loaders), at the
fork, so that orphaned children of a killed job cannot keep its output locked. Standard library only.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from prep.errors import BertError

RECORD_WAIT_S = 1.0  # how long to wait for a lock's holder to write its record, which it does right after locking
_held: dict[int, Path] = {}  # descriptor -> lock file, of this process


class OutputBusy(BertError):
    """Another live job holds the lock of the output."""


def lock_path(out: Path) -> Path:
    """`.NAME.lock` beside the output `out`."""
    out = Path(out)
    return out.parent / f".{out.name}.lock"


def process_alive(pid: int) -> bool:
    """Whether process `pid` of this host runs (a zombie, which has exited, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc: kill(0) is all there is to know
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def describe_holder(record: dict | None) -> str:
    """`pid 123 on host h, started 2024-05-01 12:00:00 (bertprep shard ...)`, from a lock record."""
    if not record:
        return "a job whose lock record is not written yet"
    text = f"pid {record.get('pid')} on host {record.get('host')}, started {record.get('started')}"
    return text + (f" ({record['command']})" if record.get("command") else "")


@contextmanager
def output_lock(out: Path, flag: str) -> Iterator[Path]:
    """Holds the lock of output `out` while the block runs; yields the lock file.

    OutputBusy (a BertError) when another live job holds it, with a message naming that job and `flag`, the option
    that chooses another output. A lock left by a job that died is taken over, with a note on stderr."""
    fd, path = _acquire(Path(out), flag)
    try:
        yield path
    finally:
        _release(fd, path)


def _acquire(out: Path, flag: str) -> tuple[int, Path]:
    path = lock_path(out)
    if path.parent.exists() and not path.parent.is_dir():  # mkdir would say "File exists", which misleads
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path.parent))
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            holder = _wait_for_record(path)
            raise OutputBusy(f"{out} is being written by another job: {describe_holder(holder)}; wait for it to "
                             f"finish or stop it, or write elsewhere with {flag} (--force does not take over an "
                             f"output another job is writing)") from None
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            stat = None
        if stat is None or (stat.st_dev, stat.st_ino) != _identity(fd):
            os.close(fd)  # the holder removed the file as it released it: lock the new one
            continue
        previous = _read_record(fd)
        if previous:
            print(f"note: taking over the lock of {out} from a job that is gone ({describe_holder(previous)})",
                  file=sys.stderr)
        _write_record(fd)
        _held[fd] = path
        return fd, path


def _release(fd: int, path: Path) -> None:
    _held.pop(fd, None)
    try:
        path.unlink(missing_ok=True)  # while still locked, so that no waiting job locks a file about to vanish
    finally:
        os.close(fd)


def _identity(fd: int) -> tuple[int, int]:
    stat = os.fstat(fd)
    return stat.st_dev, stat.st_ino


def _read_record(fd: int) -> dict | None:
    data = os.pread(fd, 1 << 16, 0)
    try:
        record = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def _wait_for_record(path: Path) -> dict | None:
    """The record of a lock another job holds; None if none appears within RECORD_WAIT_S."""
    deadline = time.monotonic() + RECORD_WAIT_S
    while True:
        try:
            record = json.loads(path.read_bytes())
            if isinstance(record, dict):
                return record
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            pass
        if time.monotonic() > deadline:
            return None
        time.sleep(0.02)


def _write_record(fd: int) -> None:
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
              "command": _command_line()}
    data = (json.dumps(record) + "\n").encode("utf-8")
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def _command_line() -> str:
    """This process's command line, shortened, as a user would recognise it (`python -m prep shard ...`)."""
    if not sys.argv or not sys.argv[0]:
        return ""
    program = Path(sys.argv[0])
    name = f"python -m {program.parent.name}" if program.name == "__main__.py" else program.name
    line = " ".join([name, *sys.argv[1:]])
    return line if len(line) <= 200 else line[:197] + "..."


def _close_held_in_child() -> None:
    """After a fork: the child's copies of the held descriptors closed (the parent keeps its locks)."""
    for fd in list(_held):
        try:
            os.close(fd)
        except OSError:
            pass
    _held.clear()


os.register_at_fork(after_in_child=_close_held_in_child)
