"""Where the model runs and in what precision: the device, the dtype and the batch budget.

- Device: `resolve_device` (a CUDA index must exist).
- dtype: float32 on the CPU; on a GPU bfloat16 where it has native bf16 (compute capability 8.0 and
  newer), float16 before that (`gpu_dtypes`).
- Batch budget: `default_max_batch_tokens` (4096 tokens per forward on the CPU, 16384 on a GPU).

Which op implementations run there is the dispatch's (`ops.py`), which exports these names too.
"""

from __future__ import annotations

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


__all__ = ["resolve_device", "resolve_dtype", "arch", "gpu_name", "gpu_dtypes", "default_max_batch_tokens",
           "DTYPES", "BF16_MIN_ARCH"]
