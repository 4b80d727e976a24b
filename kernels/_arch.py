"""The compute capability a kernel is built for: the GPU its tensors live on, or a target set for
CPU tensors (the ahead-of-time compile check, which has no GPU).

Written as one number, compute capability x 10: 75 (T4), 80 (A100), 86 (A10, RTX 30xx),
89 (L4, L40, RTX 40xx), 90 (H100, H200). Imports no triton, so that the dispatch (`ops.py`) can
read capabilities without loading the kernels.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import torch

# The architecture CPU tensors stand for; None outside `target_arch` (the interpreter's runs).
_TARGET: contextvars.ContextVar[int | None] = contextvars.ContextVar("modernbert_embed_target_arch", default=None)


def capability(device: torch.device) -> int | None:
    """Compute capability x 10 of a CUDA device, read from the driver now; None for any other
    device. The dispatch calls this once at load."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


@functools.lru_cache(maxsize=None)
def _cuda_arch(index: int) -> int:
    return capability(torch.device("cuda", index))


def device_arch(device: torch.device) -> int | None:
    """The architecture a launch on `device` compiles for: the GPU's capability (read once per
    device: launchers call this on every launch), or for CPU tensors the `target_arch` in force
    (None outside one)."""
    if device.type == "cuda":
        return _cuda_arch(torch.cuda.current_device() if device.index is None else device.index)
    return _TARGET.get()


@contextlib.contextmanager
def target_arch(arch: int | None):
    """Inside the block, launchers given CPU tensors choose their tiles for sm_<arch>."""
    token = _TARGET.set(arch)
    try:
        yield
    finally:
        _TARGET.reset(token)
