"""Rotary position embedding (rotate-half form) applied in place to q and k of the packed qkv.

The q and k heads of all tokens are `T * 2 * heads` rows of `head_dim`; a program rotates BLOCK_M
of those rows (several tokens at once), each by the angles of its own token's position. In place:
reads and writes 2 * heads * head_dim elements per token, v is never touched; the cos/sin rows
are gathered per head but are the same few hundred bytes per token, served from cache.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import check_qkv, check_rope_tables


@triton.jit
def _rotary_kernel(
    qkv_ptr,  # [T, 3, heads, head_dim] contiguous (fp32 / fp16 / bf16), q and k rewritten in place
    pos_ptr,  # [T] int32 or int64: position of each token inside its sequence
    cos_ptr,  # [P, HALF] float32 contiguous: cos(position * inv_freq[j])
    sin_ptr,  # [P, HALF] float32 contiguous: sin(position * inv_freq[j])
    n_rows,  # T * 2 * heads: the q and k heads to rotate
    HEADS: tl.constexpr,  # heads per token (q, k and v each have this many)
    HEAD_DIM: tl.constexpr,  # elements per head
    HALF: tl.constexpr,  # HEAD_DIM // 2: dims j and j + HALF share the angle j
    BLOCK_M: tl.constexpr,  # q/k rows per program
    BLOCK_J: tl.constexpr,  # next_power_of_2(HALF), masked (head_dim 64 -> 32, exact)
):
    # row m is head m % (2 * HEADS) of token m // (2 * HEADS): q heads, then k heads, which are
    # contiguous in memory (v follows them); int64 because T * 3 * H may pass 2**31
    m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = m < n_rows
    t = m // (2 * HEADS)
    head = m - t * (2 * HEADS)
    j = tl.arange(0, BLOCK_J)
    mask = row_mask[:, None] & (j < HALF)[None, :]  # [BLOCK_M, BLOCK_J]

    # each row's angles: the cos/sin table row of its token's position
    pos = tl.load(pos_ptr + t, mask=row_mask, other=0).to(tl.int64)
    trig = pos[:, None] * HALF + j[None, :]
    c = tl.load(cos_ptr + trig, mask=mask, other=0.0)
    s = tl.load(sin_ptr + trig, mask=mask, other=0.0)

    # the two halves of each head
    p1 = qkv_ptr + (t * (3 * HEADS) + head)[:, None] * HEAD_DIM + j[None, :]
    p2 = p1 + HALF
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p2, mask=mask, other=0.0).to(tl.float32)

    # rotate in fp32, write back in the storage dtype
    y1 = x1 * c - x2 * s
    y2 = x2 * c + x1 * s
    tl.store(p1, y1.to(qkv_ptr.dtype.element_ty), mask=mask)
    tl.store(p2, y2.to(qkv_ptr.dtype.element_ty), mask=mask)


def rotary(qkv, positions, cos, sin):
    """Rotate q and k of the packed `qkv` [T, 3, heads, head_dim] IN PLACE (fp32 math) and return
    it. Same values as `reference.rotary`; v is untouched.
    `positions` [T] must index rows of the `cos`/`sin` tables [max_positions, head_dim // 2]:
    out-of-range positions are not checked (that would cost a device sync)."""
    T, heads, head_dim = check_qkv(qkv, "it is rotated in place")
    if head_dim % 2:
        raise ValueError(f"head_dim must be even, got {head_dim}")
    half = head_dim // 2
    if positions.shape != (T,) or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"positions must be int32/int64 [{T}], got {positions.dtype} "
                         f"{tuple(positions.shape)}")
    check_rope_tables(cos, sin, half, qkv.device)
    if positions.device != qkv.device:
        raise ValueError(f"positions is on {positions.device} but qkv is on {qkv.device}")
    if T == 0 or heads == 0:
        return qkv

    n_rows = T * 2 * heads
    BLOCK_J = triton.next_power_of_2(half)
    # rows per program: a 4096-value tile per half (128 rows at head_dim 64: 5.3 tokens of the base
    # model), 8 warps -> 16 values per thread per half
    BLOCK_M = max(1, 4096 // BLOCK_J)
    _rotary_kernel[(triton.cdiv(n_rows, BLOCK_M),)](
        qkv, positions.contiguous(), cos.contiguous(), sin.contiguous(), n_rows,
        HEADS=heads, HEAD_DIM=head_dim, HALF=half, BLOCK_M=BLOCK_M, BLOCK_J=BLOCK_J,
        num_warps=8,
    )
    return qkv
