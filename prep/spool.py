"""Row records between the range workers and the shards: each worker appends the rows it makes to spool files of its
own, and the main process keeps, per split, a table of where every range's rows lie.

Rows are addressed in range order (range, copy, row), the order the shuffle and the validation shards are defined
in; which worker wrote a range, and where in which file, only says where to read it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Piece:
    """Consecutive row records in one scratch file."""

    file: str  # name in the scratch directory
    start: int  # first row
    rows: int


class SpoolWriter:
    """Appends row records to `SPLIT-PID.rows` in the scratch directory (one writer at a time per process); `rows`
    counts what the file holds, so a piece is (name, rows before a write, rows written)."""

    def __init__(self, scratch_dir: Path, split: str, dtype: np.dtype):
        self.name = f"{split}-{os.getpid()}.rows"
        self.path = Path(scratch_dir) / self.name
        self.dtype = dtype
        self._file = None
        self.rows = 0

    def __enter__(self) -> "SpoolWriter":
        self._file = open(self.path, "ab")  # closed, so on file, before the task's result reaches the main process
        self.rows = os.fstat(self._file.fileno()).st_size // self.dtype.itemsize
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()

    def write(self, records: np.ndarray) -> None:
        records = np.ascontiguousarray(records, dtype=self.dtype)
        self._file.write(memoryview(records.reshape(-1).view(np.uint8)))
        self.rows += len(records)


def read_pieces(scratch_dir: Path, pieces: list[Piece], dtype: np.dtype) -> np.ndarray:
    """The pieces' records, concatenated in order, read with plain reads into one array (a map's pages would count as
    resident memory of the reader long after)."""
    out = np.empty(sum(p.rows for p in pieces), dtype=dtype)
    view = memoryview(out.reshape(-1).view(np.uint8))
    position = 0
    for piece in pieces:
        size = piece.rows * dtype.itemsize
        with open(Path(scratch_dir) / piece.file, "rb") as f:
            f.seek(piece.start * dtype.itemsize)
            if f.readinto(view[position : position + size]) != size:
                raise RuntimeError(f"{piece.file} holds fewer rows than recorded")
        position += size
    return out


def write_records(path: Path, records: np.ndarray) -> None:
    """Writes records to a scratch file of their own."""
    with open(path, "wb") as f:
        f.write(memoryview(np.ascontiguousarray(records).reshape(-1).view(np.uint8)))


class RowTable:
    """Where the rows of one split lie, range by range: one piece (or none) per range."""

    def __init__(self, ranges: int):
        self.range_rows = np.zeros(ranges, dtype=np.int64)
        self.range_start = np.zeros(ranges, dtype=np.int64)
        self.range_file = np.full(ranges, -1, dtype=np.int64)
        self.files: list[str] = []
        self._file_ids: dict[str, int] = {}

    def add(self, range_id: int, piece: Piece) -> None:
        file_id = self._file_ids.setdefault(piece.file, len(self.files))
        if file_id == len(self.files):
            self.files.append(piece.file)
        self.range_rows[range_id], self.range_start[range_id] = piece.rows, piece.start
        self.range_file[range_id] = file_id

    @property
    def rows(self) -> int:
        return int(self.range_rows.sum())

    def pieces(self, start: int, stop: int) -> list[Piece]:
        """Rows [start, stop) of the split in range order, as pieces of the spool files."""
        ends = np.cumsum(self.range_rows)
        first = int(np.searchsorted(ends, start, side="right"))
        pieces = []
        for r in range(first, len(ends)):
            begin = int(ends[r] - self.range_rows[r])
            if begin >= stop:
                break
            lo, hi = max(start, begin), min(stop, int(ends[r]))
            if hi > lo:
                pieces.append(Piece(self.files[self.range_file[r]], int(self.range_start[r]) + lo - begin, hi - lo))
        return pieces
