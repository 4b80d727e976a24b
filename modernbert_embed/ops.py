"""Dispatch: the one place that decides which implementation of each op runs, on which device.

- Ops, chosen once at load: the tuned torch path on the CPU (`ops_torch`: oneDNN's packed GEMMs,
  the window block by block); Triton kernels (`kernels/`) on CUDA GPUs of compute capability 7.5
  and newer (older ones get the torch path). Attention follows the GPU: where the Triton attention
  kernel cannot serve an architecture well (`TRITON_ATTENTION_MIN_ARCH`), torch's runs.
  The policy is `ops_for_arch` (by compute capability); `compile_check --arch N` compiles
  exactly what it picks for sm_N, in each dtype of `gpu_dtypes(N)`. Within a kernel, the tiles
  follow the GPU of the tensors it is given (the launchers, via `kernels._arch`).
- `self_check` has each chosen op run against its plain torch version (`load_check`, against
  `reference`); an op that fails to compile or disagrees is replaced by the torch path's, with one
  warning naming the ops and the GPU, so that a broken kernel shows at load and not on a user's
  first batch.
- The device, the dtype and the batch budget are `devices`' (`resolve_device`, `resolve_dtype`,
  `default_max_batch_tokens`), exported here too.

Experiments (other attention implementations, the CPU's int8 weights: `int8`) are `select_ops`
arguments; a model built with them goes through `Embedder.from_checkpoint(..., ops=select_ops(...))`.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, replace
from typing import Callable

import torch

from . import int8, load_check, ops_torch
from .devices import (BF16_MIN_ARCH, DTYPES, arch, default_max_batch_tokens, gpu_dtypes, gpu_name,
                      resolve_device, resolve_dtype)

BACKENDS = ("auto", "torch", "triton")
ATTENTION_BACKENDS = ("auto", "torch", "triton", "triton-rope", "torch-varlen", "torch-varlen-global")
# Compute capability (x10) from which the Triton kernels run at all, and from which the Triton
# attention runs: for sm_75 (T4) triton compiles its dots without tensor cores, and every
# half-precision attention tile spills (128 x 64: 12 KB per thread; even 32 x 32 spills in full
# attention), so torch's attention serves those GPUs better. From sm_80 every variant compiles to
# tensor-core dots without spills (`compile_check`).
TRITON_MIN_ARCH = 75
TRITON_ATTENTION_MIN_ARCH = 80


@dataclass(frozen=True)
class Ops:
    name: str
    layer_norm: Callable  # (x, weight, eps, residual=None) -> (LN(x + residual), x + residual)
    rotary: Callable  # (qkv [T,3,h,d], positions [T], cos, sin) -> qkv rotated
    attention: Callable  # (qkv, batch, window | None, scale) -> [T, h * d]
    geglu: Callable  # (u [T, 2I]) -> [T, I]
    pool: Callable  # (hidden [T,H], batch, mode, dim, normalize) -> [B, dim] fp32
    # The Linear layers' GEMM: at load, `pack_linear(weight [out, in], geglu)` turns each weight into
    # the form `linear(x, packed)` takes (GPU: the weight as it is, for cuBLAS; CPU: oneDNN's blocked
    # layout). `geglu_linear(x, packed Wi)`, where set, is Wi's GEMM with the GeGLU applied as it
    # writes (Wi is packed with `geglu=True`); None: Wi's `linear`, then the `geglu` op.
    pack_linear: Callable = ops_torch.keep_weight
    linear: Callable = ops_torch.linear
    geglu_linear: Callable | None = None
    # The attention op rotates q and k itself as it loads them (attention(..., rope=(cos, sin)));
    # the model then skips the rotary op and its pass over q and k.
    fused_rotary: bool = False
    # The rotary op takes each head's q and k features as (x_j, x_{j + d/2}) pairs, not halves: the
    # model reorders its Wqkv rows to match at load (attention scores do not change: q and k are
    # reordered alike). On the CPU the rotation is then one complex multiplication.
    rotary_pairs: bool = False
    # An experiment on the CPU (`select_ops(..., int8_weights=True)`, not offered as a dtype: its
    # cosine to float32 missed the 0.995 bar, benchmarks/RESULTS.md): every Linear weight is
    # quantised to int8 per output feature at load and its input per call (`pack_linear` and
    # `linear` are `int8.int8_pack` / `int8_linear`); the rest of the model runs in float32.
    int8_weights: bool = False
    # (qkv rotated, batch with `key_lengths`, window | None, scale) -> [T, h * d]: attention where
    # only each sequence's first key_lengths[b] tokens are keys (ColBERT's query expansion with
    # unattended [MASK] tokens, as transformers' SDPA computes it); torch's SDPA on every device.
    key_limited_attention: Callable = ops_torch.key_limited_attention


OP_NAMES = ("layer_norm", "rotary", "attention", "geglu", "pool")

# The torch path (`ops_torch`, tuned; each op checked against its plain version in `reference`).
TORCH_OPS = Ops(
    name="torch",
    layer_norm=ops_torch.layer_norm,
    rotary=ops_torch.rotary,
    attention=ops_torch.attention,
    geglu=ops_torch.geglu,
    pool=ops_torch.pool,
)
# The CPU's: torch's ops with the rotary of the pairs layout, bfloat16 attention of short sequences
# through GEMMs (`ops_torch.cpu_attention`), and oneDNN's GEMMs on packed weights
# (BLAS on column-major weights where oneDNN cannot take the dtype: `ops_torch.cpu_pack`).
CPU_OPS = replace(TORCH_OPS, rotary=ops_torch.rotary_pairs, rotary_pairs=True, attention=ops_torch.cpu_attention,
                  pack_linear=ops_torch.cpu_pack, linear=ops_torch.cpu_linear, geglu_linear=ops_torch.cpu_geglu_linear)


# ----------------------------------------------------------------------------- ops
@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_ops() -> Ops:
    """The Triton kernels as one Ops record (imports triton)."""
    from .kernels.attention import attention
    from .kernels.geglu import geglu
    from .kernels.layer_norm import layer_norm
    from .kernels.pooling import pool
    from .kernels.rotary import rotary

    return Ops(name="triton", layer_norm=layer_norm, rotary=rotary, attention=attention, geglu=geglu, pool=pool)


def select_ops(device: torch.device | str, backend: str = "auto", attention: str = "auto",
               int8_weights: bool = False) -> Ops:
    """The ops for `device`. backend: "auto" (Triton on CUDA GPUs from compute capability 7.5,
    torch elsewhere), "torch", "triton". attention: "auto" (Triton's where the backend is Triton
    and the GPU is an Ampere or newer, else torch's), or one to measure: "torch", "triton",
    "triton-rope" (the Triton kernel rotating q and k as it loads them: no separate rotary pass),
    "torch-varlen" (torch's own varlen flash attention, CUDA only, where the installed torch has
    it), "torch-varlen-global" (torch's varlen attention for the global layers, the Triton kernel
    for the windowed ones). int8_weights: the CPU's int8 Linear layers, an experiment (see `Ops`)."""
    device = torch.device(device)
    if int8_weights and device.type != "cpu":
        raise ValueError("int8 weights run on the CPU only")
    if int8_weights and not int8.int8_available():
        raise ValueError("int8 weights need a torch build with a quantized CPU engine (fbgemm, oneDNN or "
                         "qnnpack); this one has none")
    ops = ops_for_arch(arch(device), backend, attention)
    if int8_weights:
        return replace(ops, name=ops.name + "+int8", int8_weights=True, pack_linear=int8.int8_pack,
                       linear=int8.int8_linear, geglu_linear=None)
    return ops


def ops_for_arch(cc: int | None, backend: str = "auto", attention: str = "auto") -> Ops:
    """The policy behind `select_ops`, by compute capability x 10 (None: not a CUDA GPU). The
    compile check (`compile_check`) reads it to compile what a GPU of `cc` would launch."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown ops backend {backend!r}; choose one of {BACKENDS}")
    if attention not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {attention!r}; choose one of {ATTENTION_BACKENDS}")
    if backend == "auto":
        backend = "triton" if cc is not None and cc >= TRITON_MIN_ARCH and triton_available() else "torch"
    if backend == "torch":
        ops = CPU_OPS if cc is None else TORCH_OPS
    else:
        if not triton_available():
            raise RuntimeError("backend 'triton' was asked for but triton is not installed")
        ops = triton_ops()
        if attention == "auto" and cc is not None and cc < TRITON_ATTENTION_MIN_ARCH:
            attention = "torch"
    if attention == "auto":
        return ops
    if attention == "torch":
        attn = ops_torch.attention
    elif attention in ("triton", "triton-rope"):  # triton-rope: the same kernel, given the tables
        from .kernels.attention import attention as attn
    elif attention == "torch-varlen":
        from .torch_varlen import varlen_attention as attn
    else:
        from .kernels.attention import attention as local_attn
        from .torch_varlen import varlen_attention as global_attn

        attn = route_by_window(global_attn, local_attn)
    return replace(ops, name=ops.name + f"+attn:{attention}", attention=attn,
                   fused_rotary=attention == "triton-rope")


def route_by_window(global_attention: Callable, local_attention: Callable) -> Callable:
    """One attention op that sends global layers (window None) to one implementation and windowed
    layers to another."""

    def attention(qkv, batch, window, scale):
        return (global_attention if window is None else local_attention)(qkv, batch, window, scale)

    return attention


# ----------------------------------------------------------------------------- the load-time check
def self_check(ops: Ops, cfg, device: torch.device, dtype: torch.dtype) -> Ops:
    """`ops` with every op that fails or disagrees with its plain torch version on tiny inputs
    (`load_check`, against `reference`) replaced by the torch path's, and one warning naming those
    ops and the device. Unchanged when all agree."""
    if ops.name == TORCH_OPS.name:
        return ops
    # the torch path's own ops (e.g. the attention below sm_80) are not kernels of ours to check
    names = [name for name in OP_NAMES if getattr(ops, name) is not getattr(TORCH_OPS, name)]
    failed = load_check.disagreements(ops, names, cfg, device, dtype)
    if not failed:
        return ops
    fixed: dict = {name: getattr(TORCH_OPS, name) for name in failed}
    if ops.fused_rotary and "attention" in failed:
        fixed["fused_rotary"] = False  # torch's attention takes rotated q and k: the rotary op runs again
    warnings.warn(
        f"modernbert-embed: on {gpu_name(device)} in {str(dtype).removeprefix('torch.')}, "
        + "; ".join(f"the {ops.name} {name} op {why}" for name, why in failed.items())
        + f"; using torch's {', '.join(failed)} instead", RuntimeWarning, stacklevel=2)
    return replace(ops, name=ops.name + "+torch:" + ",".join(failed), **fixed)


__all__ = ["Ops", "TORCH_OPS", "CPU_OPS", "select_ops", "ops_for_arch", "self_check", "triton_ops", "route_by_window",
           "OP_NAMES", "TRITON_MIN_ARCH", "TRITON_ATTENTION_MIN_ARCH",
           # from `devices`, where they live
           "resolve_device", "resolve_dtype", "arch", "gpu_name", "gpu_dtypes", "default_max_batch_tokens", "DTYPES",
           "BF16_MIN_ARCH"]
