"""Weight-only LayerNorm with the residual add fused in: `s = x + residual; y = LN(s) * weight`.

One pass: each row is loaded once (plus its residual), `s` is written back only when a residual
was given, `y` always; a program normalises BLOCK_M rows at once (one row when H is large). Bytes
moved per row: H * elem_size * (2 in + 2 out with a residual, 1 in + 1 out without), the minimum
for this op; statistics never leave registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_FEATURES = 16384  # the whole row lives in registers; wider rows would spill


@triton.jit
def _layer_norm_kernel(
    x_ptr,  # [N, H] input rows, rows `stride_x` apart, features contiguous
    res_ptr,  # [N, H] residual rows, same dtype as x (unused when HAS_RESIDUAL is False)
    w_ptr,  # [H] LayerNorm weight (any float dtype, read as fp32)
    y_ptr,  # [N, H] output LN(s) * weight, contiguous, x's dtype
    s_ptr,  # [N, H] output s = x + residual, contiguous, x's dtype (unused without a residual)
    stride_x,  # elements between two rows of x
    stride_res,  # elements between two rows of residual
    N,  # number of rows
    H,  # features per row (runtime: the same compiled kernel serves any H up to BLOCK_H)
    eps,  # variance epsilon (fp32)
    HAS_RESIDUAL: tl.constexpr,  # fuse the residual add (and write s) or not
    BLOCK_M: tl.constexpr,  # rows per program: several narrow rows share a program, one wide row fills it
    BLOCK_H: tl.constexpr,  # next_power_of_2(H): tl.arange needs a power of two, the tail is masked
):
    # int64 row indices: N * H may pass 2**31
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_H)
    col_mask = cols < H
    mask = (rows < N)[:, None] & col_mask[None, :]  # [BLOCK_M, BLOCK_H]

    # load the rows (+ residual); the sum is rounded to the storage dtype first, as torch's `x + r`
    # would be, so that s and the statistics describe the same tensor
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    out_offs = rows[:, None] * H + cols[None, :]  # y and s are contiguous [N, H]
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + rows[:, None] * stride_res + cols[None, :], mask=mask, other=0.0)
        s = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(s_ptr + out_offs, s, mask=mask)
    else:
        s = x
    s = s.to(tl.float32)

    # statistics in fp32, per row: mean, then the biased variance of the centred row (tail is zero)
    mean = tl.sum(s, axis=1) / H  # [BLOCK_M]
    centred = tl.where(mask, s - mean[:, None], 0.0)
    var = tl.sum(centred * centred, axis=1) / H
    rstd = 1.0 / tl.sqrt(var + eps)

    # normalise, scale, write back in the storage dtype
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    y = centred * rstd[:, None] * w[None, :]
    tl.store(y_ptr + out_offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def layer_norm(x, weight, eps, residual=None):
    """`(LN(x + residual) * weight, x + residual)` over the last dim; with residual=None the second
    item is `x` itself. Same contract as `reference.layer_norm`: biased variance, statistics in
    fp32, outputs in x's dtype."""
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension")
    H = x.shape[-1]
    if H < 1 or H > MAX_FEATURES:
        raise ValueError(f"rows of {H} features are not supported (1..{MAX_FEATURES})")
    if weight.shape != (H,):
        raise ValueError(f"weight must be [{H}], got {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a float tensor, got {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}")
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"residual shape {tuple(residual.shape)} differs from x {tuple(x.shape)}")
        if residual.dtype != x.dtype:
            raise TypeError(f"residual dtype {residual.dtype} differs from x {x.dtype}")
        if residual.device != x.device:
            raise ValueError(f"residual is on {residual.device} but x is on {x.device}")

    # rows must be [N, H] with contiguous features; reshape keeps views when it can
    x2 = x.reshape(-1, H)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    r2 = x2
    if residual is not None:
        r2 = residual.reshape(-1, H)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
    weight = weight.contiguous()
    N = x2.shape[0]

    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    s = torch.empty_like(y) if residual is not None else x
    if N > 0:
        BLOCK_H = triton.next_power_of_2(H)
        # rows per program: fill a tile of about 4096 values (4 rows at H = 768, 1 row from H = 4096
        # up), so that narrow rows don't leave most lanes idle
        BLOCK_M = max(1, 4096 // BLOCK_H)
        # one warp per 512 values of the tile (16 per thread), between 1 and 8 warps
        num_warps = min(max(BLOCK_M * BLOCK_H // 512, 1), 8)
        _layer_norm_kernel[(triton.cdiv(N, BLOCK_M),)](
            x2, r2, weight, y, s if residual is not None else y,
            x2.stride(0), r2.stride(0), N, H, float(eps),
            HAS_RESIDUAL=residual is not None, BLOCK_M=BLOCK_M, BLOCK_H=BLOCK_H,
            num_warps=num_warps,
        )
    return y, s
