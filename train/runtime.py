"""Where a process runs: processes (torchrun), device, precision, the CPU allocator, and the collective helpers
that the loop and evaluation share."""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from prep.errors import BertError
from prep.oserrors import os_error_message

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt() parameters


@dataclass(frozen=True)
class Runtime:
    """Where this process runs: its device, its place among the processes, its arithmetic."""

    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    precision: str = "fp32"
    """Resolved: fp32, bf16 or fp16."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)


def _cpu_has_bf16() -> bool:
    return any(getattr(torch.cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported",
                                                                       "_is_amx_tile_supported"))


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise BertError("--device cuda: no CUDA device is available; use --device cpu")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def resolve_precision(name: str, device: torch.device) -> str:
    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
        if name == "auto":
            return "bf16" if bf16 else "fp16"
        if name == "bf16" and not bf16:
            raise BertError("--precision bf16: this GPU has no bfloat16; use --precision fp16")
        return name
    if name == "fp16":
        raise BertError("--precision fp16 needs a CUDA device (its grad scaler is CUDA-only); use bf16 or fp32")
    if name == "auto":
        return "bf16" if _cpu_has_bf16() else "fp32"
    return name


def keep_freed_memory() -> bool:
    """Has glibc's malloc serve blocks of up to 1 GiB from its heap and keep what is freed there, rather than map
    each large block afresh and unmap it when it is freed. A CPU step allocates the same large buffers every time
    (the vocabulary matrix's bf16 copy and its gradients, tens of MB each), and fresh maps pay their page faults
    again at every step (docs/benchmarks.md measures it). The heap then stays at the size of one
    step's peak. Returns whether it applied (False where malloc is not glibc's)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 1 << 30)) and bool(mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1))


def setup(device: str = "auto", precision: str = "auto") -> Runtime:
    """Joins the process group when started by torchrun (WORLD_SIZE > 1) and picks device and precision."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        keep_freed_memory()
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return Runtime(device, rank, local_rank, world_size, resolve_precision(precision, device))


def teardown(runtime: Runtime) -> None:
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce(tensor: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """Sums `tensor` over the processes in place (a no-op in one process) and returns it."""
    if runtime.distributed:
        dist.all_reduce(tensor)
    return tensor


def on_main(runtime: Runtime, fn):
    """Runs `fn` on rank 0 only and gives every rank its result. A BertError or OSError of `fn` is raised on rank 0
    as it was, and on every other rank as a BertError with its message, so that no rank waits for one that left."""
    result, error, message = None, None, None
    if runtime.is_main:
        try:
            result = fn()
        except (BertError, OSError) as exc:
            error, message = exc, str(exc) if isinstance(exc, BertError) else os_error_message(exc)
    if runtime.distributed:
        box = [(result, message)]
        dist.broadcast_object_list(box, src=0)
        result, message = box[0]
    if error is not None:
        raise error
    if message is not None:
        raise BertError(message)
    return result


def log(runtime: Runtime, message: str) -> None:
    """A line on stderr from rank 0, above the progress bar."""
    if runtime.is_main:
        from tqdm import tqdm

        tqdm.write(message, file=sys.stderr)
