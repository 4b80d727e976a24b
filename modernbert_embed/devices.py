"""Where the model runs and in what precision: the device, the dtype and the batch budget.

- Device: `resolve_device` (a CUDA index must exist).
- dtype: float32 on the CPU; on a GPU bfloat16 where it has native bf16 (compute capability 8.0 and
  newer), float16 before that (`gpu_dtypes`).
- Batch budget: `default_max_batch_tokens` (4096 tokens per forward on the CPU, 16384 on a GPU).
- The CPU's heap: `keep_cpu_heap` (glibc's malloc keeps freed memory for the next forward).

Which op implementations run there is the dispatch's (`ops.py`), which exports these names too.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

import torch

from .batching import CPU_MAX_BATCH_TOKENS, GPU_MAX_BATCH_TOKENS
from .kernels._arch import capability

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
# Compute capability (x10) from which a GPU has native bf16.
BF16_MIN_ARCH = 80


def resolve_device(device=None) -> torch.device:
    """The device to load on: CUDA when present (the current GPU), else the CPU. `cuda:N` must name
    a GPU this machine has."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r} is not a device ({e})") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {str(device)!r} is not supported (cpu, cuda or cuda:N)")
    if device.type == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} was requested but no CUDA GPU is available")
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if device.index is None else device.index
    if not 0 <= index < count:
        have = ", ".join(f"cuda:{i}" for i in range(count))
        raise ValueError(f"device {str(device)!r} does not exist: this machine has {count} CUDA "
                         f"GPU{'s' if count != 1 else ''} ({have})")
    return torch.device("cuda", index)


def arch(device: torch.device) -> int | None:
    """Compute capability x 10 of a CUDA device (90 for an H100), None for the CPU."""
    return capability(device)


def gpu_name(device: torch.device) -> str:
    return f"{torch.cuda.get_device_name(device)} (sm_{arch(device)})" if device.type == "cuda" else "cpu"


def gpu_dtypes(cc: int) -> tuple[torch.dtype, ...]:
    """The dtypes a GPU of compute capability `cc` (x 10) runs, its default first: bfloat16 only
    with native bf16 (8.0 and newer), else float16; float32 everywhere."""
    if cc >= BF16_MIN_ARCH:
        return torch.bfloat16, torch.float16, torch.float32
    return torch.float16, torch.float32


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """float32 on the CPU; bfloat16 on GPUs with native bf16 (compute capability >= 8.0), float16
    on older ones. A dtype given by name or as a torch dtype is checked against the device."""
    if dtype is None:
        return gpu_dtypes(arch(device))[0] if device.type == "cuda" else torch.float32
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in DTYPES:
        dtype = DTYPES[dtype.lower().removeprefix("torch.")]
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype {dtype!r} is not supported (float32, bfloat16, float16)")
    if device.type == "cuda" and dtype not in gpu_dtypes(arch(device)):
        raise ValueError(f"bfloat16 needs a GPU of compute capability 8.0 or newer; {gpu_name(device)} "
                         "has no native bf16: use float16 (the default there) or float32")
    return dtype


def default_max_batch_tokens(device: torch.device) -> int:
    """Tokens per forward when the caller does not say: see `batching.CPU_MAX_BATCH_TOKENS`."""
    return CPU_MAX_BATCH_TOKENS if torch.device(device).type == "cpu" else GPU_MAX_BATCH_TOKENS


# glibc's mallopt parameters, and what `keep_cpu_heap` sets them to.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 32 << 20  # the largest glibc takes: blocks up to it come from the heap
TRIM_THRESHOLD = 512 << 20  # free memory kept at the heap's top before it goes back to the system
TOP_PAD = 64 << 20  # slack kept by each heap (a thread's arena gives back no heap while within it)
KEEP_HEAP_ENV = "MODERNBERT_EMBED_KEEP_HEAP"  # "0": leave the allocator as it is


@functools.cache  # once per process (two threads racing here would set the same values twice)
def keep_cpu_heap() -> str:
    """Have glibc's malloc keep freed memory for reuse, once per process; returns what was done.

    A CPU forward allocates and frees tensors of up to tens of MB per op. glibc serves blocks above
    its (adaptive) mmap threshold with fresh mmaps and gives the heap's free top back to the system
    past its trim threshold, so the same memory is faulted in again, page by page and zeroed, on
    every op: 500k page faults per 10k-token forward of the base model in float32, 13% of its CPU
    time (2-core AMD EPYC). Fixing the mmap threshold at its maximum (32 MiB), keeping up to
    512 MiB free at the heap's top and a top pad of 64 MiB (without it a thread's arena, the
    server's worker, still unmapped its emptied heaps) removes them: the process keeps up to
    512 MiB of freed heap instead of returning it between forwards. Nothing is changed where it
    cannot apply or was chosen already: not glibc, its thresholds set in the environment
    (`MALLOC_MMAP_THRESHOLD_`, ..., `GLIBC_TUNABLES`), another allocator preloaded, or
    MODERNBERT_EMBED_KEEP_HEAP=0."""
    if os.environ.get(KEEP_HEAP_ENV, "1").strip() == "0":
        return f"left as it is ({KEEP_HEAP_ENV}=0)"
    if not sys.platform.startswith("linux"):
        return "left as it is (not Linux)"
    chosen = [k for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
              if k in os.environ]
    chosen += ["GLIBC_TUNABLES"] if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "") else []
    if chosen:
        return f"left as it is ({', '.join(chosen)} set)"
    if "malloc" in os.environ.get("LD_PRELOAD", ""):
        return "left as it is (an allocator is preloaded)"
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - glibc only
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "left as it is (not glibc)"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not all(mallopt(param, value) == 1 for param, value in (
            (_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD), (_M_TOP_PAD, TOP_PAD))):
        return "left as it is (mallopt refused)"
    return (f"glibc keeps freed memory (mmap threshold {MMAP_THRESHOLD >> 20} MiB, trim {TRIM_THRESHOLD >> 20} MiB, "
            f"top pad {TOP_PAD >> 20} MiB)")


__all__ = ["resolve_device", "resolve_dtype", "arch", "gpu_name", "gpu_dtypes", "default_max_batch_tokens",
           "keep_cpu_heap", "DTYPES", "BF16_MIN_ARCH"]
