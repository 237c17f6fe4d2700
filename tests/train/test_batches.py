"""The data path: which rows each step reads, on which process, and how they reach the model."""

from pathlib import Path

import numpy as np
import pytest
import torch

from prep.errors import BertError
from prep.shards import DatasetWriter, open_dataset, row_dtype, write_shard
from train.batches import (BatchLayout, BatchOrder, BatchStream, PageReleaser, as_tensors, eval_slices,
                           to_device)

CPU = torch.device("cpu")


def _rows_read(stream: BatchStream, steps: int) -> list[list[np.ndarray]]:
    """Per step, the input_ids of each micro-batch, as numpy."""
    out = []
    for _ in range(steps):
        batch = stream.next()
        out.append([m["input_ids"].numpy() for m in batch.micro])
    stream.close()
    return out


def test_order_is_a_keyed_permutation_of_disjoint_blocks_each_epoch():
    """Every epoch reads disjoint, in-range blocks in an order fixed by (seed, epoch): reproducible, different
    between epochs and seeds, and computable for any step directly, which is what makes resume O(1)."""
    order = BatchOrder(rows=1000, global_rows=32, seed=7)
    assert order.steps_per_epoch == 31
    epochs = [order.block_starts(e).copy() for e in range(3)]
    for starts in epochs:
        ends = np.sort(starts) + 32
        assert starts.min() >= 0 and ends.max() <= 1000
        assert np.all(np.sort(starts)[1:] >= ends[:-1])  # no row twice in an epoch
        assert len(set((starts % 32).tolist())) == 1  # one grid per epoch
    assert not np.array_equal(epochs[0], epochs[1])
    again = BatchOrder(rows=1000, global_rows=32, seed=7)
    assert np.array_equal(again.block_starts(1), epochs[1])
    assert not np.array_equal(BatchOrder(1000, 32, seed=8).block_starts(0), epochs[0])
    fresh = BatchOrder(rows=1000, global_rows=32, seed=7)
    assert fresh.block_start(2 * 31 + 5) == epochs[2][5]  # step 67 = epoch 2, batch 5, nothing replayed


def test_a_step_that_needs_more_rows_than_the_split_is_a_clear_error():
    with pytest.raises(BertError, match="one step needs 64 rows .* only 50: lower --batch-size"):
        BatchOrder(rows=50, global_rows=64, seed=0)


def test_two_processes_read_exactly_what_one_process_reads(wiki_shards):
    """2 ranks x 8 rows, and 1 rank x 8 rows x 2 accumulation micro-steps, see the rows of 1 rank x 16 rows:
    the global batch does not depend on how it is split."""
    split = open_dataset(wiki_shards).split("train")
    one = BatchLayout(16)
    order = BatchOrder(split.rows, one.global_rows, seed=3)
    steps = order.steps_per_epoch + 3  # into the second epoch
    single = _rows_read(BatchStream(split, order, one, CPU), steps)
    ranks = [_rows_read(BatchStream(split, order, BatchLayout(8, world_size=2, rank=r), CPU), steps)
             for r in range(2)]
    accum = _rows_read(BatchStream(split, order, BatchLayout(8, grad_accum=2), CPU), steps)
    for step in range(steps):
        expected = single[step][0]
        assert np.array_equal(np.concatenate([ranks[0][step][0], ranks[1][step][0]]), expected)
        assert np.array_equal(np.concatenate(accum[step]), expected)
        start = order.block_start(step)
        assert np.array_equal(expected, split.slice(start, start + 16)["input_ids"])


def test_resuming_the_stream_at_a_step_continues_the_same_sequence(wiki_shards):
    split = open_dataset(wiki_shards).split("train")
    layout = BatchLayout(16)
    order = BatchOrder(split.rows, layout.global_rows, seed=1)
    straight = _rows_read(BatchStream(split, order, layout, CPU), 12)
    resumed = _rows_read(BatchStream(split, BatchOrder(split.rows, 16, seed=1), layout, CPU, start_step=7), 5)
    for a, b in zip(straight[7:], resumed):
        assert np.array_equal(a[0], b[0])


def test_batches_are_views_of_the_map_and_widened_once_on_the_device(wiki_shards):
    """torch.from_numpy on the map's slice shares its memory (no copy on the host); the model gets int64."""
    split = open_dataset(wiki_shards).split("train")
    arrays = split.slice(5, 21)
    tensors = as_tensors(arrays)
    for name, array in arrays.items():
        assert tensors[name].data_ptr() == array.ctypes.data
        assert not array.flags.writeable  # read-only map, and still no copy
    on_device = to_device(tensors, CPU)
    assert all(t.dtype == torch.int64 for t in on_device.values())
    assert torch.equal(on_device["input_ids"], torch.from_numpy(np.array(arrays["input_ids"], dtype=np.int64)))


def test_data_wait_is_measured(wiki_shards):
    split = open_dataset(wiki_shards).split("train")
    stream = BatchStream(split, BatchOrder(split.rows, 8, seed=0), BatchLayout(8), CPU)
    waits = [stream.next().wait_s for _ in range(20)]
    stream.close()
    assert all(w >= 0 for w in waits)


def test_eval_slices_cover_the_rows_once_across_ranks():
    whole = eval_slices(100, 16)
    assert whole[0] == (0, 16) and whole[-1] == (96, 100)
    shared = sorted(eval_slices(100, 16, world_size=3, rank=0) + eval_slices(100, 16, 3, 1) + eval_slices(100, 16, 3, 2))
    assert shared == whole
    assert eval_slices(100, 16, max_rows=40) == [(0, 16), (16, 32), (32, 40)]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc")
def test_resident_memory_stays_flat_over_thousands_of_steps(tmp_path):
    """3,000 steps through 24 MB of shards: every page a step touches is released after it, so resident memory
    does not grow with the data read (a map keeps touched pages resident for as long as it lives)."""
    max_len, rows = 256, 48_000
    dtype = row_dtype(max_len, 38, 30522, nsp=False)
    rng = np.random.default_rng(0)
    with DatasetWriter(tmp_path / "big") as writer:
        shards = []
        for index, start in enumerate(range(0, rows, 16_000)):
            block = np.zeros(16_000, dtype)
            block["input_ids"] = rng.integers(0, 30522, (16_000, max_len))
            shards.append(write_shard(writer.split_dir("train"), index, block))
        writer.finish({"max_len": max_len, "options": {}, "vocab": {"size": 30522},
                       "splits": {"train": {"rows": rows, "shards": shards}}})
    split = open_dataset(tmp_path / "big").split("train")
    assert PageReleaser(split).enabled
    layout = BatchLayout(16)
    stream = BatchStream(split, BatchOrder(split.rows, layout.global_rows, seed=0), layout, CPU)
    for _ in range(100):  # first runs of code paths fault in library pages
        stream.next()
    before = _rss_bytes()
    for _ in range(2900):
        stream.next()
    grown = _rss_bytes() - before
    stream.close()
    read = 2900 * 16 * max_len * 2
    assert read > 20 << 20
    # Without releasing, this grows by about the whole 24 MB: the kernel maps 64 kB around every page fault.
    assert grown < 2 << 20, f"resident memory grew by {grown / 2**20:.1f} MiB over {read / 2**20:.0f} MiB read"
