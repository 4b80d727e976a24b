"""Attention through torch's own varlen flash attention (`torch.nn.attention.varlen.varlen_attn`).

Same contract as `reference.attention`, for comparing the Triton kernel with a vendor kernel on the
same packed batch; an attention backend of the dispatch (`ops.select_ops(attention="torch-varlen")`). CUDA only, fp16/bf16 only (flash attention has no fp32 path). The function's
signature has changed between torch releases (`window_size` and `scale` arrived after the first
version), so what the installed torch offers is read from its signature, and a missing piece is
reported by name instead of silently computing something else.

Flash attention's window is (left, right) with inclusive bounds: key j is visible to query i when
i - left <= j <= i + right, so the model's |i - j| <= w is `window_size=(w, w)`.
"""

from __future__ import annotations

import functools
import inspect

import torch


@functools.lru_cache(maxsize=1)
def _varlen_fn():
    """(varlen_attn, names of its parameters), or (None, why not)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError as e:  # torch before 2.10
        return None, f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn ({e})"
    try:
        params = frozenset(inspect.signature(varlen_attn).parameters)
    except (TypeError, ValueError) as e:
        return None, f"cannot read the signature of torch's varlen_attn ({e})"
    return varlen_attn, params


def varlen_available() -> bool:
    """True when torch's varlen_attn exists and a CUDA device is present (whether the installed
    version also takes `window_size`, needed by local layers, is `varlen_supports_window()`)."""
    fn, _ = _varlen_fn()
    return fn is not None and torch.cuda.is_available()


def varlen_supports_window() -> bool:
    """True when the installed varlen_attn takes a `window_size=(left, right)` argument."""
    fn, params = _varlen_fn()
    return fn is not None and "window_size" in params


def varlen_attention(qkv, batch, window, scale):
    """Bidirectional attention within each packed sequence via torch's varlen flash attention.

    qkv: [T, 3, heads, head_dim] fp16/bf16 on CUDA; `batch.cu_seqlens` int32 on the same device.
    window: None for full attention, or the half window w (|i - j| <= w, inclusive).
    Returns [T, heads * head_dim] in qkv's dtype. Raises RuntimeError when the installed torch or
    the device cannot do it, naming what is missing.
    """
    fn, params = _varlen_fn()
    if fn is None:
        raise RuntimeError(f"attention backend 'torch-varlen' is unavailable: {params}")
    if qkv.device.type != "cuda":
        raise RuntimeError(
            f"attention backend 'torch-varlen' needs a CUDA tensor (flash attention), got one on {qkv.device}"
        )
    if qkv.dtype not in (torch.float16, torch.bfloat16):
        raise RuntimeError(
            f"attention backend 'torch-varlen' takes float16 or bfloat16 (flash attention), got {qkv.dtype}"
        )
    if qkv.dim() != 4 or qkv.shape[1] != 3:
        raise ValueError(f"qkv must be [T, 3, heads, head_dim], got {tuple(qkv.shape)}")
    cu = batch.cu_seqlens
    if cu.device != qkv.device or cu.dtype != torch.int32:
        raise ValueError(f"batch.cu_seqlens must be int32 on {qkv.device}, got {cu.dtype} on {cu.device}")

    T, _, heads, head_dim = qkv.shape
    q, k, v = qkv.unbind(1)  # views [T, heads, head_dim]: rows strided, last dim contiguous
    kwargs = {}
    if window is not None:
        if "window_size" not in params:
            raise RuntimeError(
                f"torch {torch.__version__}'s varlen_attn has no `window_size` argument, so it cannot "
                f"do the local (sliding-window) layers; use attention backend 'triton' or 'torch'"
            )
        kwargs["window_size"] = (int(window), int(window))  # inclusive on both sides
    if "scale" in params:
        kwargs["scale"] = float(scale)
    elif abs(scale * head_dim**0.5 - 1.0) > 1e-12:
        # older signature: the kernel always uses 1/sqrt(head_dim); fold the difference into q
        q = q * (scale * head_dim**0.5)
    max_len = int(batch.max_seqlen)
    out = fn(q, k, v, cu, cu, max_len, max_len, **kwargs)  # [T, heads, head_dim]
    return out.reshape(T, heads * head_dim)
