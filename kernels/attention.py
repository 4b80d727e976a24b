"""Bidirectional varlen flash attention (forward only) over packed sequences, with an optional
sliding window.

One program per (query block of one sequence, sequence x head). It keeps its BLOCK_M query rows
in registers and streams the sequence's keys and values through in BLOCK_N-row blocks, keeping a
running max and sum per row (online softmax, fp32) so the [L, L] score matrix never exists.

Work skipping: with a window w a query i sees keys j with |i - j| <= w (inclusive), so the query
block [m0, m0 + BLOCK_M) can only need keys in [m0 - w, m0 + BLOCK_M + w). The key loop runs over
exactly that range (clipped to the sequence), so a local layer's work is proportional to
T * (BLOCK_M + 2w), not to sum(L^2): with BLOCK_M = 64 and w = 64 every query block visits at most
192 keys (3 key blocks of 64) for the 129 a query really uses, whatever the sequence length. Keys
outside that range are never loaded. `attention_work` counts the score entries computed.

Global layers: every key block but the partial last one runs without masks.

Rotary inside (rope=(cos, sin)): q and k arrive unrotated; q is rotated once per program, each key
block as it is loaded, from the same fp32 tables and with the same rounding as the rotary kernel,
so the separate pass over q and k is saved (at the cost of rotating each key block once per query
block).

Bytes per (sequence, head) for full attention: q and the output once, k and v once per query block
(ceil(L / BLOCK_M) times), all else stays on chip.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._arch import device_arch
from ._checks import check_qkv, check_rope_tables

LOG2E = 1.4426950408889634  # 1 / ln(2): softmax is computed with exp2, the factor folded into the scale

# Tile sizes, (BLOCK_M, BLOCK_N, num_warps, num_stages), per architecture, for head_dim 64.
# Hopper (sm_90), fp16/bf16, chosen for an H100 (not yet timed on one):
#   full attention: 128 query rows x 64 keys per step with 4 warps and a 3-deep load pipeline is
#   the shape Triton's own fused-attention tutorial settles on for d = 64 on Hopper; the q tile
#   (128 x 64) and the fp32 accumulator (128 x 64) stay in registers (wgmma).
#   local attention: a 64-row query block with w = 64 spans 64 + 2*64 = 192 keys = exactly 3
#   blocks of 64 (a 128-row block would need 256 keys, 2x the 129 a query uses; 64 rows need 1.5x).
#   rotary inside, full: the cos/sin tiles and the two k halves need more registers than 4 warps
#   leave a 128-row tile (ptxas spills); 8 warps hold it.
# Ampere and Ada (sm_80, sm_86, sm_89: mma.sync, the accumulator spread over fewer threads than a
# Hopper warpgroup's): the same 128 x 64 tile with 4 warps needs 255 registers per thread, the
# ceiling (the fp16 rotary-inside variant spills at sm_80), so 8 warps share it (179 registers);
# rotary inside, full, steps 32 keys at a time (177 registers; 255 with 64). Chosen from the
# compile check (registers, spills, tensor-core dots), not yet timed on those GPUs.
# fp32 (exact "ieee" dots on the FMA units, twice the registers per element): 64 x 32 tiles over
#   8 warps on every architecture; with 4 warps ptxas (sm_90a) needs 255 registers and spills.
# Wider heads (128) halve the query rows so the accumulator and q tile keep the same size.
# Registers, spills and shared memory of every variant per architecture: `compile_check --arch N`.
_TILES_HOPPER = {"full": (128, 64, 4, 3), "local": (64, 64, 4, 3),
                 "full+rope": (128, 64, 8, 3), "local+rope": (64, 64, 4, 3)}
_TILES_AMPERE = {"full": (128, 64, 8, 3), "local": (64, 64, 4, 3),
                 "full+rope": (128, 32, 8, 3), "local+rope": (64, 64, 4, 3)}
_CONFIG_FP32 = (64, 32, 8, 3)
_CONFIG_WIDE = (64, 64, 4, 2)  # head_dim 128
HEAD_DIMS = (16, 32, 64, 128)  # powers of two; tl.dot needs K >= 16


@triton.jit
def _rotate_rows(x_ptrs, trig, cos_ptr, sin_ptr, HALF: tl.constexpr, mask, MASKED: tl.constexpr):
    """The two rotated halves of the rows at `x_ptrs` (first halves; the second sit HALF further),
    rotated in fp32 by the table rows `trig` and rounded to the storage dtype, exactly as the
    rotary kernel would have written them."""
    if MASKED:
        x1 = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
        c = tl.load(cos_ptr + trig, mask=mask, other=0.0)
        sn = tl.load(sin_ptr + trig, mask=mask, other=0.0)
    else:
        x1 = tl.load(x_ptrs).to(tl.float32)
        x2 = tl.load(x_ptrs + HALF).to(tl.float32)
        c = tl.load(cos_ptr + trig)
        sn = tl.load(sin_ptr + trig)
    dtype = x_ptrs.dtype.element_ty
    return (x1 * c - x2 * sn).to(dtype), (x2 * c + x1 * sn).to(dtype)


@triton.jit
def _attend_block(
    q, q2, acc, m_i, l_i,  # query tile (with ROPE: its two rotated halves), running output / row max (log2 units) / row sum
    kv_base, kh_base, cos_ptr, sin_ptr, n0, offs_m, hi, window, qk_scale,
    ROW: tl.constexpr, K_OFF: tl.constexpr, V_OFF: tl.constexpr, HALF: tl.constexpr,
    BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr, IEEE_DOT: tl.constexpr,
    ROPE: tl.constexpr,  # rotate each key block as it is loaded (q came rotated)
    MASKED: tl.constexpr,  # False: every key of the block is in range and in every row's window
):
    """One key block [n0, n0 + BLOCK_N) folded into the running softmax of the query tile."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    kv_off = offs_n.to(tl.int64)[:, None] * ROW
    n_valid = offs_n < hi  # never read past the visible range (nor the sequence)
    if ROPE:
        # positions restart at 0 in every sequence, so key n0 + i sits at table row n0 + i
        trig = offs_n.to(tl.int64)[:, None] * HALF + tl.arange(0, HALF)[None, :]
        k, k2 = _rotate_rows(kh_base + kv_off + K_OFF, trig, cos_ptr, sin_ptr, HALF, n_valid[:, None], MASKED)
        if IEEE_DOT:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
            s = tl.dot(q2, tl.trans(k2), s, input_precision="ieee")
        else:
            s = tl.dot(q2, tl.trans(k2), tl.dot(q, tl.trans(k)))
    else:
        if MASKED:
            k = tl.load(kv_base + kv_off + K_OFF, mask=n_valid[:, None], other=0.0)
        else:
            k = tl.load(kv_base + kv_off + K_OFF)
        if IEEE_DOT:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
    s = s * qk_scale  # [BLOCK_M, BLOCK_N], log2 units

    if MASKED:
        # keys past the range and, with a window, pairs further apart than w score -inf
        visible = n_valid[None, :]
        if HAS_WINDOW:
            dist = offs_m[:, None] - offs_n[None, :]
            visible = visible & (dist <= window) & (dist >= -window)
        s = tl.where(visible, s, float("-inf"))
        # a row with nothing visible yet keeps max -inf, and is shifted by 0 instead so that
        # exp2(-inf - -inf) never makes a NaN
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every score of the block counts
        m_shift = m_new
    p = tl.exp2(s - m_shift[:, None])
    alpha = tl.exp2(m_i - m_shift)  # rescales what was summed under the old max
    l_i = l_i * alpha + tl.sum(p, axis=1)

    # the value block, accumulated as p @ v (p rounded to the input dtype, fp32 sum)
    if MASKED:
        v = tl.load(kv_base + kv_off + V_OFF, mask=n_valid[:, None], other=0.0)
    else:
        v = tl.load(kv_base + kv_off + V_OFF)
    acc = acc * alpha[:, None]
    if IEEE_DOT:
        acc = tl.dot(p, v, acc, input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, m_new, l_i


@triton.jit
def _attention_kernel(
    qkv_ptr,  # [T, 3, HEADS, HEAD_DIM] contiguous (fp32 / fp16 / bf16): q, k, v of every token
    out_ptr,  # [T, HEADS * HEAD_DIM] contiguous, same dtype as qkv
    cu_ptr,  # [B + 1] int32: sequence b is tokens cu[b] : cu[b + 1]
    cos_ptr,  # [P, HALF] float32 rotary tables, read only when ROPE
    sin_ptr,
    qk_scale,  # float: softmax scale * log2(e), so exp2(s * qk_scale) == exp(s * scale)
    window,  # int: half window w (keys with |i - j| <= w); read only when HAS_WINDOW
    num_m_blocks,  # int: query blocks of the longest sequence, cdiv(max_seqlen, BLOCK_M)
    HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,  # power of two >= 16 (tl.dot's minimum K), the whole head in one tile
    HAS_WINDOW: tl.constexpr,  # False: every key of the sequence (no window arithmetic compiled in)
    IEEE_DOT: tl.constexpr,  # fp32 inputs: exact fp32 dots instead of TF32 (parity with torch fp32)
    ROPE: tl.constexpr,  # q and k arrive unrotated: rotate them on load (qkv is not written)
    HALF: tl.constexpr,  # HEAD_DIM // 2
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # key rows per step
):
    # which sequence, head and query block this program owns. One flat grid axis, query blocks
    # fastest: the blocks of one (sequence, head) run side by side and share its k/v in L2, and
    # the grid is not capped at 65535 (sequences x heads can pass that for short texts)
    pid = tl.program_id(0)
    m_block = pid % num_m_blocks
    bh = pid // num_m_blocks
    b = bh // HEADS
    h = bh % HEADS
    seq_start = tl.load(cu_ptr + b)
    seq_len = tl.load(cu_ptr + b + 1) - seq_start
    m0 = m_block * BLOCK_M
    if m0 >= seq_len:  # the grid is sized for the longest sequence: shorter ones stop here
        return

    ROW: tl.constexpr = 3 * HEADS * HEAD_DIM  # elements between consecutive tokens in qkv
    offs_m = m0 + tl.arange(0, BLOCK_M)  # query positions inside the sequence
    offs_d = tl.arange(0, HEAD_DIM)
    m_valid = offs_m < seq_len

    # load the query tile [BLOCK_M, HEAD_DIM]; int64 rows so T * ROW may pass 2**31
    q_rows = (seq_start + offs_m).to(tl.int64)
    # k and v of key 0 of this head; K_OFF / V_OFF step over q (and k) within a token
    kv_base = qkv_ptr + seq_start.to(tl.int64) * ROW + h * HEAD_DIM + offs_d[None, :]
    if ROPE:
        # two half tiles [BLOCK_M, HALF], rotated once here; keys are rotated block by block
        offs_h = tl.arange(0, HALF)
        trig = offs_m.to(tl.int64)[:, None] * HALF + offs_h[None, :]
        q_half = qkv_ptr + q_rows[:, None] * ROW + h * HEAD_DIM + offs_h[None, :]
        q, q2 = _rotate_rows(q_half, trig, cos_ptr, sin_ptr, HALF, m_valid[:, None], True)
        kh_base = qkv_ptr + seq_start.to(tl.int64) * ROW + h * HEAD_DIM + offs_h[None, :]
    else:
        q_ptrs = qkv_ptr + q_rows[:, None] * ROW + h * HEAD_DIM + offs_d[None, :]
        q = tl.load(q_ptrs, mask=m_valid[:, None], other=0.0)
        q2 = q
        kh_base = kv_base
    K_OFF: tl.constexpr = HEADS * HEAD_DIM
    V_OFF: tl.constexpr = 2 * HEADS * HEAD_DIM

    # running statistics, fp32: row max (in log2 units), row sum, unnormalised output
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    if HAS_WINDOW or IEEE_DOT:
        # the keys this block can see: its window clipped to the sequence, or the whole sequence.
        # In a window every block may hold pairs further apart than w, so every block is masked;
        # fp32 (the exactness path) keeps this one loop too: two loops need more registers than
        # its tiles leave (ptxas spills).
        if HAS_WINDOW:
            lo = tl.maximum(m0 - window, 0)
            hi = tl.minimum(m0 + BLOCK_M + window, seq_len)  # exclusive: last query + w + 1
        else:
            lo = 0
            hi = seq_len
        for n0 in range(lo, hi, BLOCK_N):
            acc, m_i, l_i = _attend_block(q, q2, acc, m_i, l_i, kv_base, kh_base, cos_ptr, sin_ptr, n0, offs_m, hi,
                                          window, qk_scale, ROW, K_OFF, V_OFF, HALF, BLOCK_N, HAS_WINDOW,
                                          IEEE_DOT, ROPE, MASKED=True)
    else:
        # every key of the sequence: whole blocks without any mask (no bounds on the loads, no
        # -inf selects), then the partial last block, masked
        full = (seq_len // BLOCK_N) * BLOCK_N
        for n0 in range(0, full, BLOCK_N):
            acc, m_i, l_i = _attend_block(q, q2, acc, m_i, l_i, kv_base, kh_base, cos_ptr, sin_ptr, n0, offs_m, seq_len,
                                          window, qk_scale, ROW, K_OFF, V_OFF, HALF, BLOCK_N, HAS_WINDOW,
                                          IEEE_DOT, ROPE, MASKED=False)
        if full < seq_len:
            acc, m_i, l_i = _attend_block(q, q2, acc, m_i, l_i, kv_base, kh_base, cos_ptr, sin_ptr, full, offs_m, seq_len,
                                          window, qk_scale, ROW, K_OFF, V_OFF, HALF, BLOCK_N, HAS_WINDOW,
                                          IEEE_DOT, ROPE, MASKED=True)

    # normalise (a row that saw nothing has l = 0 and acc = 0: divide by 1, write zeros) and store
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    o_ptrs = out_ptr + q_rows[:, None] * (HEADS * HEAD_DIM) + h * HEAD_DIM + offs_d[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=m_valid[:, None])


def _config(dtype, head_dim, window, rope=False, arch=None):
    """The tiles for a launch: by dtype, head width, window and the architecture (compute
    capability x 10; None, as for CPU tensors under the interpreter: Hopper's)."""
    if dtype == torch.float32:
        return _CONFIG_FP32
    if head_dim > 64:
        return _CONFIG_WIDE
    tiles = _TILES_AMPERE if arch is not None and arch < 90 else _TILES_HOPPER
    return tiles[("full" if window is None else "local") + ("+rope" if rope else "")]


def _check_config(config):
    try:
        block_m, block_n, num_warps, num_stages = (int(c) for c in config)
    except (TypeError, ValueError):
        raise ValueError(f"config must be (BLOCK_M, BLOCK_N, num_warps, num_stages), got {config!r}") from None
    for name, v in (("BLOCK_M", block_m), ("BLOCK_N", block_n)):
        if v < 16 or v & (v - 1):
            raise ValueError(f"{name} must be a power of two >= 16 (tl.dot), got {v}")
    if num_warps not in (1, 2, 4, 8, 16) or num_stages < 1:
        raise ValueError(f"num_warps must be 1, 2, 4, 8 or 16 and num_stages >= 1, got {num_warps}, {num_stages}")


def _check_rope(rope, head_dim, max_seqlen, device):
    try:
        cos, sin = rope
    except (TypeError, ValueError):
        raise ValueError("rope must be a (cos, sin) pair of tables") from None
    half = head_dim // 2
    if half < 16 or half & (half - 1):
        raise ValueError(f"rotary inside attention needs head_dim // 2 a power of two >= 16 (tl.dot), "
                         f"got head_dim {head_dim}")
    check_rope_tables(cos, sin, half, device)
    for name, t in (("cos", cos), ("sin", sin)):
        if not t.is_contiguous():
            raise ValueError(f"rope {name} table must be contiguous")
        if t.shape[0] < max_seqlen:
            raise ValueError(f"rope {name} table has {t.shape[0]} positions, the batch needs {max_seqlen}")


def attention(qkv, batch, window, scale, *, config=None, rope=None):
    """Bidirectional attention within each packed sequence, as `reference.attention`.

    qkv: [T, 3, heads, head_dim] contiguous (rotary applied), fp32 / fp16 / bf16; `batch` gives
    `cu_seqlens` (int32, on qkv's device) and `max_seqlen`. window: None for full attention, or the
    half window w (keys with |i - j| <= w, inclusive). Returns [T, heads * head_dim] in qkv's dtype.
    fp32 inputs use exact fp32 dots (no TF32). `config` = (BLOCK_M, BLOCK_N, num_warps, num_stages)
    overrides the tiles chosen for the dtype, the window and qkv's GPU (benchmarks sweep it).
    rope=(cos, sin): q and k in `qkv` are NOT rotated yet; the kernel rotates them as it loads them
    (float32 tables [max_positions, head_dim // 2] from `rope_tables`, position = index within the
    sequence, as `pack` numbers them) and leaves `qkv` unchanged: the rotary op's pass over q and
    k is saved.
    """
    T, heads, head_dim = check_qkv(qkv)
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {HEAD_DIMS}, got {head_dim}")
    if window is not None and (int(window) != window or window < 0):
        raise ValueError(f"window must be None or a non-negative int, got {window!r}")
    cu = batch.cu_seqlens
    if cu.device != qkv.device:
        raise ValueError(f"batch.cu_seqlens is on {cu.device} but qkv is on {qkv.device}")
    if cu.dtype != torch.int32 or cu.dim() != 1:
        raise ValueError(f"batch.cu_seqlens must be a 1-d int32 tensor, got {cu.dtype} {tuple(cu.shape)}")
    if rope is not None:
        _check_rope(rope, head_dim, batch.max_seqlen, qkv.device)
        cos, sin = rope
    else:
        cos = sin = qkv  # not read
    out = torch.empty(T, heads * head_dim, dtype=qkv.dtype, device=qkv.device)
    B = cu.shape[0] - 1
    if T == 0 or heads == 0 or B == 0:
        return out

    if config is None:
        config = _config(qkv.dtype, head_dim, window, rope is not None, device_arch(qkv.device))
    else:
        _check_config(config)
    block_m, block_n, num_warps, num_stages = config
    # one program per (query block, sequence, head); blocks past a shorter sequence's end exit
    num_m_blocks = triton.cdiv(batch.max_seqlen, block_m)
    grid = (num_m_blocks * B * heads,)
    _attention_kernel[grid](
        qkv, out, cu, cos, sin, float(scale) * LOG2E, 0 if window is None else int(window), num_m_blocks,
        HEADS=heads, HEAD_DIM=head_dim, HAS_WINDOW=window is not None,
        IEEE_DOT=qkv.dtype == torch.float32, ROPE=rope is not None, HALF=head_dim // 2,
        BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


def attention_work(lengths, window, block_m=None, block_n=None, arch=None):
    """(score entries the kernel computes, score entries a dense per-sequence kernel would compute)
    for a batch of `lengths`: shows how much the window skips. Defaults to the fp16/bf16 tiles of
    sm_<arch> (Hopper's when None)."""
    if block_m is None:
        block_m, block_n = _config(torch.bfloat16, 64, window, arch=arch)[:2]
    done = dense = 0
    for n in lengths:
        dense += n * n
        for m0 in range(0, n, block_m):
            lo, hi = (0, n) if window is None else (max(m0 - window, 0), min(m0 + block_m + window, n))
            done += block_m * triton.cdiv(hi - lo, block_n) * block_n
    return done, dense
