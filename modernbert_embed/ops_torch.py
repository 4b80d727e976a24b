"""The tuned torch path: the ops the CPU runs, and a GPU where the dispatch gives torch's.

Each op here is measured for speed (in-place rotary, the window computed block by block, oneDNN's
packed GEMMs with the GeGLU inside Wi's) and has the same signature and results as its plain
version in `reference`, which is the oracle: the tests check these against it, and the load-time
self-check (`load_check`) compares the kernels with the reference alone, so that tuning here cannot
change what the kernels are checked against (this path is only what a failing kernel falls back to). Layer norm and pooling have nothing to tune: they are the reference's own.

Tensors are packed: `[T, ...]` holds all tokens of all sequences of a batch, and
`batch.cu_seqlens` (device) / `batch.lengths` (host) say where each sequence starts.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import reference
from .batching import CPU_MAX_BATCH_TOKENS

# Nothing to tune: one F.layer_norm call, one segment sum (the Matryoshka slice and the
# normalisation are `matryoshka.slice_normalize`).
layer_norm = reference.layer_norm
pool = reference.pool


# ----------------------------------------------------------------------------- rotary
def rotary(qkv, positions, cos, sin):
    """`reference.rotary` in place: rotate q and k of the packed `qkv` [T, 3, heads, head_dim]
    (rotate-half form) in fp32, for fp32 input without a copy of q and k.

    `positions` [T] restart at 0 for every sequence; `cos`/`sin` come from `rope.rope_tables`.
    Writes the rotated q and k back into `qkv` (any dtype) and returns it (v untouched).
    """
    half = qkv.shape[-1] // 2
    c = cos[positions][:, None, None, :]  # [T, 1, 1, half]
    s = sin[positions][:, None, None, :]
    qk = qkv[:, :2] if qkv.dtype == torch.float32 else qkv[:, :2].float()  # [T, 2, heads, head_dim]
    x1, x2 = qk[..., :half], qk[..., half:]
    x1_s = x1 * s
    x1.mul_(c).sub_(x2 * s)  # x1 cos - x2 sin
    x2.mul_(c).add_(x1_s)  # x2 cos + x1 sin
    if qk.data_ptr() != qkv.data_ptr():
        qkv[:, :2] = qk
    return qkv


def rotary_pairs(qkv, positions, cos, sin):
    """`rotary` for q and k stored as pairs: each head's features ordered (x_0, x_{d/2}, x_1,
    x_{d/2+1}, ...) instead of halves (the model reorders its Wqkv rows so, when the ops ask for it:
    `Ops.rotary_pairs`). A pair rotated by an angle is a complex number times e^{i angle}, so the
    whole op is one complex multiplication in fp32, in place for fp32 input (one pass over q and k
    instead of eight), with the same products and sums as the halves' form. Returns `qkv`."""
    half = qkv.shape[-1] // 2
    turn = torch.complex(cos[positions], sin[positions])[:, None, None, :]  # [T, 1, 1, half]
    if qkv.dtype == torch.float32:
        torch.view_as_complex(qkv[:, :2].unflatten(-1, (half, 2))).mul_(turn)
        return qkv
    qk = torch.view_as_complex(qkv[:, :2].float().unflatten(-1, (half, 2)))  # [T, 2, heads, half]
    qk.mul_(turn)
    qkv[:, :2] = torch.view_as_real(qk).flatten(-2)
    return qkv


# ----------------------------------------------------------------------------- attention
def attention(qkv, batch, window, scale, gemms_upto: int = 0):
    """`reference.attention` with the work following the window: bidirectional attention within
    each packed sequence.

    qkv: [T, 3, heads, head_dim] (rotary applied). window: None for full attention, or the half
    window w (keys with |i - j| <= w, inclusive). Returns [T, heads * head_dim].

    One exact SDPA call per sequence, no padding. A local layer on a sequence of at most w + 1
    tokens is full attention; up to 3w tokens a band mask over L x L costs less than blocks; longer
    sequences go block by block, so the work follows the window, not L^2. `gemms_upto` (the CPU's:
    `cpu_attention`): bfloat16 sequences of up to that many tokens, but for the blocks, attend
    through two GEMMs instead (`_attention_gemms`).
    """
    T, _, heads, d = qkv.shape
    out = torch.empty(T, heads, d, dtype=qkv.dtype, device=qkv.device)
    q, k, v = qkv.permute(1, 2, 0, 3).unbind(0)  # each [heads, T, d], strided views
    gemms = gemms_upto if qkv.dtype == torch.bfloat16 else 0
    start = 0
    for n in batch.lengths:
        end = start + n
        if window is not None and n > 3 * window:
            out[start:end] = _attention_banded(qkv[start:end], window, scale).view(n, heads, d)
            start = end
            continue
        masked = window is not None and n > window + 1
        if n <= gemms:
            mask = _band_mask(n, window, qkv.device, torch.float32) if masked else None
            out[start:end] = _attention_gemms(q[:, start:end], k[:, start:end], v[:, start:end], mask,
                                              scale).transpose(0, 1)
        else:
            mask = _band_mask(n, window, qkv.device, qkv.dtype) if masked else None
            out[start:end] = F.scaled_dot_product_attention(
                q[None, :, start:end], k[None, :, start:end], v[None, :, start:end], attn_mask=mask, scale=scale
            )[0].transpose(0, 1)
        start = end
    return out.view(T, heads * d)


# bfloat16 sequences of up to this many tokens attend through two GEMMs on the CPU (`cpu_attention`).
CPU_GEMM_ATTENTION_MAX = 512


def cpu_attention(qkv, batch, window, scale):
    """`attention` on the CPU: bfloat16 sequences of up to `CPU_GEMM_ATTENTION_MAX` tokens (but
    for the windowed layers' blocks, past 3w) through two GEMMs (`_attention_gemms`), which ran
    1.4-1.55x as fast as torch's SDPA from 100 to 300 tokens and 1.16x at 512 (2-core AMD EPYC,
    12 heads of 64, the heap kept: `devices.keep_cpu_heap`); float32 as `attention` (no faster
    there)."""
    return attention(qkv, batch, window, scale, gemms_upto=CPU_GEMM_ATTENTION_MAX)


def _attention_gemms(q, k, v, mask, scale):
    """One sequence's attention as two GEMMs, near SDPA's precision on the CPU: q and k [heads, n,
    d] (bfloat16 values, exact in float32) multiply in float32, so the scores are float32 as in
    SDPA's kernel (bfloat16 scores would round them: 2.3-3.6x its mean error); the softmax runs in
    float32; the probabilities are rounded to v's dtype for PV once normalised (SDPA rounds them
    before dividing by their sum: its mean error is 20-30% smaller), accumulated in float32 inside
    the GEMM. mask: an additive float32 [n, n] or None. Returns [heads, n, d] in v's dtype."""
    scores = torch.matmul(q.float().mul_(scale), k.float().transpose(-1, -2))  # [heads, n, n]
    if mask is not None:
        scores.add_(mask)
    return torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)


def key_limited_attention(qkv, batch, window, scale):
    """Attention where sequence b's keys are its first `batch.key_lengths[b]` tokens only: every
    token is a query (with its own position and window), the tokens after them are keys of none,
    not even of themselves. This is a padded batch through transformers' SDPA path with
    attention_mask 0 on those tokens (ColBERT's query expansion, `attend_to_expansion_tokens`
    false): the real tokens compute what they would alone, and each expansion token attends to the
    real ones within its window. A query that sees no key at all (an expansion token more than a
    window past the last real one) gets zeros.

    qkv: [T, 3, heads, head_dim] (rotary applied). One SDPA call over the batch padded to its
    longest sequence, with a boolean mask. Returns [T, heads * head_dim]."""
    T, _, heads, d = qkv.shape
    lengths = torch.tensor(batch.lengths, device=qkv.device)
    B, L = len(batch.lengths), max(batch.lengths)
    rows = torch.arange(L, device=qkv.device)
    valid = rows[None, :] < lengths[:, None]  # [B, L]
    padded = qkv.new_zeros(B, L, 3, heads, d)
    padded[valid] = qkv
    q, k, v = padded.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, L, d]
    keys = rows[None, :] < torch.tensor(batch.key_lengths, device=qkv.device)[:, None]  # [B, L]
    visible = keys[:, None, :].expand(B, L, L)
    if window is not None:
        visible = visible & ((rows[:, None] - rows[None, :]).abs() <= window)[None]
    seen = visible.any(dim=2)  # [B, L]: queries with at least one key
    visible = visible | ~seen[:, :, None]  # such a row attends to all, then is zeroed (no NaN)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible[:, None], scale=scale)  # [B, heads, L, d]
    out = out.transpose(1, 2) * seen[:, :, None, None].to(out.dtype)  # [B, L, heads, d]
    return out[valid].reshape(T, heads * d)


def _additive(visible: torch.Tensor, dtype) -> torch.Tensor:
    # SDPA turns a boolean mask into an additive one on every call; cached masks are made additive once.
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, float("-inf"))


@functools.lru_cache(maxsize=256)
def _band_mask(n: int, w: int, device, dtype) -> torch.Tensor:
    i = torch.arange(n, device=device)
    return _additive((i[:, None] - i[None, :]).abs() <= w, dtype)  # [n, n]: 0 visible, -inf hidden


def _attention_banded(qkv, w, scale):
    """Sliding-window attention over one sequence, block by block.

    Queries are cut into blocks of `blk` = w / 2; block b sees the keys [b*blk - w, b*blk + blk + w),
    so the work is proportional to L * (blk + 2w), not to L^2. A mask keeps the pairs with
    |i - j| <= w. Half-window blocks compute 1.24x the visible pairs (whole-window blocks 1.49x);
    alone, on one sequence of 200 to 4,096 tokens, they ran 11-25% faster than whole-window blocks
    in bf16 and 6-8% in fp32 (blocks of 16, 24 and 48 queries were slower than 32 at w = 64).
    """
    n, _, heads, d = qkv.shape
    blk = _band_block(w)
    nb = -(-n // blk)
    span = blk + 2 * w  # keys visible to one query block
    pad_right = nb * blk - n + w
    mask = _banded_mask(n, w, qkv.device, qkv.dtype)  # [nb, 1, blk, span]

    q, k, v = qkv.unbind(1)  # [n, heads, d]
    qb = F.pad(q, (0, 0, 0, 0, 0, nb * blk - n)).view(nb, blk, heads, d).transpose(1, 2)
    kb = F.pad(k, (0, 0, 0, 0, w, pad_right)).unfold(0, span, blk).permute(0, 1, 3, 2)  # [nb, heads, span, d]
    vb = F.pad(v, (0, 0, 0, 0, w, pad_right)).unfold(0, span, blk).permute(0, 1, 3, 2)
    ob = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale)
    return ob.transpose(1, 2).reshape(nb * blk, heads * d)[:n]


def _band_block(w: int) -> int:
    return max(1, w // 2)


@functools.lru_cache(maxsize=64)
def _banded_mask(n: int, w: int, device, dtype) -> torch.Tensor:
    """Additive mask [nb, 1, blk, blk + 2w] of `_attention_banded` for a sequence of n tokens."""
    blk = _band_block(w)
    nb = -(-n // blk)
    q_pos = torch.arange(nb * blk, device=device).view(nb, blk)  # query positions, padding past n
    k_pos = torch.arange(-w, nb * blk + w, device=device).unfold(0, blk + 2 * w, blk)  # [nb, span]
    near = (q_pos[:, :, None] - k_pos[:, None, :]).abs() <= w
    # Padding (outside 0..n-1) only sees padding: a padded query sees itself and stays finite.
    q_real = q_pos < n
    k_real = (k_pos >= 0) & (k_pos < n)
    visible = near & (q_real[:, :, None] == k_real[:, None, :])
    return _additive(visible, dtype)[:, None]


# ----------------------------------------------------------------------------- GeGLU
def geglu(u):
    """`reference.geglu`, with one [T, I] buffer: `gelu_erf(u[:, :I]) * u[:, I:]`, [T, 2I] -> [T, I]."""
    x, gate = u.chunk(2, dim=-1)
    return F.gelu(x).mul_(gate)  # in place on gelu's fresh output: one [T, I] buffer, not two


# ----------------------------------------------------------------------------- linear layers
# The Linear layers: `x @ W^T` by a GEMM that takes the weight in a form of its own, made once at
# load (`Ops.pack_linear`), then applied per call (`Ops.linear`, and `Ops.geglu_linear` for Wi).
def keep_weight(weight, geglu=False):
    """The GPU's form: the checkpoint's [out, in] tensor as it is (cuBLAS takes it transposed)."""
    return weight


def linear(x, weight):
    return F.linear(x, weight)


def column_major(weight, geglu=False):
    """The same values in transposed storage (contiguous [in, out]): CPU BLAS runs `x @ W^T` as a
    plain NN product. The CPU's form where oneDNN cannot take the dtype."""
    return weight.t().contiguous().t()


# The number of rows (tokens) oneDNN lays a packed weight out for: the CPU's batch budget. Any
# other count runs too (measured from 1 to 4,000 rows, faster than BLAS at each).
ONEDNN_ROWS_HINT = CPU_MAX_BATCH_TOKENS


@functools.lru_cache(maxsize=None)
def onednn_supports(dtype: torch.dtype) -> bool:
    """Whether this torch and this CPU run oneDNN's packed linear and its exact-GELU and multiply
    epilogues in `dtype` (float16 needs avx512_fp16 or avx_ne_convert; a build may lack oneDNN):
    tried once on a tiny product against `F.linear`."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 16, generator=g).to(dtype), torch.randn(8, 16, generator=g).to(dtype)
    try:
        with torch.inference_mode():
            packed = _onednn_pack(w)
            got = _onednn_linear(x, packed).float()
            fused = _onednn_mul_linear(x, packed, _onednn_linear(x, packed, gelu=True)).float()
    except (AttributeError, RuntimeError, NotImplementedError):  # an op this torch lacks, a dtype it refuses
        return False
    want = F.linear(x.float(), w.float())
    tol = 1e-5 if dtype == torch.float32 else 3e-2  # relative to the largest output
    return bool((got - want).abs().max() <= tol * want.abs().max()
                and (fused - F.gelu(want) * want).abs().max() <= tol * (F.gelu(want) * want).abs().max())


def _onednn_pack(weight):
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), ONEDNN_ROWS_HINT)


def _onednn_linear(x, packed, gelu=False):
    """`x @ W^T`, or `gelu_erf(x @ W^T)` (oneDNN's "gelu" post-op, algorithm "none": erf)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "gelu" if gelu else "none", [], "none" if gelu else "")


def _onednn_mul_linear(x, packed, other):
    """`(x @ W^T) * other`, the product written once."""
    return torch.ops.mkldnn._linear_pointwise.binary(x, other, packed, None, "mul")


def cpu_pack(weight, geglu=False):
    """The CPU's form of a Linear weight: oneDNN's blocked layout (fp32: 1.1-1.3x the GFLOP/s of
    BLAS on the model's shapes, several times faster at a few rows; bf16: 1.03-1.06x), or column-major
    where oneDNN cannot take the dtype. For Wi (`geglu`), its two halves packed apart, so that the
    GEMMs apply GeGLU as they write (`cpu_geglu_linear`)."""
    if not onednn_supports(weight.dtype):
        return column_major(weight)
    if geglu:
        inner, gate = weight.chunk(2, dim=0)
        return _onednn_pack(inner), _onednn_pack(gate)
    return _onednn_pack(weight)


def cpu_linear(x, packed):
    return _onednn_linear(x, packed) if packed.is_mkldnn else F.linear(x, packed)


def cpu_geglu_linear(x, packed):
    """`geglu(x @ Wi^T)` for a `cpu_pack(Wi, geglu=True)`: with oneDNN, two GEMMs, the first
    writing `gelu_erf(x W_in^T)`, the second multiplying `x W_gate^T` into it as it writes: no
    [T, 2I] intermediate and no pass of its own for GeGLU."""
    if isinstance(packed, tuple):
        inner, gate = packed
        return _onednn_mul_linear(x, gate, _onednn_linear(x, inner, gelu=True))
    return geglu(F.linear(x, packed))
