"""The load-time self-check: each chosen op run once on tiny inputs at the model's widths and
compared with its plain torch version (`reference`), so that a kernel that does not compile or
disagrees on this GPU shows at load and not on a user's first batch.

This module only finds; what replaces an op it finds at fault is the dispatch's decision
(`ops.self_check`). The oracle is `reference` and nothing else: the tuned torch path
(`ops_torch`) may change for speed without moving what the kernels are checked against.
"""

from __future__ import annotations

from typing import Iterable

import torch

from . import reference
from .batching import pack
from .rope import rope_tables


def check_inputs(cfg, device, dtype):
    """Tiny inputs at the model's widths: two sequences, one longer than the window."""
    g = torch.Generator().manual_seed(0)
    lengths = [cfg.local_window * 2 + 9, 3]
    T, H, heads, d = sum(lengths), cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
    batch = pack([[0] * n for n in lengths], range(len(lengths)), device)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    cos, sin = rope_tables(cfg.local_rope_theta, d, max(lengths), device)
    return batch, rand(T, H), rand(H), rand(T, H), rand(T, 3, heads, d), rand(T, 2 * cfg.intermediate_size), (cos, sin)


def op_calls(ops, cfg, inputs, fused_rotary: bool = False):
    """{op name: thunk running that op of `ops` (an `Ops` record, or the `reference` module) on
    `inputs`}, outputs as a tuple of tensors. With `fused_rotary` the attention rotates q and k
    itself; otherwise it gets them rotated by the reference's rotary."""
    batch, x, w, res, qkv, u, (cos, sin) = inputs
    scale = cfg.head_dim ** -0.5
    w_local = cfg.local_window

    def attention():
        if fused_rotary:
            return (ops.attention(qkv.clone(), batch, None, scale, rope=(cos, sin)),
                    ops.attention(qkv.clone(), batch, w_local, scale, rope=(cos, sin)))
        q = reference.rotary(qkv, batch.positions, cos, sin)
        return ops.attention(q, batch, None, scale), ops.attention(q, batch, w_local, scale)

    return {
        # with the residual add (the layers) and without (the embeddings' and the final norm)
        "layer_norm": lambda: (*ops.layer_norm(x, w, cfg.norm_eps, res), ops.layer_norm(x, w, cfg.norm_eps)[0]),
        "rotary": lambda: (ops.rotary(qkv.clone(), batch.positions, cos, sin),),
        "attention": attention,
        "geglu": lambda: (ops.geglu(u),),
        "pool": lambda: (ops.pool(x, batch, "mean", None, True), ops.pool(x, batch, "cls", 16, False)),
    }


def tolerance(dtype) -> float:
    # far above a correct kernel's rounding (about 1e-6 fp32, 1e-2 bf16 on O(1) values), far below
    # what a wrong one gives (O(1))
    return 1e-3 if dtype == torch.float32 else 0.1


def disagreement(got, want, tol) -> str:
    """Why the outputs `got` differ from the reference's `want`, or "" when they agree."""
    shapes = [tuple(t.shape) for t in got], [tuple(t.shape) for t in want]
    if shapes[0] != shapes[1]:
        return f"returns shapes {shapes[0]}, torch's {shapes[1]}"
    diffs = [float((a.float() - b.float()).abs().max()) for a, b in zip(got, want) if a.numel()]
    if all(d <= tol for d in diffs):  # a NaN fails
        return ""
    worst = next((d for d in diffs if d != d), max(diffs))  # NaN first: max() may pass over it
    return f"disagrees with torch (max abs diff {worst:.3g})"


def disagreements(ops, names: Iterable[str], cfg, device: torch.device, dtype: torch.dtype) -> dict[str, str]:
    """{op name: why} for each op of `names` in `ops` that fails (a compile or launch error) or
    disagrees with the reference on tiny inputs; empty when all agree."""
    inputs = check_inputs(cfg, device, dtype)
    want = op_calls(reference, cfg, inputs)
    chosen = op_calls(ops, cfg, inputs, ops.fused_rotary)
    failed: dict[str, str] = {}
    for name in names:
        try:
            got = chosen[name]()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        except Exception as e:  # noqa: BLE001 - a compile error, a launch error: any failure is the finding
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            failed[name] = f"failed ({type(e).__name__}: {first})"
            continue
        why = disagreement(got, want[name](), tolerance(dtype))
        if why:
            failed[name] = why
    return failed


__all__ = ["disagreements", "check_inputs", "op_calls", "tolerance", "disagreement"]
