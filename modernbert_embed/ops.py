"""Dispatch: the one place that decides the device, the dtype and which implementation of each op runs.

- Device: `resolve_device` (a CUDA index must exist).
- dtype: float32 on the CPU; on a GPU bfloat16 where it has native bf16 (compute capability 8.0 and
  newer), float16 before that.
- Ops, chosen once at load: torch's on the CPU, with the Linear layers on oneDNN's packed GEMMs;
  Triton kernels on CUDA GPUs of compute capability 7.5 and newer (older ones get torch).
  Attention follows the GPU: where the Triton attention kernel cannot serve an architecture well
  (`TRITON_ATTENTION_MIN_ARCH`), torch's runs.
  The policy is `ops_for_arch` (by compute capability); `compile_check --arch N` compiles
  exactly what it picks for sm_N, in each dtype of `gpu_dtypes(N)`. Within a kernel, the tiles
  follow the GPU of the tensors it is given (the launchers, via `kernels._arch`).
- Batch budget: `default_max_batch_tokens` (4096 tokens per forward on the CPU, 16384 on a GPU).
- `self_check` runs each chosen op once on tiny inputs against its torch version; an op that fails
  to compile or disagrees is replaced by torch's, with one warning naming the ops and the GPU, so
  that a broken kernel shows at load and not on a user's first batch.

Experiments (other attention implementations, to be measured) are `select_ops` arguments; a
model built with them goes through `Embedder.from_checkpoint(..., ops=select_ops(...))`.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, replace
from typing import Callable

import torch

from . import ops_torch
from .batching import CPU_MAX_BATCH_TOKENS, GPU_MAX_BATCH_TOKENS
from .kernels._arch import capability

BACKENDS = ("auto", "torch", "triton")
ATTENTION_BACKENDS = ("auto", "torch", "triton", "triton-rope", "torch-varlen", "torch-varlen-global")
DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
# Compute capability (x10) from which the Triton kernels run at all, and from which the Triton
# attention runs: for sm_75 (T4) triton compiles its dots without tensor cores, and every
# half-precision attention tile spills (128 x 64: 12 KB per thread; even 32 x 32 spills in full
# attention), so torch's attention serves those GPUs better. From sm_80 every variant compiles to
# tensor-core dots without spills (`compile_check`).
TRITON_MIN_ARCH = 75
TRITON_ATTENTION_MIN_ARCH = 80
BF16_MIN_ARCH = 80


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
    # `linear` are `ops_torch.int8_pack` / `int8_linear`); the rest of the model runs in float32.
    int8_weights: bool = False


OP_NAMES = ("layer_norm", "rotary", "attention", "geglu", "pool")

TORCH_OPS = Ops(
    name="torch",
    layer_norm=ops_torch.layer_norm,
    rotary=ops_torch.rotary,
    attention=ops_torch.attention,
    geglu=ops_torch.geglu,
    pool=ops_torch.pool,
)
# The CPU's: torch's ops with the rotary of the pairs layout, and oneDNN's GEMMs on packed weights
# (BLAS on column-major weights where oneDNN cannot take the dtype: `ops_torch.cpu_pack`).
CPU_OPS = replace(TORCH_OPS, rotary=ops_torch.rotary_pairs, rotary_pairs=True, pack_linear=ops_torch.cpu_pack,
                  linear=ops_torch.cpu_linear, geglu_linear=ops_torch.cpu_geglu_linear)


# ----------------------------------------------------------------------------- device and dtype
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
    if int8_weights and not ops_torch.int8_available():
        raise ValueError("int8 weights need a torch build with a quantized CPU engine (fbgemm, oneDNN or "
                         "qnnpack); this one has none")
    ops = ops_for_arch(arch(device), backend, attention)
    if int8_weights:
        return replace(ops, name=ops.name + "+int8", int8_weights=True, pack_linear=ops_torch.int8_pack,
                       linear=ops_torch.int8_linear, geglu_linear=None)
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
        from .kernels.torch_varlen import varlen_attention as attn
    else:
        from .kernels.attention import attention as local_attn
        from .kernels.torch_varlen import varlen_attention as global_attn

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
def _check_inputs(cfg, device, dtype):
    """Tiny inputs at the model's widths: two sequences, one longer than the window."""
    from .batching import pack
    from .rope import rope_tables

    g = torch.Generator().manual_seed(0)
    lengths = [cfg.local_window * 2 + 9, 3]
    T, H, heads, d = sum(lengths), cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
    batch = pack([[0] * n for n in lengths], range(len(lengths)), device)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    cos, sin = rope_tables(cfg.local_rope_theta, d, max(lengths), device)
    return batch, rand(T, H), rand(H), rand(T, H), rand(T, 3, heads, d), rand(T, 2 * cfg.intermediate_size), (cos, sin)


def _op_calls(ops: Ops, cfg, inputs):
    """{op name: thunk running that op of `ops` on `inputs`} (outputs as a tuple of tensors)."""
    batch, x, w, res, qkv, u, (cos, sin) = inputs
    scale = cfg.head_dim ** -0.5
    w_local = cfg.local_window

    def attention():
        if ops.fused_rotary:
            return (ops.attention(qkv.clone(), batch, None, scale, rope=(cos, sin)),
                    ops.attention(qkv.clone(), batch, w_local, scale, rope=(cos, sin)))
        q = ops_torch.rotary(qkv.clone(), batch.positions, cos, sin)
        return ops.attention(q, batch, None, scale), ops.attention(q, batch, w_local, scale)

    return {
        # with the residual add (the layers) and without (the embeddings' and the final norm)
        "layer_norm": lambda: (*ops.layer_norm(x, w, cfg.norm_eps, res), ops.layer_norm(x, w, cfg.norm_eps)[0]),
        "rotary": lambda: (ops.rotary(qkv.clone(), batch.positions, cos, sin),),
        "attention": attention,
        "geglu": lambda: (ops.geglu(u),),
        "pool": lambda: (ops.pool(x, batch, "mean", None, True), ops.pool(x, batch, "cls", 16, False)),
    }


def _tolerance(dtype) -> float:
    # far above a correct kernel's rounding (about 1e-6 fp32, 1e-2 bf16 on O(1) values), far below
    # what a wrong one gives (O(1))
    return 1e-3 if dtype == torch.float32 else 0.1


def _disagreement(got, want, tolerance) -> str:
    """Why the outputs `got` differ from torch's `want`, or "" when they agree."""
    shapes = [tuple(t.shape) for t in got], [tuple(t.shape) for t in want]
    if shapes[0] != shapes[1]:
        return f"returns shapes {shapes[0]}, torch's {shapes[1]}"
    diffs = [float((a.float() - b.float()).abs().max()) for a, b in zip(got, want) if a.numel()]
    if all(d <= tolerance for d in diffs):  # a NaN fails
        return ""
    worst = next((d for d in diffs if d != d), max(diffs))  # NaN first: max() may pass over it
    return f"disagrees with torch (max abs diff {worst:.3g})"


def self_check(ops: Ops, cfg, device: torch.device, dtype: torch.dtype) -> Ops:
    """`ops` with every op that fails or disagrees with its torch version on tiny inputs replaced
    by the torch version, and one warning naming those ops and the device. Unchanged when all agree."""
    if ops.name == TORCH_OPS.name:
        return ops
    inputs = _check_inputs(cfg, device, dtype)
    reference = _op_calls(replace(TORCH_OPS, fused_rotary=False), cfg, inputs)
    chosen = _op_calls(ops, cfg, inputs)
    failed: dict[str, str] = {}
    for name in OP_NAMES:
        if getattr(ops, name) is getattr(TORCH_OPS, name):
            continue  # torch's own op (e.g. the attention below sm_80): nothing to check
        try:
            got = chosen[name]()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        except Exception as e:  # noqa: BLE001 - a compile error, a launch error: any failure is the finding
            failed[name] = f"failed ({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})"
            continue
        why = _disagreement(got, reference[name](), _tolerance(dtype))
        if why:
            failed[name] = why
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


__all__ = ["Ops", "TORCH_OPS", "CPU_OPS", "select_ops", "ops_for_arch", "self_check", "resolve_device", "resolve_dtype",
           "arch", "gpu_dtypes", "triton_ops", "route_by_window", "OP_NAMES", "default_max_batch_tokens"]
