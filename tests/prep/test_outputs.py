"""Atomic outputs: a reader finds the old output or the complete new one, and a failure leaves no temporary."""

import os
import resource
import signal
import subprocess
import sys

import pytest

from prep.errors import BertError
from prep.outputs import (leftover_staging, open_atomic, refuse_existing, staged_dir, staging_owner, temporary_name,
                          write_atomic)


def test_write_atomic_round_trips_str_and_bytes_and_leaves_only_the_file(tmp_path):
    """A str is stored as UTF-8 with its "\\n" kept, bytes as given, an old file is replaced, and the directory
    holds nothing but the file afterwards."""
    path = tmp_path / "out.txt"
    path.write_bytes(b"old")
    write_atomic(path, "naïve\nline\n")
    assert path.read_bytes() == "naïve\nline\n".encode("utf-8")
    write_atomic(path, b"\x00\xff", fsync=True)
    assert path.read_bytes() == b"\x00\xff"
    assert os.listdir(tmp_path) == ["out.txt"]
    assert temporary_name(path) == tmp_path / f".out.txt.tmp-{os.getpid()}"


def test_an_exception_mid_write_keeps_the_old_file_and_no_temporary(tmp_path):
    """Half a new file written, then an error: the old file is byte-for-byte intact and the temporary is gone."""
    path = tmp_path / "data.bin"
    path.write_bytes(b"complete old contents")
    with pytest.raises(RuntimeError, match="interrupted"):
        with open_atomic(path) as f:
            f.write(b"half of the new")
            assert temporary_name(path).exists() and path.read_bytes() == b"complete old contents"
            raise RuntimeError("interrupted")
    assert path.read_bytes() == b"complete old contents"
    assert os.listdir(tmp_path) == ["data.bin"]


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs RLIMIT_FSIZE/SIGXFSZ (POSIX)")
def test_a_disk_refusing_the_write_keeps_the_old_file_and_no_temporary(tmp_path):
    """The OS refusing the data halfway (a file size limit: EFBIG, as a full disk gives ENOSPC) raises OSError,
    leaves the old file intact and removes the temporary; a file size limit binds root too."""
    path = tmp_path / "big.bin"
    path.write_bytes(b"old")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a killed process
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        with pytest.raises(OSError):
            write_atomic(path, b"x" * 100_000, fsync=True)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous_handler)
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["big.bin"]


def test_a_failed_rename_removes_the_complete_temporary(tmp_path):
    """When the rename itself fails (a directory where the file should go), OSError, the directory is untouched
    and the fully written temporary is removed."""
    path = tmp_path / "taken"
    path.mkdir()
    (path / "inside").write_text("kept")
    with pytest.raises(OSError):
        write_atomic(path, "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"] and (path / "inside").read_text() == "kept"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_directory_raises_oserror_and_leaves_nothing(tmp_path):
    """No permission to create the temporary: OSError, and the directory holds what it held."""
    directory = tmp_path / "ro"
    directory.mkdir()
    (directory / "keep.txt").write_text("old")
    directory.chmod(0o555)
    try:
        with pytest.raises(OSError):
            write_atomic(directory / "keep.txt", "new")
        assert os.listdir(directory) == ["keep.txt"] and (directory / "keep.txt").read_text() == "old"
    finally:
        directory.chmod(0o755)


def test_refuse_existing_message_and_what_counts_as_taken(tmp_path):
    """The exact "NOUN PATH already exists: HINT" error without force; with force it reports something to replace.
    An empty directory is free unless the caller counts every existing path as taken."""
    taken = tmp_path / "run"
    taken.mkdir()
    (taken / "config.json").write_text("{}")
    with pytest.raises(BertError) as error:
        refuse_existing(taken, False, "pass --force to replace it, or another --out", noun="run directory")
    assert str(error.value) == f"run directory {taken} already exists: pass --force to replace it, or another --out"
    assert refuse_existing(taken, True, "unused") is True
    empty = tmp_path / "empty"
    empty.mkdir()
    assert refuse_existing(empty, False, "unused") is False
    assert refuse_existing(tmp_path / "missing", False, "unused", empty_dir_ok=False) is False
    with pytest.raises(BertError, match=rf"^{empty} already exists: pass --force$"):
        refuse_existing(empty, False, "pass --force", empty_dir_ok=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(BertError, match="already exists"):
        refuse_existing(tmp_path / "file", False, "pass --force")


def test_staged_dir_replaces_the_old_output_and_leaves_no_staging(tmp_path):
    """Writes go to the hidden `.NAME.partial-PID-HEX` beside the output, named for this job; on success the new
    directory replaces the old one whole (no old file survives) and no staging (`.NAME.partial-…`, `.NAME.old-…`)
    remains."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old run")
    with staged_dir(out) as staging:
        assert staging.parent == tmp_path and staging.name.startswith(f".out.partial-{os.getpid()}-")
        assert staging_owner(staging) == ("out", os.getpid()) and list(staging.iterdir()) == []
        (staging / "model.pt").write_bytes(b"weights")
        assert (out / "stale.txt").is_file()  # nothing at the output changes until the block ends
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in out.iterdir()) == ["model.pt"] and (out / "model.pt").read_bytes() == b"weights"


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", ""])
    process.wait()
    return process.pid


def test_staged_dir_replaces_a_file_and_clears_only_dead_jobs_staging(tmp_path):
    """A file where the directory should go is replaced; what killed jobs left (staging named for a pid that is
    gone, or the unsuffixed `.NAME.partial` of older versions) is cleared before the new writes start, while a live
    job's staging for the same output, and staging of another output, are left alone: no job deletes another's
    work."""
    out = tmp_path / "out"
    out.write_text("a file")
    dead = [tmp_path / ".out.partial", tmp_path / f".out.partial-{_dead_pid()}-0a0b0c",
            tmp_path / f".out.old-{_dead_pid()}-0d0e0f"]
    live = [tmp_path / f".out.partial-{os.getppid()}-abcdef", tmp_path / f".other.partial-{_dead_pid()}-123456"]
    for path in dead + live:
        path.mkdir()
        (path / "half.npy").write_bytes(b"half")
    assert leftover_staging(out) == sorted(dead)
    with staged_dir(out) as staging:
        assert list(staging.iterdir()) == []
        (staging / "done").write_text("ok")
    assert out.is_dir() and [p.name for p in out.iterdir()] == ["done"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", *(p.name for p in live)])


def test_staged_dir_on_an_error_keeps_the_old_output_and_deletes_the_staging(tmp_path):
    """An exception inside the block (Ctrl-C included) propagates, the old output is untouched, and the staging
    directory with its half-written files is gone."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with staged_dir(out) as staging:
            (staging / "half.bin").write_bytes(b"half")
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in out.iterdir()] == ["old.txt"] and (out / "old.txt").read_text() == "old"
