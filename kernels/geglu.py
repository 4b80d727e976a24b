"""GeGLU: `gelu_erf(u[:, :I]) * u[:, I:]` for the MLP's `Wi` output u [T, 2I] -> [T, I].

Elementwise over the T * I outputs, flattened so that no lanes are wasted when I is not a power of
two (the base model's I is 1152). Bytes moved: 2 * T * I in, T * I out; the fp32 intermediate
(gelu(x) before the product) never reaches memory, so the output is rounded once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _geglu_kernel(
    u_ptr,  # [N, 2I] contiguous (fp32 / fp16 / bf16): [input | gate] per row
    out_ptr,  # [N, I] contiguous, u's dtype
    n_out,  # N * I: number of outputs
    I,  # width of each half (runtime, so every MLP width shares one compiled kernel)
    BLOCK: tl.constexpr,  # outputs per program: 2048 = 8 warps x 32 threads x 8 values
):
    # int64 offsets: N * 2I passes 2**31 at about 930k tokens of the base model
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_out
    row = offs // I
    col = offs - row * I
    src = u_ptr + row * (2 * I) + col

    # load both halves, compute in fp32
    x = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(src + I, mask=mask, other=0.0).to(tl.float32)

    # exact erf GELU: 0.5 * x * (1 + erf(x / sqrt(2)))
    gelu = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))  # 1/sqrt(2)

    # write back in the storage dtype
    tl.store(out_ptr + offs, (gelu * gate).to(out_ptr.dtype.element_ty), mask=mask)


def geglu(u):
    """`gelu_erf(u[..., :I]) * u[..., I:]`: [..., 2I] -> [..., I], fp32 math, output in u's dtype.
    Same contract as `reference.geglu`."""
    if u.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"u must be float32, float16 or bfloat16, got {u.dtype}")
    if u.dim() < 1 or u.shape[-1] % 2:
        raise ValueError(f"u's last dim must be even ([..., 2I]), got shape {tuple(u.shape)}")
    I = u.shape[-1] // 2
    u = u.contiguous()
    out = torch.empty(*u.shape[:-1], I, dtype=u.dtype, device=u.device)
    n_out = out.numel()
    if n_out == 0:
        return out
    BLOCK = 2048
    _geglu_kernel[(triton.cdiv(n_out, BLOCK),)](u, out, n_out, I, BLOCK=BLOCK, num_warps=8)
    return out
