"""Op dispatch: the one place that decides which implementation of each op runs.

Chosen once, when a model is loaded: Triton kernels on CUDA, plain torch on CPU. Either side
can be forced (tests compare them, benchmarks measure them), and attention has its own switch
because torch may offer a varlen flash attention with a window of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

from . import ops_torch

BACKENDS = ("auto", "torch", "triton")
ATTENTION_BACKENDS = ("auto", "torch", "triton", "triton-rope", "torch-varlen", "torch-varlen-global")


@dataclass(frozen=True)
class Ops:
    name: str
    layer_norm: Callable  # (x, weight, eps, residual=None) -> (LN(x + residual), x + residual)
    rotary: Callable  # (qkv [T,3,h,d], positions [T], cos, sin) -> qkv rotated
    attention: Callable  # (qkv, batch, window | None, scale) -> [T, h * d]
    geglu: Callable  # (u [T, 2I]) -> [T, I]
    pool: Callable  # (hidden [T,H], batch, mode, dim, normalize) -> [B, dim] fp32
    # Store Linear weights [out, in] column-major (contiguous [in, out]): CPU BLAS runs x @ W^T
    # faster as a plain NN product. GPU GEMMs take the checkpoint's row-major layout as it is.
    column_major_weights: bool = False
    # The attention op rotates q and k itself as it loads them (attention(..., rope=(cos, sin)));
    # the model then skips the rotary op and its pass over q and k.
    fused_rotary: bool = False


TORCH_OPS = Ops(
    name="torch",
    layer_norm=ops_torch.layer_norm,
    rotary=ops_torch.rotary,
    attention=ops_torch.attention,
    geglu=ops_torch.geglu,
    pool=ops_torch.pool,
    column_major_weights=True,
)


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def select_ops(device: torch.device | str, backend: str = "auto", attention: str = "auto") -> Ops:
    """The ops for `device`. backend: "auto" (triton on CUDA, torch elsewhere), "torch", "triton".
    attention: "auto" (follows backend), "torch", "triton", "triton-rope" (the Triton kernel with the
    rotary embedding applied inside it, so no separate rotary pass) or "torch-varlen" (torch's own
    varlen flash attention, CUDA only, where the installed torch has it) or "torch-varlen-global"
    (torch's varlen attention for the global layers, the Triton kernel for the windowed ones: for a
    torch whose varlen attention has no window, or where each wins its own layer type)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown ops backend {backend!r}; choose one of {BACKENDS}")
    if attention not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {attention!r}; choose one of {ATTENTION_BACKENDS}")
    device = torch.device(device)
    if backend == "auto":
        backend = "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "torch":
        ops = TORCH_OPS
    else:
        if not triton_available():
            raise RuntimeError("backend 'triton' was asked for but triton is not installed")
        from .kernels import triton_ops

        ops = triton_ops()
    if device.type != "cpu":
        ops = replace(ops, column_major_weights=False)
    if attention == "auto":
        return ops
    if attention == "torch":
        attn = ops_torch.attention
    elif attention == "triton":
        from .kernels.attention import attention as attn
    elif attention == "triton-rope":  # the same kernel, given the tables: the model skips rotary
        from .kernels.attention import attention as attn
    elif attention == "torch-varlen":
        from .kernels.torch_varlen import varlen_attention as attn
    else:
        from .kernels.attention import attention as local_attn
        from .kernels.torch_varlen import varlen_attention as global_attn

        attn = per_layer_type(global_attn, local_attn)
    return replace(ops, name=ops.name + f"+attn:{attention}", attention=attn,
                   fused_rotary=attention == "triton-rope")


def per_layer_type(global_attention: Callable, local_attention: Callable) -> Callable:
    """One attention op that sends global layers (window None) to one implementation and windowed
    layers to another."""

    def attention(qkv, batch, window, scale):
        return (global_attention if window is None else local_attention)(qkv, batch, window, scale)

    return attention
