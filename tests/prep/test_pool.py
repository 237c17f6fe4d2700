"""The shard job's worker processes."""

import signal

from prep.pool import WorkerPool


def _nothing() -> None:
    pass


def _sigterm_kills() -> bool:
    return signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_workers_die_of_sigterm_whatever_handler_the_main_process_has():
    """The pool stops its workers with SIGTERM while it holds its task queue's lock. A worker must die of that
    signal at once: one that inherited the CLI's Python-level handler and got the signal just as it blocked on that
    lock never ran the handler, and `bertprep shard` hung at its end now and then on a busy machine."""
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)  # as the CLI's handler does
    try:
        with WorkerPool(2, _nothing, (), ()) as pool:
            in_workers = pool.ordered([(_sigterm_kills, ())] * 4)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert in_workers == [True] * 4
