"""The training rows' global shuffle (prep/shuffle.py): a permutation fixed by the seed and the row count alone."""

import numpy as np

from prep.shards import row_dtype
from prep.shuffle import scatter_chunk, shard_count, shard_pieces, write_shard_task
from prep.spool import Piece, RowTable, SpoolWriter

DTYPE = row_dtype(4, 1, 70_000, nsp=False)  # int32 ids: a row's number fits in input_ids[:, 0]


def shuffled(tmp_path, seed, rows, rows_per_shard, spool_sizes, name):
    """The rows 0..rows-1 spooled in ranges of `spool_sizes` rows by two "workers", shuffled into shards; returns
    the row numbers of each shard in order."""
    scratch = tmp_path / name
    scratch.mkdir()
    table = RowTable(len(spool_sizes))
    start = 0
    for range_id, size in enumerate(spool_sizes):
        records = np.zeros(size, DTYPE)
        records["input_ids"][:, 0] = np.arange(start, start + size)
        with SpoolWriter(scratch, f"worker{range_id % 2}", DTYPE) as writer:  # ranges alternate between two files
            first = writer.rows
            writer.write(records)
        table.add(range_id, Piece(writer.name, first, size))
        start += size
    shards = shard_count(rows, rows_per_shard)
    for chunk, lo in enumerate(range(0, rows, rows_per_shard)):
        scatter_chunk(scratch, chunk, table.pieces(lo, lo + rows_per_shard), DTYPE, seed, rows_per_shard, shards)
    out = []
    for shard in range(shards):
        entry = write_shard_task(scratch, scratch, shard, shard_pieces(shard, shards, rows, rows_per_shard), DTYPE,
                                 seed)
        assert entry["rows"] <= rows_per_shard
        out.append(np.load(scratch / entry["arrays"]["input_ids"]["file"].split("/")[-1])[:, 0].astype(np.int64))
    return out


def test_shuffle_is_a_balanced_permutation_fixed_by_seed_and_count(tmp_path):
    """Every row lands in exactly one shard, shards differ in size by at most one row and hold at most
    rows_per_shard, the order is not the input's, and it depends on the seed and the row count only: not on how the
    rows were spread over ranges and spool files (which is all a worker count changes)."""
    rows, rows_per_shard = 10_000, 1000
    first = shuffled(tmp_path, 3, rows, rows_per_shard, [1234] * 8 + [128], "a")
    flat = np.concatenate(first)
    assert sorted(flat.tolist()) == list(range(rows)) and (flat != np.arange(rows)).mean() > 0.99
    assert {len(shard) for shard in first} == {1000}
    again = shuffled(tmp_path, 3, rows, rows_per_shard, [5000, 17, 4983], "b")
    assert all(np.array_equal(x, y) for x, y in zip(first, again))
    other_seed = shuffled(tmp_path, 4, rows, rows_per_shard, [1234] * 8 + [128], "c")
    assert not np.array_equal(flat, np.concatenate(other_seed))
    uneven = [len(shard) for shard in shuffled(tmp_path, 3, 10_007, 1000, [10_007], "d")]
    assert len(uneven) == 11 and sum(uneven) == 10_007 and set(uneven) == {909, 910}


def test_every_shard_draws_evenly_from_the_whole_corpus(tmp_path):
    """A shard is a stratified sample: it holds as many rows from each stretch of rows_per_shard input rows as any
    other shard does (to one row), so no shard is made of one part of the corpus."""
    rows, rows_per_shard = 8000, 1000
    shards = shuffled(tmp_path, 5, rows, rows_per_shard, [rows], "a")
    counts = np.array([np.bincount(shard // rows_per_shard, minlength=8) for shard in shards])
    assert counts.min() >= 125 - 1 and counts.max() <= 125 + 1
