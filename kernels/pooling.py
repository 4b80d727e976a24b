"""Sentence pooling: segment mean (or [CLS]) + Matryoshka slice + L2 normalise, fused in one kernel.

One program per sequence reads that sequence's rows of the packed hidden states once, sums them in
fp32, and writes one [dim] fp32 vector. Bytes moved: T * dim * elem_size in, B * dim * 4 out, so
the kernel is bound by reading the hidden states; nothing intermediate ([B, H] sums, norms) ever
goes back to memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MODES = ("mean", "cls")


@triton.jit
def _pool_kernel(
    hidden_ptr,  # [T, H] hidden states (fp32 / fp16 / bf16), rows `stride_t` apart, features contiguous
    cu_seqlens_ptr,  # [B + 1] int32: sequence b is rows cu_seqlens[b] : cu_seqlens[b + 1]
    out_ptr,  # [B, DIM] float32, contiguous: the pooled (and optionally normalised) vectors
    stride_t,  # elements between two consecutive rows of `hidden`
    DIM: tl.constexpr,  # features kept (Matryoshka slice): only hidden[:, :DIM] is ever read
    BLOCK_D: tl.constexpr,  # next_power_of_2(DIM): tl.arange needs a power of two, the tail is masked
    BLOCK_T: tl.constexpr,  # rows summed per loop step: a [BLOCK_T, BLOCK_D] tile stays in registers
    MEAN: tl.constexpr,  # True: mean over every token; False: first token ([CLS]) only
    NORMALIZE: tl.constexpr,  # divide by max(||x||, 1e-12)
):
    b = tl.program_id(0)
    start = tl.load(cu_seqlens_ptr + b)
    if MEAN:
        end = tl.load(cu_seqlens_ptr + b + 1)
    else:
        end = start + 1  # [CLS]: a "segment" of one row, same code path, divided by 1

    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < DIM
    rows = tl.arange(0, BLOCK_T)

    # sum the segment's rows in fp32, BLOCK_T rows at a time (any length: 1 token up to the whole pack)
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for t0 in range(start, end, BLOCK_T):
        r = t0 + rows
        # int64 row offsets: T * H may pass 2**31 for very large token budgets
        ptrs = hidden_ptr + r.to(tl.int64)[:, None] * stride_t + cols[None, :]
        mask = (r < end)[:, None] & col_mask[None, :]
        acc += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    count = (end - start).to(tl.float32)
    pooled = tl.sum(acc, axis=0) / count  # [BLOCK_D], zero beyond DIM

    # L2 normalise over the first DIM features only (the masked tail is exactly zero)
    if NORMALIZE:
        norm = tl.sqrt(tl.sum(pooled * pooled, axis=0))
        pooled = pooled / tl.maximum(norm, 1e-12)  # 1e-12: the torch reference's clamp (F.normalize's eps)

    # write back one fp32 row
    tl.store(out_ptr + b.to(tl.int64) * DIM + cols, pooled, mask=col_mask)


def pool(hidden, batch, mode="mean", dim=None, normalize=True):
    """Sentence embeddings from packed hidden states [T, H] -> [B, dim] float32.

    Same contract as `reference.pool`: mode "mean" averages every token of each sequence, "cls"
    takes its first token; the first `dim` features are kept, then (normalize=True) divided by
    max(||x||, 1e-12). Sums accumulate in fp32 whatever the input dtype.
    """
    if mode not in MODES:
        raise ValueError(f"unknown pooling mode {mode!r}")
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [T, H], got shape {tuple(hidden.shape)}")
    if hidden.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"hidden must be float32, float16 or bfloat16, got {hidden.dtype}")
    T, H = hidden.shape
    dim = H if dim is None else int(dim)
    if not 1 <= dim <= H:
        raise ValueError(f"dim must be in 1..{H}, got {dim}")
    cu = batch.cu_seqlens
    B = len(batch.lengths)
    if cu.dtype != torch.int32 or cu.shape != (B + 1,):
        raise ValueError(f"cu_seqlens must be int32 [{B + 1}], got {cu.dtype} {tuple(cu.shape)}")
    if cu.device != hidden.device:
        raise ValueError(f"cu_seqlens is on {cu.device} but hidden is on {hidden.device}")
    if sum(batch.lengths) != T:
        raise ValueError(f"the batch holds {sum(batch.lengths)} tokens but hidden has {T} rows")
    if hidden.stride(1) != 1:
        hidden = hidden.contiguous()
    cu = cu.contiguous()

    out = torch.empty(B, dim, dtype=torch.float32, device=hidden.device)
    if B == 0:
        return out
    BLOCK_D = triton.next_power_of_2(dim)
    # Keep the accumulator tile at <= 8192 fp32 values (32 KiB of registers per program): 8 rows at
    # H = 768 or 1024, 2 rows at 4096; never more than 16 rows, which already hides load latency.
    BLOCK_T = max(1, min(16, 8192 // BLOCK_D))
    num_warps = 8 if BLOCK_D >= 2048 else 4
    _pool_kernel[(B,)](
        hidden, cu, out, hidden.stride(0),
        DIM=dim, BLOCK_D=BLOCK_D, BLOCK_T=BLOCK_T,
        MEAN=(mode == "mean"), NORMALIZE=bool(normalize),
        num_warps=num_warps,
    )
    return out
