"""The shard job's worker processes: tasks run in any order and their (small) results come back, or, for one
worker, everything runs here."""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


class WorkerPool:
    """`workers` processes started with `fork` (sharing what this process loaded), or `spawn` where there is no
    fork, each running `initializer(*initargs)` (`spawn_initargs` under spawn) first. SIGTERM, with which the pool
    stops them, kills them at once whatever handler this process has; on Linux they die with this process too."""

    def __init__(self, workers: int, initializer: Callable, initargs: tuple, spawn_initargs: tuple):
        self.workers = workers
        self._pool = None
        if workers > 1:
            # fork starts workers in milliseconds; no thread runs yet, which makes it safe.
            if "fork" in multiprocessing.get_all_start_methods():
                context, args = multiprocessing.get_context("fork"), initargs
            else:
                context, args = multiprocessing.get_context("spawn"), spawn_initargs
            # SIGTERM stays blocked while the workers start, and they inherit that: a pool that fails half-way (out of
            # file descriptors) terminates the workers it has, and one just forked would lose a SIGTERM that came
            # before Python set up its signals (the job then hung in join). Blocked, it waits for _start_worker.
            with _sigterm_blocked():
                self._pool = context.Pool(workers, initializer=_start_worker,
                                          initargs=(os.getpid(), initializer, *args))

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()

    def unordered(self, calls: Iterable[tuple[Callable, tuple]]) -> Iterator:
        """fn(*args) for every (fn, args) of `calls`, as each finishes."""
        if self._pool is None:
            return (fn(*args) for fn, args in calls)
        return self._pool.imap_unordered(_call, calls)

    def ordered(self, calls: Iterable[tuple[Callable, tuple]]) -> list:
        """fn(*args) for every (fn, args) of `calls`, in their order."""
        if self._pool is None:
            return [fn(*args) for fn, args in calls]
        return self._pool.map(_call, list(calls), chunksize=1)

    def later(self, fn: Callable, *args):
        """Starts fn(*args); returns an object whose get() waits for the result."""
        if self._pool is None:
            return _Done(fn(*args))
        return self._pool.apply_async(fn, args)


def _start_worker(parent: int, initializer: Callable, *initargs) -> None:
    # terminate() sends SIGTERM holding the task queue's lock; the CLI's Python-level handler runs only between
    # bytecodes, so a worker it reached just as it blocked on that lock never ran it, and terminate() hung.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # a SIGTERM already sent kills it here
    _die_with_parent(parent)
    initializer(*initargs)


@contextmanager
def _sigterm_blocked() -> Iterator[None]:
    """SIGTERM blocked in this thread while the block runs (where there are signal masks); one that came meanwhile
    is delivered as it ends."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _die_with_parent(parent: int) -> None:
    """Has the kernel SIGKILL this worker when the job's main process dies (kill -9, the OOM killer): an orphan would
    go on writing into the dead job's staging directory while the next job deletes it. Linux only; elsewhere
    orphans stop at their next message to the pool."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return
    prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def _call(fn_and_args: tuple):
    fn, args = fn_and_args
    return fn(*args)


class _Done:
    def __init__(self, value):
        self.value = value

    def get(self):
        return self.value


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
