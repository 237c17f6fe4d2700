"""A global shuffle of more rows than fit in memory, in three sequential passes over scratch files.

Rows are spooled to disk in the order they are made; each is then sent to one of `ceil(rows / rows_per_bucket)`
buckets chosen uniformly at random; each bucket, small enough for memory, is permuted and becomes one shard. Random
buckets plus a uniform permutation inside each give a uniformly random order over all rows, while memory holds one
bucket at a time. Every draw is keyed by the seed and the pass's position, so the order is reproducible. Rows that
fit in one bucket stay in memory (the bucket would be read back whole anyway) and reach the disk only once there
are more.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

_TAG_SCATTER, _TAG_PERMUTE = 0x5C47, 0x9E47


class ExternalShuffle:
    """Collects row records (a structured dtype) with `append`, then hands them out shuffled with `drain`."""

    def __init__(self, scratch_dir: Path, dtype: np.dtype, seed: int, rows_per_bucket: int):
        self.scratch_dir = Path(scratch_dir)
        self.dtype = dtype
        self.seed = seed
        self.rows_per_bucket = rows_per_bucket
        self.rows = 0
        self._spool_path = self.scratch_dir / "spool.bin"
        self._spool = None  # opened when the rows outgrow one bucket
        self._held: list[np.ndarray] = []  # the rows until then

    def append(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        self.rows += len(rows)
        if self._spool is None:
            self._held.append(rows)
            if self.rows <= self.rows_per_bucket:
                return
            self._spool = open(self._spool_path, "wb")
            rows, self._held = np.concatenate(self._held), []
        self._spool.write(_bytes_of(rows))

    def drain(self, write_shard: Callable[[np.ndarray, np.ndarray], None]) -> None:
        """Calls `write_shard(rows, order)` with each bucket and its permutation in turn (the shard is
        `rows[order]`); together they hold every row once."""
        if self._spool is None:
            rows, self._held = (np.concatenate(self._held) if self._held else np.empty(0, self.dtype)), []
            if len(rows):
                self._write_bucket(rows, 0, write_shard)
            return
        self._spool.close()
        paths = self._scatter(-(-self.rows // self.rows_per_bucket))
        for bucket, path in enumerate(paths):
            rows = np.fromfile(path, dtype=self.dtype) if path.exists() else np.empty(0, self.dtype)
            path.unlink(missing_ok=True)
            if len(rows):
                self._write_bucket(rows, bucket, write_shard)
        self._spool_path.unlink(missing_ok=True)

    def _scatter(self, buckets: int) -> list[Path]:
        """Reads the spool a bucket's worth at a time and appends each row to a random bucket's file."""
        paths = [self.scratch_dir / f"bucket-{b:05d}.bin" for b in range(buckets)]
        for chunk, start in enumerate(range(0, self.rows, self.rows_per_bucket)):
            # Plain reads, not a map: the spool's pages would otherwise count as resident memory of this process.
            rows = np.fromfile(self._spool_path, dtype=self.dtype, count=min(self.rows_per_bucket, self.rows - start),
                               offset=start * self.dtype.itemsize)
            rng = np.random.default_rng([self.seed, _TAG_SCATTER, chunk])
            target = rng.integers(0, buckets, size=len(rows))
            order = np.argsort(target, kind="stable")
            bounds = np.searchsorted(target[order], np.arange(buckets + 1))
            records = rows.view(np.uint8).reshape(len(rows), self.dtype.itemsize)  # rows as bytes: a fast gather
            for b in range(buckets):
                if bounds[b + 1] > bounds[b]:
                    with open(paths[b], "ab") as f:
                        f.write(_bytes_of(np.take(records, order[bounds[b] : bounds[b + 1]], axis=0)))
        return paths

    def _write_bucket(self, rows: np.ndarray, bucket: int,
                      write_shard: Callable[[np.ndarray, np.ndarray], None]) -> None:
        rng = np.random.default_rng([self.seed, _TAG_PERMUTE, bucket])
        write_shard(rows, rng.permutation(len(rows)))


def _bytes_of(array: np.ndarray) -> memoryview:
    """A contiguous array's bytes, without copying them."""
    return memoryview(array.reshape(-1).view(np.uint8))
