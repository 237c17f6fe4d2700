"""A global shuffle of more rows than fit in memory, in three sequential passes over scratch files.

Rows are spooled to disk in the order they are made; each is then sent to one of `ceil(rows / rows_per_bucket)`
buckets chosen uniformly at random; each bucket, small enough for memory, is permuted and becomes one shard. Random
buckets plus a uniform permutation inside each give a uniformly random order over all rows, while memory holds one
bucket at a time. Every draw is keyed by the seed and the pass's position, so the order is reproducible.
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
        self._spool = open(self._spool_path, "wb")

    def append(self, rows: np.ndarray) -> None:
        self._spool.write(np.ascontiguousarray(rows, dtype=self.dtype).tobytes())
        self.rows += len(rows)

    def drain(self, write_shard: Callable[[np.ndarray], None]) -> None:
        """Calls `write_shard` with each shuffled bucket in turn; together they hold every row once."""
        self._spool.close()
        buckets = max(1, -(-self.rows // self.rows_per_bucket))
        if self.rows == 0:
            return
        if buckets == 1:
            self._write_bucket(np.fromfile(self._spool_path, dtype=self.dtype), 0, write_shard)
        else:
            paths = self._scatter(buckets)
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
            for b in range(buckets):
                if bounds[b + 1] > bounds[b]:
                    with open(paths[b], "ab") as f:
                        f.write(rows[order[bounds[b] : bounds[b + 1]]].tobytes())
        return paths

    def _write_bucket(self, rows: np.ndarray, bucket: int, write_shard: Callable[[np.ndarray], None]) -> None:
        rng = np.random.default_rng([self.seed, _TAG_PERMUTE, bucket])
        write_shard(rows[rng.permutation(len(rows))])
