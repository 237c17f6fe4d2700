"""OS errors while writing are one line that names the path, the cause and what to do (exit 1), the job's staging
is gone and an earlier output is as it was. Real faults: a full tmpfs, a read-only one, a directory this user may
not write, a file where a directory belongs and the reverse, a file-descriptor limit."""

import errno
import os
import re
import resource
import shutil
from pathlib import Path

import pytest

from prep.locks import lock_path
from prep.oserrors import os_error_message
from tests.jobs import error_line, run_job, tree_bytes

FULL = "No space left on device"


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory, wiki_valid) -> Path:
    """The first 200 kB of WikiText-2's validation split, whole lines: a dataset of about 170 kB."""
    text = wiki_valid.read_text(encoding="utf-8")
    path = tmp_path_factory.mktemp("corpus") / "small.txt"
    path.write_text(text[: text.index("\n", 200_000) + 1], encoding="utf-8")
    return path


def shard(corpus, vocab_dir, out, *extra, **popen):
    return run_job("prep", "shard", "-i", corpus, "--vocab", vocab_dir, "-o", out, "--max-len", 64, "--quiet",
                   "--workers", 1, *extra, **popen)


def test_disk_full_while_sharding_keeps_the_old_dataset_and_deletes_the_staging(small_disk, vocab_dir,
                                                                                  small_corpus):
    """`bertprep shard --force` over a dataset on a disk with 64 kB free: the workers' writes fail, the line says
    the disk is full and which option writes elsewhere, the old dataset is byte for byte as it was and still
    verifies, and nothing else is left beside it (no staging, no lock). With the space back, the same command
    works."""
    out = small_disk.path / "data" / "small_64"
    assert shard(small_corpus, vocab_dir, out).returncode == 0
    before = tree_bytes(out)
    small_disk.fill(leave_bytes=64 << 10)

    failed = shard(small_corpus, vocab_dir, out, "--force", "--workers", 2)
    assert re.fullmatch(rf"cannot write {re.escape(str(out))}: {FULL}( \(.+\))?: the file system is full: free "
                        rf"space on it, or write elsewhere with -o", error_line(failed))
    assert tree_bytes(out) == before and os.listdir(out.parent) == ["small_64"]
    assert run_job("prep", "verify", out).returncode == 0

    small_disk.free()
    assert shard(small_corpus, vocab_dir, out, "--force").returncode == 0


def test_a_read_only_file_system_is_one_line_and_changes_nothing(small_disk, vocab_dir, small_corpus):
    """On a file system mounted read-only the job fails at its first write, the lock beside the output, with a line
    that says so; the dataset there is untouched."""
    out = small_disk.path / "small_64"
    assert shard(small_corpus, vocab_dir, out).returncode == 0
    before = tree_bytes(out)
    small_disk.read_only()
    assert error_line(shard(small_corpus, vocab_dir, out, "--force")) == (
        f"cannot write {out}: Read-only file system ({small_disk.path}/.small_64.lock): the file system is mounted "
        f"read-only: write elsewhere with -o")
    assert tree_bytes(out) == before and sorted(os.listdir(small_disk.path)) == ["small_64"]


def _without_root_powers() -> tuple:
    """A command prefix under which permissions apply: nothing for a plain user; for root, setpriv dropping the
    capabilities that override them."""
    if os.geteuid() != 0:
        return ()
    if shutil.which("setpriv") is None:
        pytest.skip("root ignores permissions and setpriv, which could drop that, is not installed")
    caps = "-dac_override,-dac_read_search"
    return ("setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}", "--")


def test_permission_denied_is_one_line(tmp_path, vocab_dir, small_corpus):
    """A directory this user may not write into: the line names the path, says so and what to do."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        result = shard(small_corpus, vocab_dir, locked / "new", prefix=_without_root_powers())
    finally:
        locked.chmod(0o755)
    assert error_line(result) == (
        f"cannot write {locked}/new: Permission denied ({locked}/.new.lock): this user may not do that there: check "
        f"the owner and permissions (ls -ld), or write elsewhere with -o")
    assert os.listdir(locked) == []


def test_a_file_where_a_directory_belongs_and_a_directory_where_a_file_belongs(tmp_path, vocab_dir, small_corpus):
    """`-o FILE/new` names the file that stands in the way; a directory where the output's lock file goes names that
    directory; neither leaves a temporary behind."""
    in_the_way = tmp_path / "notes.txt"
    in_the_way.write_text("a file")
    assert error_line(shard(small_corpus, vocab_dir, in_the_way / "new")) == (
        f"{in_the_way}: Not a directory: a file stands where a directory is needed: move that file away, or write "
        f"elsewhere with -o")

    out = tmp_path / "vocab"
    lock_path(out).mkdir()
    result = run_job("prep", "vocab", "-i", small_corpus, "--vocab-size", 500, "--threads", 1, "-o", out)
    assert error_line(result) == (
        f"cannot write {out}: Is a directory ({lock_path(out)}): a directory stands where a file is needed: move "
        f"that directory away, or write elsewhere with -o")
    assert sorted(os.listdir(tmp_path)) == [".vocab.lock", "notes.txt"]


def test_too_many_open_files_is_one_line_and_leaves_no_staging(tmp_path, vocab_dir, small_corpus):
    """With 16 file descriptors, starting 8 workers runs out of them: the line says to raise the limit, and the
    staging directory is deleted although the failure left no descriptor to delete it with."""
    def limit_files():
        resource.setrlimit(resource.RLIMIT_NOFILE, (16, 16))

    out = tmp_path / "data" / "out"
    result = shard(small_corpus, vocab_dir, out, "--workers", 8, preexec_fn=limit_files)
    assert error_line(result) == (f"cannot write {out}: Too many open files: this process may open no more files: "
                                  f"raise the limit (ulimit -n 65536) and run it again")
    assert os.listdir(out.parent) == []


@pytest.mark.parametrize("code, hint", [
    (errno.ENOSPC, "the file system is full: free space on it, or write elsewhere with -o"),
    (errno.EDQUOT, "your disk quota there is used up: free space, or write elsewhere with -o"),
    (errno.EACCES, "this user may not do that there: check the owner and permissions (ls -ld), or write elsewhere "
                   "with -o"),
    (errno.EPERM, "the operation is not permitted there: check the owner, permissions and attributes, or write "
                  "elsewhere with -o"),
    (errno.EROFS, "the file system is mounted read-only: write elsewhere with -o"),
    (errno.ENOTDIR, "a file stands where a directory is needed: move that file away, or write elsewhere with -o"),
    (errno.EISDIR, "a directory stands where a file is needed: move that directory away, or write elsewhere with -o"),
    (errno.ENOENT, "it, or a directory on the way to it, does not exist: create the directory or fix the path"),
    (errno.EMFILE, "this process may open no more files: raise the limit (ulimit -n 65536) and run it again"),
])
def test_each_error_names_the_output_the_path_the_cause_and_the_fix(code, hint):
    """The line for an error at a path of the output (inside it, its staging or its lock) starts `cannot write
    OUTPUT`; at any other path (an input) it starts with that path; without a path, with the output."""
    out = Path("data/wiki_128")
    cause = os.strerror(code)
    staging_file = "data/.wiki_128.partial-42-0a1b2c/train/00000-input_ids.npy"
    assert os_error_message(OSError(code, cause, staging_file), out, "-o") == \
        f"cannot write data/wiki_128: {cause} ({staging_file}): {hint}"
    assert os_error_message(OSError(code, cause), out, "-o") == f"cannot write data/wiki_128: {cause}: {hint}"
    assert os_error_message(OSError(code, cause, "corpus/wiki.txt"), out, "-o") == f"corpus/wiki.txt: {cause}: {hint}"
