"""The data path: which rows make each step's batch, and how they reach the device without copies.

The sequence of global batches is a pure function of (seed, epoch): every epoch the split is cut into blocks of
`global_rows` contiguous rows (at an offset drawn per epoch, so the rows left over differ between epochs) and the
blocks are put in a keyed random order. Step s of a run reads block s of that sequence, so resuming at step s costs
one permutation, never a replay. A block is split the same way whatever the number of processes: micro-step a of
rank r takes rows [(a * world + r) * batch_rows, ... + batch_rows) of the block, so 2 processes x 8 rows read
exactly the rows that 1 process x 16 rows reads.

Rows travel as views of the memory map: a slice, `torch.from_numpy` on it (no copy), then one widening copy to
int64 on the device (pinned and non-blocking on CUDA), prepared on a background thread while the step before runs.
"""

from __future__ import annotations

import mmap
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from prep.errors import BertError
from prep.shards import Split

FAULT_AROUND_BYTES = 64 << 10


def _consume_read_only_warning() -> None:
    """torch warns, once per process, when a tensor is made over read-only memory. Shard maps are read-only and so
    are the tensors made from them: nothing here writes to them, every tensor the model sees is the widened copy
    made on the device. So the one warning is spent here, at import, where a local filter is thread-safe."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        read_only = np.zeros(1, dtype=np.uint8)
        read_only.flags.writeable = False
        torch.from_numpy(read_only)


_consume_read_only_warning()


@dataclass(frozen=True)
class BatchLayout:
    """How one optimizer step's global batch is split between processes and accumulation micro-steps."""

    batch_rows: int
    """Rows per process per micro-step (--batch-size)."""
    grad_accum: int = 1
    """Micro-steps per optimizer step (--grad-accum)."""
    world_size: int = 1
    """Processes taking part (torchrun's WORLD_SIZE)."""
    rank: int = 0
    """This process's index among them."""

    def __post_init__(self):
        if self.batch_rows < 1:
            raise BertError(f"--batch-size must be at least 1, got {self.batch_rows}")
        if self.grad_accum < 1:
            raise BertError(f"--grad-accum must be at least 1, got {self.grad_accum}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world of {self.world_size}")

    @property
    def global_rows(self) -> int:
        """Rows of one optimizer step over all processes and micro-steps."""
        return self.batch_rows * self.grad_accum * self.world_size

    def micro_starts(self) -> list[int]:
        """First row of each of this rank's micro-batches, relative to the start of the global block."""
        return [(a * self.world_size + self.rank) * self.batch_rows for a in range(self.grad_accum)]


class BatchOrder:
    """The keyed order of global batches over a split of `rows` rows: block starts per epoch, fixed by the seed."""

    def __init__(self, rows: int, global_rows: int, seed: int):
        if global_rows > rows:
            raise BertError(
                f"one step needs {global_rows} rows (batch size x grad accum x processes) but the split has only "
                f"{rows}: lower --batch-size or --grad-accum, or make more data"
            )
        self.rows, self.global_rows, self.seed = rows, global_rows, seed
        self.steps_per_epoch = rows // global_rows
        self._epoch, self._starts = -1, np.empty(0, dtype=np.int64)

    def block_starts(self, epoch: int) -> np.ndarray:
        """int64 [steps_per_epoch]: the first row of each global batch of `epoch`, in the order they are read."""
        if epoch != self._epoch:
            rng = np.random.Generator(np.random.Philox(key=[self.seed & (2**64 - 1), epoch]))
            spare = self.rows - self.steps_per_epoch * self.global_rows
            offset = int(rng.integers(0, spare + 1))
            order = rng.permutation(self.steps_per_epoch)
            self._epoch, self._starts = epoch, offset + order.astype(np.int64) * self.global_rows
        return self._starts

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, batch within the epoch) of global step `step` (0-based)."""
        return divmod(step, self.steps_per_epoch)

    def block_start(self, step: int) -> int:
        epoch, index = self.position(step)
        return int(self.block_starts(epoch)[index])


def as_tensors(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Tensors over the same memory as `arrays` (no copy; read-only when the arrays are map views)."""
    return {name: torch.from_numpy(np.asarray(array)) for name, array in arrays.items()}


def to_device(tensors: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """int64 copies of `tensors` on `device`: widened once per batch, pinned and non-blocking on CUDA."""
    if device.type == "cuda":
        return {name: t.pin_memory().to(device, non_blocking=True).long() for name, t in tensors.items()}
    return {name: t.to(device=device, dtype=torch.long) for name, t in tensors.items()}


class PageReleaser:
    """Drops this process's mapping of rows it has finished with (madvise DONTNEED), so resident memory stays flat.

    A map keeps every page it has touched resident for as long as it lives, which over a long run is the whole
    dataset. The pages stay in the OS page cache: reading the rows again costs a minor fault, not a disk read.
    """

    def __init__(self, split: Split):
        self.split = split
        self.enabled = hasattr(mmap, "MADV_DONTNEED") and hasattr(mmap.mmap, "madvise")
        # Per shard and array: (mmap, byte offset of row 0 inside the mmap, bytes per row).
        self._maps: list[dict[str, tuple[mmap.mmap, int, int]]] = []
        for shard in split.shards:
            entry = {}
            for name, array in shard.items():
                handle = getattr(array, "_mmap", None)
                if handle is None or array.shape[0] == 0:
                    continue
                map_start = array.offset - array.offset % mmap.ALLOCATIONGRANULARITY
                entry[name] = (handle, array.offset - map_start, array.strides[0])
            self._maps.append(entry)

    def release(self, start: int, stop: int) -> None:
        """Releases the pages holding rows [start, stop) of the split (whole pages around them)."""
        if not self.enabled or start >= stop:
            return
        while start < stop:
            shard, offset = self.split.locate(start)
            take = min(stop - start, int(self.split.shard_rows[shard]) - offset)
            for handle, row0, row_bytes in self._maps[shard].values():
                # A page fault maps its neighbours too (Linux fault-around, 64 kB): release those with it.
                begin = max(0, row0 + offset * row_bytes - FAULT_AROUND_BYTES)
                end = min(row0 + (offset + take) * row_bytes + FAULT_AROUND_BYTES, len(handle))
                aligned = begin - begin % mmap.PAGESIZE
                try:
                    handle.madvise(mmap.MADV_DONTNEED, aligned, end - aligned)
                except (OSError, ValueError):  # a closed or odd map: releasing is only an optimisation
                    pass
            start += take


@dataclass
class StepBatch:
    """One optimizer step's data for this process."""

    step: int
    """Global step (0-based) this data belongs to."""
    epoch: int
    """Epoch of the step."""
    micro: list[dict[str, torch.Tensor]]
    """One dict per micro-step: int64 tensors on the device, named as the shard arrays."""
    wait_s: float = 0.0
    """Seconds the training loop waited for this batch (0 when it was ready)."""


class BatchStream:
    """This process's batches for steps start_step, start_step + 1, ..., each prepared one step ahead on a thread.

    `repeat_step` makes every step read the batch of that one step (--overfit-batch).
    """

    def __init__(self, split: Split, order: BatchOrder, layout: BatchLayout, device: torch.device,
                 start_step: int = 0, repeat_step: int | None = None, release_pages: bool = True):
        self.split, self.order, self.layout, self.device = split, order, layout, device
        self.repeat_step = repeat_step
        self.releaser = PageReleaser(split) if release_pages else None
        self._next_step = start_step
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batches")
        self._pending = self._pool.submit(self._prepare, self._next_step)

    def _prepare(self, step: int) -> StepBatch:
        source_step = step if self.repeat_step is None else self.repeat_step
        epoch, _ = self.order.position(source_step)
        block = self.order.block_start(source_step)
        micro = []
        for start in self.layout.micro_starts():
            lo, hi = block + start, block + start + self.layout.batch_rows
            micro.append(to_device(as_tensors(self.split.slice(lo, hi)), self.device))
            if self.releaser is not None and self.repeat_step is None:
                self.releaser.release(lo, hi)
        return StepBatch(step=step, epoch=epoch, micro=micro)

    def next(self) -> StepBatch:
        """The next step's batch; its `wait_s` is how long this call blocked."""
        began = time.perf_counter()
        batch = self._pending.result()
        batch.wait_s = time.perf_counter() - began
        self._next_step += 1
        self._pending = self._pool.submit(self._prepare, self._next_step)
        return batch

    def __iter__(self) -> Iterator[StepBatch]:
        while True:
            yield self.next()

    def close(self) -> None:
        self._pending.cancel()
        self._pool.shutdown(wait=True)

    def __enter__(self) -> "BatchStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def eval_slices(rows: int, batch_rows: int, world_size: int = 1, rank: int = 0,
                max_rows: int | None = None) -> list[tuple[int, int]]:
    """This rank's share of the row ranges [start, stop) that evaluate the first `max_rows` rows (all by default)
    in order, batch by batch: batch i goes to rank i % world_size. The last batch may be short."""
    total = rows if max_rows is None else min(rows, max_rows)
    starts = range(0, total, batch_rows)
    return [(s, min(s + batch_rows, total)) for i, s in enumerate(starts) if i % world_size == rank]


def eval_batches(split: Split, slices: list[tuple[int, int]], device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    """The rows of `slices` on the device, the next one prepared on a thread while the current one is used."""
    releaser = PageReleaser(split)

    def prepare(lo_hi):
        lo, hi = lo_hi
        batch = to_device(as_tensors(split.slice(lo, hi)), device)
        releaser.release(lo, hi)
        return batch

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="eval-batches") as pool:
        pending = pool.submit(prepare, slices[0]) if slices else None
        for i in range(len(slices)):
            batch = pending.result()
            pending = pool.submit(prepare, slices[i + 1]) if i + 1 < len(slices) else None
            yield batch
