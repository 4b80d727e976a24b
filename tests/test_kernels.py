"""Each Triton kernel against its torch reference (`ops_torch`), on deliberately awkward shapes.

Without CUDA the kernels run under the Triton interpreter on CPU tensors (see conftest.py), so the
shapes stay small (hidden 128 mostly, one case each at 768 / 1023 / 1500). Tolerances come as one
`(dtype, atol, rtol)` tuple:
  - float32: the kernel is compared with the torch op directly, |out - ref| <= atol + rtol * |ref|;
  - float16 / bfloat16: the kernel's max error against an fp32 reference (the torch op on the same
    inputs upcast) must be at most 2x torch's own max error in that dtype, plus `atol` as a tiny
    floor (for ops where torch's own error is zero). bfloat16 only where CUDA exists: the
    interpreter mishandles bf16.
"""

from __future__ import annotations

import dataclasses


import pytest
import torch

from modernbert_embed import ops_torch
from modernbert_embed.batching import pack
from modernbert_embed.config import ModernBertConfig
from modernbert_embed.kernels.geglu import geglu
from modernbert_embed.kernels.layer_norm import layer_norm
from modernbert_embed.kernels.pooling import pool
from modernbert_embed.kernels.rotary import rotary
from modernbert_embed.model import ModernBert, rope_tables
from modernbert_embed.ops import TORCH_OPS, Ops
from modernbert_embed.weights import load_state_dict

from conftest import HAS_CUDA, SMALL_CONFIG, random_ids, requires_cuda
from helpers import load_with_ops

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")

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


def batch_of(lengths):
    return pack([[0] * n for n in lengths], list(range(len(lengths))), DEVICE)


def where(diff: torch.Tensor):
    return tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape)) if diff.numel() else ()


def assert_finite(name, out):
    bad = ~torch.isfinite(out)
    assert not bad.any(), f"{name}: {int(bad.sum())} non-finite outputs, the first at {where(bad.float())}"


def assert_close(name, out, ref, atol, rtol):
    """Elementwise |out - ref| <= atol + rtol * |ref| (fp32 comparisons); says where it fails."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    out, ref = out.float(), ref.float()
    assert_finite(name, out)
    diff = (out - ref).abs()
    excess = diff - (atol + rtol * ref.abs())
    if excess.numel() and excess.max() > 0:
        at = where(excess)
        raise AssertionError(
            f"{name}: {(excess > 0).sum()} of {diff.numel()} elements outside atol={atol} rtol={rtol}; "
            f"max diff {diff.max():.3g} at {where(diff)}; worst excess at {at}: "
            f"got {out[at]:.7g}, expected {ref[at]:.7g}"
        )


def assert_within_torch_error(name, out, ref_lowp, ref32, atol):
    """max |out - ref32| <= 2 * max |ref_lowp - ref32| + atol (low-precision comparisons)."""
    assert out.shape == ref32.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref32.shape)}"
    assert out.dtype == ref_lowp.dtype, f"{name}: dtype {out.dtype} != torch's {ref_lowp.dtype}"
    out = out.float()
    assert_finite(name, out)
    err = (out - ref32).abs()
    torch_err = (ref_lowp.float() - ref32).abs().max().item() if err.numel() else 0.0
    bound = 2 * torch_err + atol
    if err.numel() and err.max() > bound:
        at = where(err)
        raise AssertionError(
            f"{name}: max error vs fp32 {err.max():.3g} at {at} (got {out[at]:.7g}, fp32 {ref32[at]:.7g}) "
            f"exceeds 2 x torch's own {torch_err:.3g} + {atol}"
        )


def check(name, out, ref_fn, inputs, dtype, atol, rtol):
    """Compare `out` (from inputs in `dtype`) with `ref_fn`: directly in fp32, else by the 2x rule."""
    if dtype == torch.float32:
        assert_close(name, out, ref_fn(*inputs), atol, rtol)
    else:
        up = [x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs]
        assert_within_torch_error(name, out, ref_fn(*inputs), ref_fn(*up), atol)


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
    check("y", y, lambda *a: ops_torch.layer_norm(*a)[0], (x, w, 1e-5, res), dtype, atol, rtol)
    if with_residual:
        check("s", s, lambda *a: ops_torch.layer_norm(*a)[1], (x, w, 1e-5, res), dtype, atol, rtol)
    else:
        assert s is x, "without a residual the second output is x itself"


def test_layer_norm_constant_row_and_large_offset():
    """A constant row (variance 0: y = 0, not NaN) and rows with a large mean (cancellation)."""
    x = torch.cat([torch.full((1, 96), 3.0, device=DEVICE), randn(4, 96, seed=4) + 1000.0])
    w = randn(96, seed=5)
    y, _ = layer_norm(x, w, 1e-5)
    assert_close("y", y, ops_torch.layer_norm(x, w, 1e-5)[0], 1e-3, 1e-4)
    assert (y[0] == 0).all()


def test_layer_norm_rejects_bad_inputs():
    x = randn(4, 32)
    with pytest.raises(ValueError):
        layer_norm(x, randn(31), 1e-5)
    with pytest.raises(ValueError):
        layer_norm(x, randn(32), 1e-5, randn(4, 31))
    with pytest.raises(TypeError):
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
    check("qkv", out, ops_torch.rotary, (before, positions, cos, sin), dtype, atol, rtol)


@pytest.mark.parametrize("pos_dtype", [torch.int64, torch.int32], ids=["int64", "int32"])
def test_rotary_packed_positions(pos_dtype):
    """Positions restarting at 0 for each packed sequence, both index dtypes, the local theta."""
    batch = batch_of(PACKED)
    cos, sin = rope(10000.0, 64)
    qkv = randn(batch.num_tokens, 3, 2, 64, seed=7)
    ref = ops_torch.rotary(qkv.clone(), batch.positions, cos, sin)
    out = rotary(qkv, batch.positions.to(pos_dtype), cos, sin)
    assert out.data_ptr() == qkv.data_ptr()
    assert_close("qkv", out, ref, *FP32[1:])


def test_rotary_rejects_bad_inputs():
    cos, sin = rope(10000.0, 64)
    qkv = randn(4, 3, 2, 64)
    pos = torch.zeros(4, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError):  # not contiguous: an in-place update would be lost
        rotary(qkv.transpose(2, 3).contiguous().transpose(2, 3), pos, cos, sin)
    with pytest.raises(ValueError):  # tables for another head_dim
        rotary(randn(4, 3, 2, 32), pos, cos, sin)
    with pytest.raises(ValueError):
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
    check("geglu", out, ops_torch.geglu, (u,), dtype, atol, rtol)


def test_geglu_non_contiguous_input():
    u = randn(2 * 96, 9, seed=9).T  # [9, 192] with a column-major layout
    assert_close("geglu", geglu(u), ops_torch.geglu(u), *FP32[1:])


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


@pytest.mark.parametrize("lengths, H, dim", POOL_CASES,
                         ids=[f"{'packed' if len(n) > 3 else n}-H{h}-dim{d}" for n, h, d in POOL_CASES])
@pytest.mark.parametrize("mode, normalize", POOL_MODES,
                         ids=[f"{m}-{'norm' if n else 'raw'}" for m, n in POOL_MODES])
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_pool(lengths, H, dim, mode, normalize, dtype, atol, rtol):
    batch = batch_of(lengths)
    hidden = randn(batch.num_tokens, H, seed=len(lengths), dtype=dtype) + 0.25
    out = pool(hidden, batch, mode, dim, normalize)
    assert out.dtype == torch.float32 and out.shape == (len(lengths), dim or H)
    # torch pools low-precision inputs in fp32 too, so its own error is nil and the low-precision
    # bound is the absolute floor alone
    check("pooled", out, ops_torch.pool, (hidden, batch, mode, dim, normalize), dtype, atol, rtol)


def test_pool_zero_vector_stays_finite():
    """An all-zero embedding normalises to zeros (the 1e-12 clamp), never NaN."""
    batch = batch_of([3, 4])
    hidden = randn(7, 128, seed=11)
    hidden[:3] = 0
    out = pool(hidden, batch, "mean", None, True)
    assert torch.isfinite(out).all()
    assert (out[0] == 0).all()
    assert_close("pooled", out, ops_torch.pool(hidden, batch, "mean", None, True), *FP32[1:])


def test_pool_rejects_bad_inputs():
    batch = batch_of([3, 4])
    with pytest.raises(ValueError):
        pool(randn(7, 16), batch, "max")
    with pytest.raises(ValueError):
        pool(randn(7, 16), batch, "mean", dim=17)
    with pytest.raises(ValueError):
        pool(randn(8, 16), batch, "mean")


# ----------------------------------------------------------------------------- the whole model
TRITON_OPS_TORCH_ATTENTION = Ops(
    name="triton+attn:torch", layer_norm=layer_norm, rotary=rotary, attention=ops_torch.attention,
    geglu=geglu, pool=pool,
)
MODEL_LENGTHS = [1, 7, 130, 65]  # mixed lengths, one longer than the local window (129 keys)


def build(folder, ops, dtype):
    cfg = ModernBertConfig.from_file(folder / "config.json")
    model = ModernBert(cfg, ops, device=DEVICE)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    model.load_state_dict(load_state_dict(folder, expected, dtype, DEVICE), strict=True, assign=True)
    return model.eval()


def run(model, ops, ids):
    """Final hidden states [T, H] (fp32) and mean-pooled, normalised embeddings [B, H]."""
    batch = pack(ids, list(range(len(ids))), DEVICE)
    hidden = model(batch)
    return hidden.float(), ops.pool(hidden, batch, "mean", None, True)


MODEL_DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=requires_cuda)]


@pytest.mark.parametrize("dtype", MODEL_DTYPES, ids=["float32", "float16", "bfloat16"])
def test_model_with_triton_ops_matches_torch_ops(small_checkpoint, dtype):
    """Every op but attention from Triton: the same hidden states and embeddings as the torch ops."""
    ids = random_ids(MODEL_LENGTHS, vocab=SMALL_CONFIG["vocab_size"], seed=5)
    ref_h, ref_e = run(build(small_checkpoint, TORCH_OPS, torch.float32), TORCH_OPS, ids)
    tri = TRITON_OPS_TORCH_ATTENTION
    out_h, out_e = run(build(small_checkpoint, tri, dtype), tri, ids)
    if dtype == torch.float32:
        assert_close("hidden", out_h, ref_h, 1e-4, 0.0)
        assert_close("embedding", out_e, ref_e, 1e-5, 0.0)
        return
    low_h, _ = run(build(small_checkpoint, TORCH_OPS, dtype), TORCH_OPS, ids)
    assert_within_torch_error("hidden", out_h.to(dtype), low_h.to(dtype), ref_h, 1e-3)
    cos = torch.nn.functional.cosine_similarity(out_e, ref_e, dim=-1)
    assert cos.min() >= 0.999, f"pooled cosine {cos.min():.6f} at sequence {int(cos.argmin())}"


def test_embedder_triton_backend_with_torch_attention(small_checkpoint):
    """The same through the public path: select_ops(backend="triton", attention="torch")."""
    ids = random_ids([130, 3, 1, 66], vocab=SMALL_CONFIG["vocab_size"], seed=6)
    ref = load_with_ops(small_checkpoint, DEVICE, "float32", backend="torch")
    tri = load_with_ops(small_checkpoint, DEVICE, "float32", backend="triton", attention="torch")
    assert tri.ops.pool is pool and tri.ops.layer_norm is layer_norm
    assert tri.ops.attention is ops_torch.attention
    # one forward each (the hidden states are compared in the test above): Matryoshka pooling,
    # the caller's order restored
    assert_close("embedding", torch.as_tensor(tri.encode_tokens(ids, truncate_dim=64)),
                 torch.as_tensor(ref.encode_tokens(ids, truncate_dim=64)), 1e-5, 0.0)


def test_embedder_with_rotary_inside_attention(small_checkpoint):
    """attention="triton-rope": the kernel rotates q and k as it loads them and the model skips the
    rotary op; the same embeddings and hidden states as the torch ops, in float32."""
    ids = random_ids([130, 3, 1, 66, 200], vocab=SMALL_CONFIG["vocab_size"], seed=7)
    ref = load_with_ops(small_checkpoint, DEVICE, "float32", backend="torch")
    fused = load_with_ops(small_checkpoint, DEVICE, "float32", backend="triton", attention="triton-rope")
    assert fused.ops.fused_rotary and not ref.ops.fused_rotary
    # the rotary op must not run: the attention modules get ops whose rotary records any call
    calls = []
    counting = dataclasses.replace(fused.ops, rotary=lambda *a: calls.append(1))
    for layer in fused.model.layers:
        layer.attn.ops = counting
    h_ref = ref.hidden_states(ids)
    h_out = fused.hidden_states(ids)
    assert calls == []
    for a, b in zip(h_out, h_ref):
        assert_close("hidden", a, b, 1e-4, 0.0)
    assert_close("embedding", torch.as_tensor(fused.encode_tokens(ids)), torch.as_tensor(ref.encode_tokens(ids)),
                 1e-5, 0.0)
