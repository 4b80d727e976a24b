"""Each Triton kernel against its torch reference (`reference`), on deliberately awkward shapes.

Without CUDA the kernels run under the Triton interpreter on CPU tensors (see conftest.py), so the
shapes stay small (hidden 128 mostly, one case each at 768 / 1023 / 1500). Tolerances come as one
`(dtype, atol, rtol)` tuple, by the rules in helpers.py: float32 against the torch op directly,
float16 / bfloat16 within 2x torch's own error against fp32, `atol` a tiny floor (for ops where
torch's own error is zero). bfloat16 only where CUDA exists: the interpreter mishandles bf16.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from modernbert_embed import ops_torch, reference
from modernbert_embed.batching import pack
from modernbert_embed.kernels.geglu import geglu
from modernbert_embed.kernels.layer_norm import layer_norm
from modernbert_embed.kernels.pooling import pool
from modernbert_embed.kernels.rotary import rotary
from modernbert_embed.rope import rope_tables

from conftest import SMALL_CONFIG, random_ids, requires_cuda
from helpers import DEVICE, assert_close, assert_within_torch_error, batch_of, check_against_torch, load_with_ops

FP32 = (torch.float32, 1e-5, 1e-5)
FP16 = (torch.float16, 1e-5, 0.0)
BF16 = pytest.param(torch.bfloat16, 1e-5, 0.0, marks=requires_cuda, id="bfloat16")
DTYPES = [pytest.param(*FP32, id="float32"), pytest.param(*FP16, id="float16"), BF16]

# Packed batch lengths around the interesting boundaries: 1 token, the local window (+-64 keys:
# 129 visible), kernel block sizes, and one long sequence.
PACKED = [1, 63, 64, 65, 128, 129, 130, 300]


def randn(*shape, seed=0, scale=1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype=dtype, device=DEVICE)


# ----------------------------------------------------------------------------- layer norm
LN_SHAPES = [(1, 128), (7, 128), (131, 128), (2, 5, 128), (3, 768), (5, 1023), (2, 1500)]


@pytest.mark.parametrize("shape", LN_SHAPES, ids=str)
@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "plain"])
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_layer_norm(shape, with_residual, dtype, atol, rtol):
    H = shape[-1]
    x = randn(*shape, seed=1, scale=2.0, dtype=dtype) + 0.5  # an offset, so the mean matters
    res = randn(*shape, seed=2, dtype=dtype) if with_residual else None
    w = randn(H, seed=3, dtype=dtype)
    y, s = layer_norm(x, w, 1e-5, res)
    assert y.dtype == s.dtype == dtype
    check_against_torch("y", y, lambda *a: reference.layer_norm(*a)[0], (x, w, 1e-5, res), atol, rtol)
    if with_residual:
        check_against_torch("s", s, lambda *a: reference.layer_norm(*a)[1], (x, w, 1e-5, res), atol, rtol)
    else:
        assert s is x, "without a residual the second output is x itself"


def test_layer_norm_constant_row_and_large_offset():
    """A constant row (variance 0: y = 0, not NaN) and rows with a large mean (cancellation)."""
    x = torch.cat([torch.full((1, 96), 3.0, device=DEVICE), randn(4, 96, seed=4) + 1000.0])
    w = randn(96, seed=5)
    y, _ = layer_norm(x, w, 1e-5)
    assert_close("y", y, reference.layer_norm(x, w, 1e-5)[0], 1e-3, 1e-4)
    assert (y[0] == 0).all()


def test_layer_norm_rejects_bad_inputs():
    x = randn(4, 32)
    with pytest.raises(ValueError, match=r"weight must be \[32\], got \(31,\)"):
        layer_norm(x, randn(31), 1e-5)
    with pytest.raises(ValueError, match=r"residual shape \(4, 31\) differs from x \(4, 32\)"):
        layer_norm(x, randn(32), 1e-5, randn(4, 31))
    with pytest.raises(TypeError, match="residual dtype torch.float16 differs from x torch.float32"):
        layer_norm(x, randn(32), 1e-5, randn(4, 32, dtype=torch.float16))


# ----------------------------------------------------------------------------- rotary
ROPE = {}


def rope(theta, head_dim, max_positions=1024):
    key = (theta, head_dim, max_positions)
    if key not in ROPE:
        ROPE[key] = rope_tables(theta, head_dim, max_positions, DEVICE)
    return ROPE[key]


@pytest.mark.parametrize(
    "T, heads, head_dim",
    [(1, 2, 64), (7, 3, 64), (131, 2, 64), (5, 12, 64), (5, 2, 32), (4, 1, 128), (3, 2, 96), (2, 3, 2)],
    ids=str,
)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_rotary(T, heads, head_dim, dtype, atol, rtol):
    cos, sin = rope(160000.0, head_dim)
    g = torch.Generator().manual_seed(T)
    positions = torch.randint(0, cos.shape[0], (T,), generator=g).to(DEVICE)
    qkv = randn(T, 3, heads, head_dim, seed=T, dtype=dtype)
    before = qkv.clone()
    out = rotary(qkv, positions, cos, sin)
    assert out is qkv, "rotary works in place and returns its input"
    assert torch.equal(qkv[:, 2], before[:, 2]), "v must be untouched"
    check_against_torch("qkv", out, reference.rotary, (before, positions, cos, sin), atol, rtol)


@pytest.mark.parametrize("pos_dtype", [torch.int64, torch.int32], ids=["int64", "int32"])
def test_rotary_packed_positions(pos_dtype):
    """Positions restarting at 0 for each packed sequence, both index dtypes, the local theta."""
    batch = batch_of(PACKED)
    cos, sin = rope(10000.0, 64)
    qkv = randn(batch.num_tokens, 3, 2, 64, seed=7)
    ref = reference.rotary(qkv, batch.positions, cos, sin)
    out = rotary(qkv, batch.positions.to(pos_dtype), cos, sin)
    assert out.data_ptr() == qkv.data_ptr()
    assert_close("qkv", out, ref, *FP32[1:])


def test_rotary_rejects_bad_inputs():
    cos, sin = rope(10000.0, 64)
    qkv = randn(4, 3, 2, 64)
    pos = torch.zeros(4, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="contiguous"):  # an in-place update would be lost
        rotary(qkv.transpose(2, 3).contiguous().transpose(2, 3), pos, cos, sin)
    with pytest.raises(ValueError, match=r"cos table must be float32 \[max_positions, 16\]"):  # another head_dim
        rotary(randn(4, 3, 2, 32), pos, cos, sin)
    with pytest.raises(ValueError, match="positions must be int32/int64"):
        rotary(qkv, pos.float(), cos, sin)
    with pytest.raises(ValueError, match="float32"):  # tables in the wrong dtype
        rotary(qkv, pos, cos.double(), sin)


# ----------------------------------------------------------------------------- GeGLU
GEGLU_SHAPES = [(1, 192), (7, 192), (131, 192), (3, 1152), (2, 1023), (5, 1), (2, 3, 96)]  # [..., I]


@pytest.mark.parametrize("shape", GEGLU_SHAPES, ids=str)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_geglu(shape, dtype, atol, rtol):
    *lead, I = shape
    u = randn(*lead, 2 * I, seed=I, scale=3.0, dtype=dtype)  # +-9: both GELU tails
    out = geglu(u)
    assert out.dtype == dtype
    check_against_torch("geglu", out, reference.geglu, (u,), atol, rtol)


def test_geglu_non_contiguous_input():
    u = randn(2 * 96, 9, seed=9).T  # [9, 192] with a column-major layout
    assert_close("geglu", geglu(u), reference.geglu(u), *FP32[1:])


# ----------------------------------------------------------------------------- pooling
POOL_CASES = [  # (lengths, hidden, dim)
    ([1], 128, None),
    ([7], 128, None),
    ([131], 128, 64),
    (PACKED, 128, None),
    (PACKED, 128, 100),
    ([2000, 3], 128, None),  # long: 125 steps of the token loop
    ([3, 1, 5], 1023, None),
    ([9, 2], 768, 256),
]
POOL_MODES = [("mean", True), ("mean", False), ("cls", True), ("cls", False)]
# The modes do not depend on the shape: every shape with mean + normalise, every mode on two shapes
# (many short sequences with Matryoshka truncation; an odd width with a lone token). The rest of
# the cross product runs in the full suite only.
POOL_ALL_MODES = {(tuple(PACKED), 128, 100), ((3, 1, 5), 1023, None)}


def pool_case(lengths, H, dim, mode, normalize):
    ident = f"{'packed' if len(lengths) > 3 else lengths}-H{H}-dim{dim}-{mode}-{'norm' if normalize else 'raw'}"
    fast = (mode, normalize) == POOL_MODES[0] or (tuple(lengths), H, dim) in POOL_ALL_MODES
    return pytest.param(lengths, H, dim, mode, normalize, id=ident, marks=() if fast else pytest.mark.slow)


@pytest.mark.parametrize("lengths, H, dim, mode, normalize",
                         [pool_case(*case, *m) for case in POOL_CASES for m in POOL_MODES])
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_pool(lengths, H, dim, mode, normalize, dtype, atol, rtol):
    batch = batch_of(lengths)
    hidden = randn(batch.num_tokens, H, seed=len(lengths), dtype=dtype) + 0.25
    out = pool(hidden, batch, mode, dim, normalize)
    assert out.dtype == torch.float32 and out.shape == (len(lengths), dim or H)
    # torch pools low-precision inputs in fp32 too, so its own error is nil and the low-precision
    # bound is the absolute floor alone
    check_against_torch("pooled", out, reference.pool, (hidden, batch, mode, dim, normalize), atol, rtol)


def test_pool_zero_vector_stays_finite():
    """An all-zero embedding normalises to zeros (the 1e-12 clamp), never NaN."""
    batch = batch_of([3, 4])
    hidden = randn(7, 128, seed=11)
    hidden[:3] = 0
    out = pool(hidden, batch, "mean", None, True)
    assert torch.isfinite(out).all()
    assert (out[0] == 0).all()
    assert_close("pooled", out, reference.pool(hidden, batch, "mean", None, True), *FP32[1:])


def test_pool_rejects_bad_inputs():
    batch = batch_of([3, 4])
    with pytest.raises(ValueError, match="unknown pooling mode 'max'"):
        pool(randn(7, 16), batch, "max")
    with pytest.raises(ValueError, match=r"dim must be in 1..16, got 17"):
        pool(randn(7, 16), batch, "mean", dim=17)
    with pytest.raises(ValueError, match="the batch holds 7 tokens but hidden has 8 rows"):
        pool(randn(8, 16), batch, "mean")


# ----------------------------------------------------------------------------- the whole model
MODEL_LENGTHS = [1, 7, 130, 65]  # mixed lengths, one longer than the local window (129 keys)
# float16 in the full suite only: under the interpreter each whole-model run costs seconds
MODEL_DTYPES = [torch.float32, pytest.param(torch.float16, marks=pytest.mark.slow),
                pytest.param(torch.bfloat16, marks=requires_cuda)]


def forward(model, ids):
    """One forward of a loaded Embedder's model on `ids` packed in order: the final hidden states
    [T, H] (fp32) and the mean-pooled, normalised embeddings [B, H] from the model's pool op."""
    batch = pack(ids, list(range(len(ids))), DEVICE)
    hidden = model.model(batch)
    return hidden.float(), model.ops.pool(hidden, batch, "mean", None, True)


@pytest.mark.parametrize("dtype", MODEL_DTYPES, ids=["float32", "float16", "bfloat16"])
def test_model_with_triton_ops_matches_torch_ops(small_checkpoint, dtype):
    """Every op but attention from Triton (select_ops(backend="triton", attention="torch")): the
    same hidden states and embeddings as the torch ops."""
    ids = random_ids(MODEL_LENGTHS, vocab=SMALL_CONFIG["vocab_size"], seed=5)
    ref = load_with_ops(small_checkpoint, DEVICE, torch.float32, backend="torch")
    tri = load_with_ops(small_checkpoint, DEVICE, dtype, backend="triton", attention="torch")
    assert tri.ops.pool is pool and tri.ops.layer_norm is layer_norm and tri.ops.geglu is geglu
    assert tri.ops.rotary is rotary and tri.ops.attention is ops_torch.attention
    ref_h, ref_e = forward(ref, ids)
    out_h, out_e = forward(tri, ids)
    if dtype == torch.float32:
        assert_close("hidden", out_h, ref_h, 1e-4, 0.0)
        assert_close("embedding", out_e, ref_e, 1e-5, 0.0)
        # through encode: Matryoshka pooling (the first 64 features, normalised again), the
        # caller's order restored
        cut = tri.encode_tokens(ids[::-1], truncate_dim=64, convert_to_tensor=True)
        assert_close("embedding[:64]", cut, torch.nn.functional.normalize(ref_e.flip(0)[:, :64], dim=-1), 1e-5, 0.0)
        return
    low_h, _ = forward(load_with_ops(small_checkpoint, DEVICE, dtype, backend="torch"), ids)
    assert_within_torch_error("hidden", out_h.to(dtype), low_h.to(dtype), ref_h, 1e-3)
    cos = torch.nn.functional.cosine_similarity(out_e, ref_e, dim=-1)
    assert cos.min() >= 0.999, f"pooled cosine {cos.min():.6f} at sequence {int(cos.argmin())}"


def test_embedder_with_rotary_inside_attention(small_checkpoint):
    """attention="triton-rope": the kernel rotates q and k as it loads them and the model skips the
    rotary op; the same embeddings and hidden states as the torch ops, in float32."""
    ids = random_ids([130, 3, 1, 66], vocab=SMALL_CONFIG["vocab_size"], seed=7)
    ref = load_with_ops(small_checkpoint, DEVICE, "float32", backend="torch")
    fused = load_with_ops(small_checkpoint, DEVICE, "float32", backend="triton", attention="triton-rope")
    assert fused.ops.fused_rotary and not ref.ops.fused_rotary
    # the rotary op must not run: the attention modules get ops whose rotary records any call
    calls = []
    counting = dataclasses.replace(fused.ops, rotary=lambda *a: calls.append(1))
    for layer in fused.model.layers:
        layer.attn.ops = counting
    ref_h, ref_e = forward(ref, ids)
    out_h, out_e = forward(fused, ids)
    assert calls == []
    assert_close("hidden", out_h, ref_h, 1e-4, 0.0)
    assert_close("embedding", out_e, ref_e, 1e-5, 0.0)
