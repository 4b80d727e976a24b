"""The Triton varlen attention kernel (and torch's varlen flash attention) against the torch
reference `reference.attention`, on packed batches of mixed lengths.

Lengths sit on the boundaries that matter: 1 token, the kernel's 64/128-row blocks, the local
window (w = 64: up to 129 keys), and a few hundred tokens. A small window (8, 16) on short
sequences makes query blocks cross window edges cheaply under the Triton interpreter. q and k are
drawn with a large softmax scale so attention is peaked: a key let in or left out by mistake moves
the output visibly.

Tolerances come as one `(dtype, atol, rtol)` tuple, by the rules in helpers.py: float32
elementwise against `reference.attention`; float16 / bfloat16 within 2x torch's own error against
fp32 plus `atol` as a floor, and elementwise within LOWP_SANITY of fp32 as a sanity bound.
bfloat16 only where CUDA exists: the interpreter mishandles bf16 dots.
"""

from __future__ import annotations

import pytest
import torch

from modernbert_embed import reference
from modernbert_embed.rope import rope_tables
from modernbert_embed.kernels.attention import _CONFIG_FP32, attention, attention_work
from modernbert_embed.torch_varlen import varlen_attention, varlen_available, varlen_supports_window

from conftest import HAS_CUDA, requires_cuda
from helpers import DEVICE, assert_close, batch_of, check_against_torch, dense_attention

HEADS, HEAD_DIM = 2, 64
SCALE = 0.5  # 4x the model's 1/sqrt(64): peaked attention, so window mistakes show

# (dtype, atol, rtol): atol is the floor on top of 2x torch's error for low precision
FP32 = pytest.param(torch.float32, 1e-5, 1e-5, id="float32")
FP16 = pytest.param(torch.float16, 1e-4, 0.0, id="float16")
BF16 = pytest.param(torch.bfloat16, 1e-3, 0.0, marks=requires_cuda, id="bfloat16")
DTYPES = [FP32, FP16, BF16]
LOWP_SANITY = {torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 3e-2)}  # elementwise vs fp32

# one batch across every boundary (T = 882), and short ones for small windows (T = 303)
MIXED = [1, 2, 63, 64, 65, 128, 129, 130, 300]
SHORT = [1, 2, 9, 17, 33, 90, 151]


def slow(param):
    """`param` left out of `make test-fast` (under the Triton interpreter every case costs seconds)."""
    return pytest.param(*param.values, id=param.id, marks=[*param.marks, pytest.mark.slow])


def make_qkv(lengths, dtype, seed=0, head_dim=HEAD_DIM):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(sum(lengths), 3, HEADS, head_dim, generator=g)
    return qkv.to(dtype=dtype, device=DEVICE)


def at_token(lengths, head_dim=HEAD_DIM):
    """Words for an index (t, f) into an attention output [T, heads * head_dim]: 'token t
    (sequence b of length n, position p), head h, dim d'."""
    def where(index):
        t, f = index
        start = 0
        for b, n in enumerate(lengths):
            if t < start + n:
                return (f"token {t} (sequence {b} of length {n}, position {t - start}), "
                        f"head {f // head_dim}, dim {f % head_dim}")
            start += n
        return f"token {t}"
    return where


def check_against_reference(name, fn, qkv, batch, window, atol, rtol, lengths):
    """`fn` against reference.attention: fp32 directly, fp16/bf16 by the 2x rule (see helpers.py)
    and within LOWP_SANITY of fp32 elementwise."""
    out = fn(qkv, batch, window, SCALE)
    assert out.dtype == qkv.dtype, f"{name}: dtype {out.dtype} != {qkv.dtype}"
    where = at_token(lengths)
    check_against_torch(name, out, lambda x: reference.attention(x, batch, window, SCALE), (qkv,), atol, rtol, where)
    if qkv.dtype != torch.float32:
        ref32 = reference.attention(qkv.float(), batch, window, SCALE)
        assert_close(name + " (vs fp32)", out, ref32, *LOWP_SANITY[qkv.dtype], where)


# ----------------------------------------------------------------------------- the Triton kernel
@pytest.mark.parametrize("window", [None, 64], ids=["full", "w64"])
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_triton_attention_mixed_lengths(dtype, atol, rtol, window):
    qkv = make_qkv(MIXED, dtype)
    check_against_reference(f"triton {dtype} window={window}", attention, qkv, batch_of(MIXED), window, atol, rtol, MIXED)


@pytest.mark.parametrize("window", [8, 16], ids=["w8", "w16"])
@pytest.mark.parametrize("dtype, atol, rtol", [FP32, slow(FP16), BF16])
def test_triton_attention_small_window(dtype, atol, rtol, window):
    # windows far smaller than a block: every query block starts mid-block and rows see only
    # part of each key block; sequences of 17..151 tokens span 1 to 3 query blocks
    qkv = make_qkv(SHORT, dtype, seed=1)
    check_against_reference(f"triton {dtype} window={window}", attention, qkv, batch_of(SHORT), window, atol, rtol, SHORT)


@pytest.mark.parametrize("window", [None, 0, 16], ids=["full", "w0", "w16"])
def test_triton_attention_matches_explicit_mask(window):
    # independent of the torch ops: float64, dense per-sequence scores, an explicit |i - j| <= w mask;
    # w = 0 means each token attends to itself only, so the output is exactly its own v
    lengths = [1, 5, 70, 140]
    qkv = make_qkv(lengths, torch.float32, seed=2)
    out = attention(qkv, batch_of(lengths), window, SCALE)
    assert_close(f"window={window} vs explicit mask", out, dense_attention(qkv, lengths, window, SCALE),
                 1e-5, 1e-5, at_token(lengths))
    if window == 0:
        assert_close("w0 == v", out, qkv[:, 2].reshape(len(out), -1), 1e-6, 0.0, at_token(lengths))


def test_window_skipping_keeps_results():
    # a window that covers every sequence skips nothing and must agree exactly with full attention
    lengths = [3, 64, 129, 200]
    qkv = make_qkv(lengths, torch.float32, seed=3)
    batch = batch_of(lengths)
    full = attention(qkv, batch, None, SCALE)
    wide = attention(qkv, batch, max(lengths), SCALE)
    assert torch.equal(full, wide), f"max diff {(full - wide).abs().max():.3g}"


def test_window_skips_far_keys():
    # Poison one token's k and v with NaN. A query block [m0, m0 + BLOCK_M) loads only the keys in
    # [m0 - w, m0 + BLOCK_M + w), so any query further than w + BLOCK_M from the poisoned token must
    # never touch it: its output stays finite and equal to the reference with that token removed.
    # Full attention, which must read every key, is NaN everywhere in that sequence (the test bites).
    w, block_m = 8, _CONFIG_FP32[0]
    lengths = [10, 400, 7]
    qkv = make_qkv(lengths, torch.float32, seed=4)
    poisoned_pos = 200
    poisoned = lengths[0] + poisoned_pos
    qkv[poisoned, 1:] = float("nan")
    batch = batch_of(lengths)
    out = attention(qkv, batch, w, SCALE).cpu()

    clean = qkv.clone()
    clean[poisoned, 1:] = 0.0
    ref = reference.attention(clean, batch, w, SCALE).cpu()
    pos = torch.cat([torch.arange(n) for n in lengths])
    seq = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    far = (seq != 1) | ((pos - poisoned_pos).abs() > w + block_m)
    assert far.sum() > 200
    assert_close("queries far from a NaN key (index among them)", out[far], ref[far], 1e-5, 1e-5)
    near = (seq == 1) & ((pos - poisoned_pos).abs() <= w)
    assert torch.isnan(out[near]).all(), "queries whose window holds the NaN key should see it"

    full = attention(qkv, batch, None, SCALE).cpu()
    assert torch.isnan(full[seq == 1]).all() and torch.isfinite(full[seq != 1]).all()


def test_window_work_is_proportional_to_window():
    # the score entries the kernel computes for w = 64: at most (64 + 128) keys per query row
    lengths = [8192, 4096, 100, 1]
    done, dense = attention_work(lengths, 64)
    assert done <= sum(lengths) * 192 + 64 * 192 * len(lengths)
    assert done < dense / 20
    assert attention_work([1000], None)[0] >= 1000 * 1000


@pytest.mark.parametrize("head_dim", [16, 32, 128])
def test_triton_attention_other_head_dims(head_dim):
    lengths = [1, 40, 75]
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(sum(lengths), 3, HEADS, head_dim, generator=g).to(DEVICE)
    batch = batch_of(lengths)
    for window in (None, 16):
        out = attention(qkv, batch, window, SCALE)
        ref = reference.attention(qkv, batch, window, SCALE)
        assert_close(f"head_dim={head_dim} window={window}", out, ref, 1e-5, 1e-5, at_token(lengths, head_dim))


# one tile in `make test-fast` (smaller than the window, unequal M / N); the tiniest tiles are the
# slowest under the interpreter
@pytest.mark.parametrize("config", [pytest.param((16, 16, 1, 1), marks=pytest.mark.slow), (32, 64, 2, 2),
                                    pytest.param((128, 32, 4, 3), marks=pytest.mark.slow)], ids=str)
@pytest.mark.parametrize("window", [None, 64], ids=["full", "w64"])
def test_triton_attention_tile_override(config, window):
    # the benchmarks sweep tile shapes: any valid (BLOCK_M, BLOCK_N, warps, stages) must give the
    # same attention, including tiles smaller and larger than the window and unequal M / N
    lengths = [1, 17, 64, 65, 140]
    qkv = make_qkv(lengths, torch.float32, seed=5)
    out = attention(qkv, batch_of(lengths), window, SCALE, config=config)
    assert_close(f"config={config} window={window}", out, dense_attention(qkv, lengths, window, SCALE),
                 1e-5, 1e-5, at_token(lengths))


def rope_case(dtype_param, window, name):
    """float32 at every window; float16 / bfloat16 at the local window only in `make test-fast`."""
    case = pytest.param(*dtype_param.values, window, id=f"{dtype_param.id}-{name}", marks=dtype_param.marks)
    return case if dtype_param.id == "float32" or window == 64 else slow(case)


ROPE_CASES = [rope_case(d, w, name) for d in DTYPES for w, name in ((None, "full"), (64, "w64"), (16, "w16"))]


@pytest.mark.parametrize("dtype, atol, rtol, window", ROPE_CASES)
def test_rotary_inside_attention(dtype, atol, rtol, window):
    # rope=(cos, sin): q and k come unrotated and are rotated as they are loaded; the same
    # attention as the rotary op followed by the kernel, and qkv itself is left as it was. The
    # reference rotates by positions written out here (the index within each sequence), so that
    # the kernel's use of batch.positions is checked too.
    qkv = make_qkv(MIXED, dtype, seed=6)
    batch = batch_of(MIXED)
    cos, sin = rope_tables(10000.0, HEAD_DIM, 512, DEVICE)
    positions = torch.cat([torch.arange(n) for n in MIXED]).to(DEVICE)
    rotated = reference.rotary(qkv.float().clone(), positions, cos, sin).to(dtype)
    before = qkv.clone()

    def fused(qkv_, batch_, window_, scale_):
        return attention(qkv, batch_, window_, scale_, rope=(cos, sin))

    check_against_reference(f"rope {dtype} window={window}", fused, rotated, batch, window, atol, rtol, MIXED)
    assert torch.equal(qkv, before), "attention with rope wrote into qkv"


def test_rotary_inside_attention_rejects_bad_tables():
    qkv, batch = make_qkv([4], torch.float32), batch_of([4])
    cos, sin = rope_tables(10000.0, HEAD_DIM, 16, DEVICE)
    for rope, what in [((cos,), "pair"), ((cos.double(), sin), "float32"), ((cos[:, :8], sin), "float32"),
                       ((cos[:2], sin[:2]), "positions"), ((cos.t().contiguous().t(), sin), "contiguous")]:
        with pytest.raises(ValueError, match=what):
            attention(qkv, batch, None, SCALE, rope=rope)
    with pytest.raises(ValueError, match="power of two"):
        attention(make_qkv([4], torch.float32, head_dim=16), batch, None, SCALE,
                  rope=rope_tables(10000.0, 16, 16, DEVICE))


def test_triton_attention_rejects_bad_config():
    qkv, batch = make_qkv([4], torch.float32), batch_of([4])
    for bad, what in [((48, 64, 4, 3), "BLOCK_M"), ((64, 8, 4, 3), "BLOCK_N"), ((64, 64, 3, 3), "num_warps"),
                      ((64, 64, 4, 0), "num_stages"), ((64, 64), "config must be")]:
        with pytest.raises(ValueError, match=what):
            attention(qkv, batch, None, SCALE, config=bad)


def test_triton_attention_rejects_bad_input():
    batch = batch_of([4])
    with pytest.raises(ValueError, match="head_dim"):
        attention(torch.zeros(4, 3, HEADS, 48, device=DEVICE), batch, None, SCALE)
    with pytest.raises(ValueError, match=r"\[T, 3, heads, head_dim\]"):
        attention(torch.zeros(4, 2, HEADS, 64, device=DEVICE), batch, None, SCALE)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        attention(torch.zeros(4, 3, HEADS, 64, dtype=torch.float64, device=DEVICE), batch, None, SCALE)
    with pytest.raises(ValueError, match="contiguous"):
        attention(torch.zeros(4, 3, 64, HEADS, device=DEVICE).transpose(2, 3), batch, None, SCALE)


# ----------------------------------------------------------------------------- torch's varlen
@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU error message")
def test_torch_varlen_refuses_cpu():
    assert not varlen_available()
    qkv = torch.zeros(4, 3, HEADS, HEAD_DIM, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="torch-varlen"):
        varlen_attention(qkv, batch_of([4]), None, SCALE)


@requires_cuda
@pytest.mark.parametrize("window", [None, 64, 8], ids=["full", "w64", "w8"])
@pytest.mark.parametrize("dtype, atol, rtol", [FP16, BF16])
def test_torch_varlen_attention(dtype, atol, rtol, window):
    if not varlen_available():
        pytest.skip(f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn")
    lengths = MIXED if window != 8 else SHORT
    qkv = make_qkv(lengths, dtype, seed=6)
    batch = batch_of(lengths)
    if window is not None and not varlen_supports_window():
        with pytest.raises(RuntimeError, match="window_size"):
            varlen_attention(qkv, batch, window, SCALE)
        return
    check_against_reference(f"torch-varlen {dtype} window={window}", varlen_attention, qkv, batch, window, atol, rtol, lengths)


def test_route_by_window_attention_routes_by_window():
    # "torch-varlen-global": global layers (window None) through torch's varlen attention, windowed
    # layers through the Triton kernel
    from modernbert_embed.ops import route_by_window, select_ops

    calls = []
    attn = route_by_window(lambda *a: calls.append("global"), lambda *a: calls.append("local"))
    qkv, batch = make_qkv([4], torch.float32), batch_of([4])
    attn(qkv, batch, None, SCALE)
    attn(qkv, batch, 64, SCALE)
    assert calls == ["global", "local"]

    ops = select_ops(DEVICE, attention="torch-varlen-global")
    assert ops.name.endswith("+attn:torch-varlen-global") and not ops.fused_rotary
    lengths = [1, 70, 140]
    qkv, batch = make_qkv(lengths, torch.float32), batch_of(lengths)
    assert_close("windowed layer via triton", ops.attention(qkv, batch, 64, SCALE),
                 dense_attention(qkv, lengths, 64, SCALE), 1e-5, 1e-5, at_token(lengths))
    if not HAS_CUDA:  # the global layer went to torch's varlen attention, which needs CUDA
        with pytest.raises(RuntimeError, match="torch-varlen"):
            ops.attention(qkv, batch, None, SCALE)
