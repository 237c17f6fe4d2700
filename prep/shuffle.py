"""The training rows' global shuffle: an order defined by the seed and the row count alone, built by parallel tasks
that each hold one shard's worth of rows.

The rows in range order (range, copy, row) are cut into chunks of `rows_per_shard` rows. Chunk c deals its rows to
the S = ceil(rows / rows_per_shard) shards in an order drawn from (seed, c): its i-th row takes slot
`c × rows_per_shard + perm_c[i]`, and slot s belongs to shard `s mod S`. Every shard thus gets ⌊rows / S⌋ or
⌈rows / S⌉ rows, a random sample stratified over the corpus (as many from each chunk as any other shard), and where
its rows lie in each chunk follows from the numbers alone. A shard's rows, in chunk order, are then permuted by a
generator drawn from (seed, shard).

`scatter_chunk` (one task per chunk) writes a chunk's rows grouped by shard; `write_scattered_shard` (one per shard)
reads its group from every chunk and writes the shard. With one shard there is nothing to scatter: `write_shard_task`
reads the rows where the range workers left them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from prep.shards import write_shard
from prep.spool import Piece, read_pieces, write_records

_TAG_SCATTER, _TAG_PERMUTE = 0x5C47, 0x9E47


def shard_count(rows: int, rows_per_shard: int) -> int:
    return max(1, -(-rows // rows_per_shard))


def chunk_file(chunk: int) -> str:
    return f"chunk-{chunk:06d}.rows"


def scatter_chunk(scratch_dir: Path, chunk: int, pieces: list[Piece], dtype: np.dtype, seed: int, rows_per_shard: int,
                  shards: int) -> None:
    """Writes chunk `chunk` (its rows as `pieces`) to `chunk_file(chunk)`, its rows grouped by shard."""
    rows = read_pieces(scratch_dir, pieces, dtype)
    slots = chunk * rows_per_shard + np.random.default_rng([seed, _TAG_SCATTER, chunk]).permutation(len(rows))
    order = np.argsort(slots % shards, kind="stable")
    records = rows.view(np.uint8).reshape(len(rows), dtype.itemsize)  # rows as bytes: a fast gather
    write_records(Path(scratch_dir) / chunk_file(chunk), np.take(records, order, axis=0))


def shard_pieces(shard: int, shards: int, rows: int, rows_per_shard: int) -> list[Piece]:
    """Where shard `shard`'s rows lie in the chunk files, chunk by chunk."""
    pieces = []
    for chunk, lo in enumerate(range(0, rows, rows_per_shard)):
        hi = min(rows, lo + rows_per_shard)
        before = _slots_below(hi, shard, shards) - _slots_below(lo, shard, shards)
        count = _slots_of(hi, shard, shards) - _slots_of(lo, shard, shards)
        if count:
            pieces.append(Piece(chunk_file(chunk), before, count))
    return pieces


def _slots_of(end: int, shard: int, shards: int) -> int:
    """Slots in [0, end) that belong to `shard`."""
    return end // shards + (1 if end % shards > shard else 0)


def _slots_below(end: int, shard: int, shards: int) -> int:
    """Slots in [0, end) that belong to a shard before `shard`."""
    return end // shards * shard + min(end % shards, shard)


def write_shard_task(scratch_dir: Path, split_dir: Path, index: int, pieces: list[Piece], dtype: np.dtype,
                     seed: int | None, names: tuple[str, ...] | None = None) -> dict:
    """Writes shard `index` of a split from `pieces` (its arrays of `names`, default all): permuted by (seed, index),
    or in order when `seed` is None. Returns the shard's manifest entry."""
    rows = read_pieces(scratch_dir, pieces, dtype)
    order = None if seed is None else np.random.default_rng([seed, _TAG_PERMUTE, index]).permutation(len(rows))
    return write_shard(Path(split_dir), index, rows, order, names)


def write_scattered_shard(scratch_dir: Path, split_dir: Path, shard: int, shards: int, rows: int, rows_per_shard: int,
                          dtype: np.dtype, seed: int) -> dict:
    """`write_shard_task` of training shard `shard` from the chunk files (its pieces found here, not sent: there are
    as many as chunks)."""
    return write_shard_task(scratch_dir, split_dir, shard, shard_pieces(shard, shards, rows, rows_per_shard), dtype,
                            seed)
