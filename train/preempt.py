"""Stopping a run when asked: schedulers (Slurm, Kubernetes, torchrun passing theirs on) send SIGTERM a while before
SIGKILL, and Ctrl-C sends SIGINT. The first one lets the current optimizer step finish; the loop then saves a
checkpoint, prints the command that resumes it and exits 128 + the signal (143, 130). A second one stops at once.
"""

from __future__ import annotations

import os
import shlex
import signal
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from train.runtime import Runtime

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
SAME_REQUEST_S = 1.0
"""A second signal sooner than this after the first is the same request delivered twice: Slurm signals every
process of a job, and torchrun passes the one it got on to its workers as well."""


class Preempted(Exception):
    """Raised by the loop once the checkpoint of a stop request is written (on every process)."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}")
        self.signum, self.step = signum, step

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


class StopRequests:
    """While entered (from the main thread), the first SIGTERM or SIGINT is recorded in `signum` instead of ending
    the process; a second one, `SAME_REQUEST_S` or more after the first, ends it at once with status 128 + the
    signal. A thread of its own reads the signals from Python's wakeup file descriptor, so both work while the main
    thread waits inside C (a collective whose peer died, a long kernel), where Python handlers would never run."""

    def __init__(self, announce: bool = True):
        self.announce = announce
        self.signum: int | None = None
        self._first_at = 0.0
        self._previous: dict = {}
        self._pipe: tuple[int, int] | None = None
        self._old_wakeup_fd = -1
        self._reader: threading.Thread | None = None

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is not threading.main_thread():
            return self
        self._pipe = os.pipe()
        os.set_blocking(self._pipe[1], False)
        self._reader = threading.Thread(target=self._read, name="stop-requests", daemon=True)
        self._reader.start()
        # The handlers only keep the default actions away (death, KeyboardInterrupt); the reader does the work.
        self._previous = {s: signal.signal(s, lambda signum, frame: None) for s in STOP_SIGNALS}
        self._old_wakeup_fd = signal.set_wakeup_fd(self._pipe[1], warn_on_full_buffer=False)
        return self

    def __exit__(self, *exc) -> None:
        if self._pipe is None:
            return
        signal.set_wakeup_fd(self._old_wakeup_fd)
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        os.write(self._pipe[1], b"\0")  # no signal has number 0: it tells the reader to end
        self._reader.join()
        for fd in self._pipe:
            os.close(fd)
        self._pipe = None

    def _read(self) -> None:
        while True:
            for signum in os.read(self._pipe[0], 64):
                if signum == 0:
                    return
                if signum in STOP_SIGNALS:
                    self._received(signum)

    def _received(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum, self._first_at = signum, time.monotonic()
            if self.announce:
                os.write(2, f"\n{name}: finishing this step, then saving a checkpoint (send it again to stop at "
                            f"once)\n".encode())
        elif time.monotonic() - self._first_at >= SAME_REQUEST_S:
            os.write(2, f"\n{name} again: stopping at once\n".encode())
            os._exit(128 + signum)


def agreed_stop(requests: StopRequests, runtime: Runtime) -> int:
    """The signal every process stops for after this step, or 0 to go on: the same answer on every rank, whichever
    ranks were signalled and when. A collective of one int per step; the step has already waited for its loss on
    the host, so on a GPU this adds one small all-reduce's latency (microseconds) and no extra synchronisation."""
    if not runtime.distributed:
        return requests.signum or 0
    flag = torch.tensor([requests.signum or 0], dtype=torch.int32, device=runtime.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


def resume_command(run_dir: Path) -> str:
    """The command line that continues the run, with torchrun's process counts when it runs under torchrun."""
    run = f"run --run-dir {shlex.quote(str(run_dir))} --resume"
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return f"berttrain {run}"
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if per_node == world_size:
        return f"torchrun --standalone --nproc_per_node {per_node} -m train {run}"
    return f"torchrun --nnodes {world_size // per_node} --nproc_per_node {per_node} (and your rendezvous options) " \
           f"-m train {run}"
