"""Input checks shared by the launchers of kernels that read the packed qkv tensor."""

from __future__ import annotations

import torch


def check_qkv(qkv: torch.Tensor, why_contiguous: str = "") -> tuple[int, int, int]:
    """qkv must be [T, 3, heads, head_dim], contiguous, fp32/fp16/bf16. Returns (T, heads, head_dim)."""
    if qkv.dim() != 4 or qkv.shape[1] != 3:
        raise ValueError(f"qkv must be [T, 3, heads, head_dim], got {tuple(qkv.shape)}")
    if qkv.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"qkv must be float32, float16 or bfloat16, got {qkv.dtype}")
    if not qkv.is_contiguous():
        raise ValueError("qkv must be contiguous" + (f" ({why_contiguous})" if why_contiguous else ""))
    T, _, heads, head_dim = qkv.shape
    return T, heads, head_dim


def check_rope_tables(cos, sin, half: int, device: torch.device) -> None:
    """The rotary tables must be float32 [max_positions, half] tensors on `device` (qkv's)."""
    for name, t in (("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.dim() != 2 or t.shape[1] != half:
            raise ValueError(f"rotary {name} table must be float32 [max_positions, {half}], got "
                             f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
        if t.device != device:
            raise ValueError(f"rotary {name} table is on {t.device} but qkv is on {device}")
