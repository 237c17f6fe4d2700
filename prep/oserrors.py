"""Operating-system errors (a full disk, a read-only or forbidden directory, a file where a directory should be, too
many open files) as one line that names the path, the cause and what to do, instead of a traceback."""

from __future__ import annotations

import errno
import gc
import os
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from prep.errors import BertError

# What to do, per errno; {elsewhere} is the option that chooses another output, or "choose another path".
_HINTS = {
    errno.ENOSPC: "the file system is full: free space on it, or {elsewhere}",
    errno.EDQUOT: "your disk quota there is used up: free space, or {elsewhere}",
    errno.EACCES: "this user may not do that there: check the owner and permissions (ls -ld), or {elsewhere}",
    errno.EPERM: "the operation is not permitted there: check the owner, permissions and attributes, or {elsewhere}",
    errno.EROFS: "the file system is mounted read-only: {elsewhere}",
    errno.ENOTDIR: "a file stands where a directory is needed: move that file away, or {elsewhere}",
    errno.EISDIR: "a directory stands where a file is needed: move that directory away, or {elsewhere}",
    errno.EEXIST: "something already stands at that path: move it away, or {elsewhere}",
    errno.ENOENT: "it, or a directory on the way to it, does not exist: create the directory or fix the path",
    errno.EMFILE: "this process may open no more files: raise the limit (ulimit -n 65536) and run it again",
    errno.ENFILE: "the system may open no more files: close other programs, or raise fs.file-max",
    errno.ENAMETOOLONG: "the path is too long: {elsewhere}",
    errno.ENOLCK: "the file system cannot lock files: {elsewhere}, on a local disk",
    errno.EIO: "the device failed to read or write: check the disk (dmesg), or {elsewhere}",
    errno.EPIPE: "the program reading this output stopped before the end (a closed pipe)",
}
_DEFAULT_HINT = "check the path, then run the command again"


def os_error_message(exc: OSError, output: Path | None = None, flag: str | None = None) -> str:
    """One line for `exc`: what it happened to, the system's words for it, and what to do.

    When the path is the output being written (`output`), something inside it, or its staging or lock beside it,
    the line starts with `cannot write OUTPUT`; `flag` is the option that chooses another output (`-o`)."""
    path = exc.filename2 if exc.filename2 is not None else exc.filename  # a rename fails at its target
    cause = exc.strerror or str(exc)
    elsewhere = f"write elsewhere with {flag}" if flag else "choose another path"
    hint = _HINTS.get(exc.errno, _DEFAULT_HINT).format(elsewhere=elsewhere)
    if output is not None and (path is None or _belongs_to(Path(os.fsdecode(path)), Path(output))):
        detail = f" ({os.fsdecode(path)})" if path is not None and Path(os.fsdecode(path)) != Path(output) else ""
        return f"cannot write {output}: {cause}{detail}: {hint}"
    if path is None:
        return f"{cause}: {hint}"
    return f"{os.fsdecode(path)}: {cause}: {hint}"


@contextmanager
def explained_os_errors(output: Path, flag: str) -> Iterator[None]:
    """Turns an OSError in the block into a BertError with `os_error_message(exc, output, flag)`."""
    try:
        yield
    except OSError as exc:
        raise BertError(os_error_message(exc, output, flag)) from exc


def release_descriptors(exc: OSError) -> None:
    """After running out of file descriptors (`exc` is EMFILE or ENFILE): the frames of the failed calls cleared, so
    that what they held open (a half-started worker pool's pipes) is closed and cleaning up can open directories
    again. The line the error becomes needs no frames."""
    if exc.errno in (errno.EMFILE, errno.ENFILE):
        traceback.clear_frames(exc.__traceback__)
        gc.collect()


def _belongs_to(path: Path, output: Path) -> bool:
    """Whether `path` is `output`, lies inside it, or is one of its hidden siblings (`.NAME.partial-…`,
    `.NAME.lock`) or inside one."""
    path, output = Path(os.path.abspath(path)), Path(os.path.abspath(output))
    return any(p == output or (p.parent == output.parent and p.name.startswith(f".{output.name}."))
               for p in (path, *path.parents))
