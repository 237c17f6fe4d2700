"""Writing outputs so that a reader finds the old output or the complete new one, never half of either.

A file is written under a hidden temporary name in its own directory (`.NAME.tmp-PID`) and renamed over the old
one; a directory is built as a hidden `.NAME.partial-PID-HEX` beside it and renamed into place. Staging names are
unique per job and name its process, so that no job deletes or overwrites another's work: a job clears only the
staging of jobs no longer running. Standard library only: `prep` and `train` both write with it.
"""

from __future__ import annotations

import glob
import os
import re
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

from prep.errors import BertError
from prep.locks import process_alive

STAGING_KINDS = ("partial", "old")  # a directory being built; an old output being replaced
_STAGING_RE = re.compile(rf"\.(?P<name>.+)\.(?P<kind>{'|'.join(STAGING_KINDS)})(?:-(?P<pid>\d+)-[0-9a-f]+)?")


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
    except OSError as exc:
        if exc.filename is None:  # a failed write (a full disk) names no file
            exc.filename = str(path)
        raise
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


def staging_name(out_dir: Path, kind: str = "partial") -> Path:
    """`.NAME.KIND-PID-HEX` beside `out_dir`: this job's staging of `kind` (one of STAGING_KINDS), a name no other
    job uses."""
    out_dir = Path(out_dir)
    return out_dir.parent / f".{out_dir.name}.{kind}-{os.getpid()}-{secrets.token_hex(3)}"


def staging_owner(path: Path) -> tuple[str, int | None] | None:
    """(NAME, pid of the job) of a staging path; pid None for the `.NAME.partial` of older versions; None when
    `path` is no staging path."""
    match = _STAGING_RE.fullmatch(Path(path).name)
    if match is None:
        return None
    return match.group("name"), int(match.group("pid")) if match.group("pid") else None


def leftover_staging(out_dir: Path) -> list[Path]:
    """The staging paths of `out_dir` that jobs no longer running left beside it (killed, or crashed while
    cleaning up)."""
    out_dir = Path(out_dir)
    if not out_dir.parent.is_dir():
        return []
    found = []
    for path in out_dir.parent.glob(f".{glob.escape(out_dir.name)}.*"):
        owner = staging_owner(path)
        if owner is not None and owner[0] == out_dir.name and (owner[1] is None or not process_alive(owner[1])):
            found.append(path)
    return sorted(found)


def remove_own_staging(out_dir: Path) -> None:
    """Deletes this job's staging beside `out_dir`, which an error that also defeated its own cleanup left (no file
    descriptor left to delete it with)."""
    out_dir = Path(out_dir)
    for path in out_dir.parent.glob(f".{glob.escape(out_dir.name)}.*") if out_dir.parent.is_dir() else ():
        if staging_owner(path) == (out_dir.name, os.getpid()):
            remove(path, ignore_errors=True)


def staging_dir(out_dir: Path) -> Path:
    """This job's staging directory beside `out_dir` (`staging_name`), created empty; what killed jobs left there
    for the same output is cleared first."""
    out_dir = Path(out_dir)
    for leftover in leftover_staging(out_dir):
        remove(leftover, ignore_errors=True)
    staging = staging_name(out_dir)
    staging.parent.mkdir(parents=True, exist_ok=True)
    staging.mkdir()
    return staging


def move_into_place(staging: Path, out_dir: Path) -> None:
    """Renames the finished `staging` directory to `out_dir`. An old `out_dir` is first renamed aside (a staging
    name of kind "old") and deleted after, so that `out_dir` is missing only between two renames."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        old = staging_name(out_dir, "old")
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
