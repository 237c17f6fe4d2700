"""Writing outputs so that a reader finds the old output or the complete new one, never half of either.

A file is written under a hidden temporary name in its own directory (`.NAME.tmp-PID`) and renamed over the old
one; a directory is built as a hidden `.NAME.partial` beside it and renamed into place. Standard library only:
`prep` and `train` both write with it.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

from prep.errors import BertError


def temporary_name(path: Path) -> Path:
    """The hidden name `path` is written under before it is renamed: same directory, so the rename is atomic."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextmanager
def open_atomic(path: Path, text: bool = False, fsync: bool = False) -> Iterator[IO]:
    """A file opened for writing (binary, or UTF-8 text with "\\n" line ends) under `temporary_name(path)` that
    replaces `path` when the block ends normally; on an exception the temporary is removed and `path` untouched.

    `fsync` flushes the data to disk before the rename, for files a later step must be able to trust after a
    power cut (checkpoints, the shard manifest).
    """
    path = Path(path)
    temporary = temporary_name(path)
    try:
        with open(temporary, "w" if text else "wb", **({"encoding": "utf-8", "newline": "\n"} if text else {})) as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_atomic(path: Path, data: str | bytes, fsync: bool = False) -> None:
    """Writes `data` (a str as UTF-8) to `path` through a temporary in the same directory and a rename."""
    with open_atomic(path, fsync=fsync) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)


def is_occupied(path: Path) -> bool:
    """Whether `path` holds something an output would replace: a file, or a directory that is not empty."""
    path = Path(path)
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def refuse_existing(path: Path, force: bool, hint: str, noun: str = "", empty_dir_ok: bool = True) -> bool:
    """BertError "[NOUN ]PATH already exists: HINT" when `path` is taken and `force` is off; returns whether
    something is there that `force` lets the caller replace.

    With `empty_dir_ok` an empty directory counts as free (a run directory made beforehand); without it any
    existing path is taken.
    """
    path = Path(path)
    taken = is_occupied(path) if empty_dir_ok else path.exists()
    if taken and not force:
        raise BertError(f"{noun + ' ' if noun else ''}{path} already exists: {hint}")
    return taken


def remove(path: Path, ignore_errors: bool = False) -> None:
    """Deletes a file or a directory tree; nothing if there is none."""
    path = Path(path)
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        if not ignore_errors:
            raise


def staging_dir(out_dir: Path) -> Path:
    """The hidden `.NAME.partial` directory beside `out_dir`, created empty (one left by a killed run cleared)."""
    out_dir = Path(out_dir)
    staging = out_dir.parent / f".{out_dir.name}.partial"
    remove(staging)
    staging.mkdir(parents=True)
    return staging


def move_into_place(staging: Path, out_dir: Path) -> None:
    """Renames the finished `staging` directory to `out_dir`. An old `out_dir` is first renamed aside to
    `.NAME.old` and deleted after, so that `out_dir` is missing only between two renames."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old"
        remove(old, ignore_errors=True)
        os.replace(out_dir, old)
        os.replace(staging, out_dir)
        remove(old, ignore_errors=True)  # the new output is in place: a leftover must not fail the command
    else:
        os.replace(staging, out_dir)


@contextmanager
def staged_dir(out_dir: Path) -> Iterator[Path]:
    """Yields a fresh `staging_dir(out_dir)` to write into; when the block ends normally it replaces `out_dir`
    (`move_into_place`), on an exception it is deleted and `out_dir` left as it was."""
    staging = staging_dir(out_dir)
    try:
        yield staging
    except BaseException:
        remove(staging, ignore_errors=True)
        raise
    move_into_place(staging, out_dir)
