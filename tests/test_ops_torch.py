"""The tuned torch path (`ops_torch`: the CPU's ops, and a GPU's fallback): the attention's three
paths (full, band mask, window blocks) against a dense float64 reference with an explicit
|i - j| <= w mask, the rotaries and GeGLU against the plain `reference`, and the Linear layers'
GEMMs (oneDNN on packed weights, GeGLU inside Wi's GEMM) against `F.linear`."""

import pytest
import torch

from modernbert_embed import ops_torch, reference

from helpers import batch_of, dense_attention


@pytest.mark.parametrize("w", [None, 1, 5, 8, 16])  # odd and tiny windows: blocks of w // 2
def test_attention_paths_match_dense(w):
    # w + 1, 3w and beyond, with every remainder of a block: every path of ops_torch.attention
    lengths = [1, 2, 8, 9, 10, 17, 24, 25, 48, 49, 50, 97, 130]
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(sum(lengths), 3, 2, 16, generator=g) * 2
    got = ops_torch.attention(qkv, batch_of(lengths, "cpu"), w, 0.25)
    want = dense_attention(qkv, lengths, w, 0.25)
    diff = (got.double() - want).abs()
    assert diff.max() <= 1e-5, f"max diff {diff.max():.3g} at token {int(diff.max(1).values.argmax())}"


@pytest.mark.parametrize("w", [None, 1, 5, 16])
def test_cpu_attention_in_bf16_errs_as_sdpa_does(w, monkeypatch):
    # The CPU's bf16 attention through two GEMMs (`_attention_gemms`, up to `gemms_upto` tokens)
    # against a float64 reference: float32 scores and softmax keep its error near SDPA's (the
    # probabilities, rounded to bf16 once normalised, add 20-30% on the mean); scores rounded to
    # bf16 would be 2.3-3.6x SDPA's mean error and fail here. Lengths on every path: full
    # (<= w + 1), band mask (<= 3w), blocks (> 3w, SDPA either way), and past `gemms_upto` (SDPA).
    lengths = [1, 2, 6, 7, 15, 16, 17, 48, 49, 64, 97, 130]
    g = torch.Generator().manual_seed(5)
    qkv = (torch.randn(sum(lengths), 3, 4, 64, generator=g) * 1.5).bfloat16()
    batch = batch_of(lengths, "cpu")
    want = dense_attention(qkv, lengths, w, 0.125)
    monkeypatch.setattr(ops_torch, "CPU_GEMM_ATTENTION_MAX", 100)
    got = ops_torch.cpu_attention(qkv, batch, w, 0.125)
    sdpa = ops_torch.attention(qkv, batch, w, 0.125)
    assert not torch.equal(got, sdpa)  # the GEMM path ran
    err, err_sdpa = (got.double() - want).abs(), (sdpa.double() - want).abs()
    start = 0
    for n in lengths:  # per sequence: the mean error within 1.5x SDPA's
        e, es = err[start:start + n], err_sdpa[start:start + n]
        assert e.mean() <= 1.5 * es.mean() + 1e-5, (n, e.mean(), es.mean())
        start += n
    assert err.max() <= 2 * err_sdpa.max(), (err.max(), err_sdpa.max())


def test_cpu_attention_in_float32_is_attention():
    lengths = [3, 60, 130]
    qkv = torch.randn(sum(lengths), 3, 2, 16, generator=torch.Generator().manual_seed(6))
    batch = batch_of(lengths, "cpu")
    assert torch.equal(ops_torch.cpu_attention(qkv, batch, 16, 0.25), ops_torch.attention(qkv, batch, 16, 0.25))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [16, 64])
def test_rotary_pairs_is_rotary_on_reordered_features(dtype, head_dim):
    """The CPU's rotary (features as (x_j, x_{j + d/2}) pairs, one complex multiplication) gives,
    feature for feature, what the halves' form gives: the same products and sums."""
    from modernbert_embed.rope import rope_tables

    lengths = [1, 7, 130, 64]
    g = torch.Generator().manual_seed(1)
    qkv = (torch.randn(sum(lengths), 3, 3, head_dim, generator=g) * 3).to(dtype)
    positions = batch_of(lengths, "cpu").positions
    cos, sin = rope_tables(10000.0, head_dim, 256)
    half = head_dim // 2
    pairs = torch.stack([torch.arange(half), torch.arange(half) + half], dim=-1).flatten()
    as_pairs = qkv.clone()
    as_pairs[:, :2] = qkv[:, :2][..., pairs]
    got = ops_torch.rotary_pairs(as_pairs, positions, cos, sin)
    want = reference.rotary(qkv, positions, cos, sin)
    assert torch.equal(got[:, 2], qkv[:, 2]), "v must not change"
    back = torch.empty_like(got)
    back[..., pairs] = got
    diff = (back[:, :2].float() - want[:, :2].float()).abs().max().item()
    assert diff <= (1e-6 if dtype == torch.float32 else 0.0), diff


# ----------------------------------------------------------------------------- the CPU's Linear GEMMs
needs_onednn = pytest.mark.skipif(not ops_torch.onednn_supports(torch.float32),
                                  reason="this torch or CPU has no oneDNN linear: the CPU runs BLAS (tested below)")


def _linear_case(dtype, rows, seed=0, out_features=96, in_features=80):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_features, generator=g).to(dtype)
    w = (torch.randn(out_features, in_features, generator=g) * in_features ** -0.5).to(dtype)
    return x, w


def _relative(got, want):
    return float((got.float() - want.float()).abs().max() / want.float().abs().max())


@needs_onednn
@pytest.mark.parametrize("rows", [1, 7, 300])
def test_onednn_linear_on_packed_weights_is_f_linear(rows):
    x, w = _linear_case(torch.float32, rows)
    packed = ops_torch.cpu_pack(w)
    assert packed.is_mkldnn
    got = ops_torch.cpu_linear(x, packed)
    assert got.shape == (rows, 96) and got.dtype == torch.float32
    assert _relative(got, torch.nn.functional.linear(x, w)) < 1e-5
    # any input row layout: a strided view of a wider tensor
    wide = torch.randn(rows, 160)
    assert _relative(ops_torch.cpu_linear(wide[:, ::2], packed), torch.nn.functional.linear(wide[:, ::2], w)) < 1e-5


@needs_onednn
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_geglu_inside_wi_gemm_is_the_geglu_of_the_product(dtype, tol):
    """The two fused GEMMs give `gelu_erf(x W_in^T) * (x W_gate^T)`: the exact GELU (a tanh GELU
    would be off by about 1e-4 of the largest output here) on the halves in the checkpoint's order."""
    x, w = _linear_case(dtype, 37, seed=3, out_features=2 * 48)
    packed = ops_torch.cpu_pack(w, geglu=True)
    assert isinstance(packed, tuple) and all(p.is_mkldnn for p in packed)
    got = ops_torch.cpu_geglu_linear(x, packed)
    u = torch.nn.functional.linear(x.float(), w.float())
    want = reference.geglu(u)
    assert got.shape == (37, 48) and got.dtype == dtype
    assert _relative(got, want) < tol
    if dtype == torch.float32:  # the test tells the two GELUs apart
        tanh = torch.nn.functional.gelu(u[:, :48], approximate="tanh") * u[:, 48:]
        assert _relative(tanh, want) > 10 * tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_linear_runs_every_dtype_with_or_without_onednn(monkeypatch, dtype):
    """Where oneDNN cannot take a dtype (float16 on most CPUs, or a build without it), the weights
    are kept column-major and BLAS runs them: the same products either way."""
    x, w = _linear_case(dtype, 33, seed=5, out_features=2 * 40)
    want_linear = torch.nn.functional.linear(x.float(), w.float())
    want_geglu = reference.geglu(want_linear)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for onednn in (True, False):
        if not onednn:
            monkeypatch.setattr(ops_torch, "onednn_supports", lambda dtype: False)
        packed, packed_wi = ops_torch.cpu_pack(w), ops_torch.cpu_pack(w, geglu=True)
        if not onednn:
            assert packed.layout == torch.strided and packed.stride() == (1, w.shape[0])  # column-major
            assert torch.equal(packed, w)
        assert _relative(ops_torch.cpu_linear(x, packed), want_linear) < tol
        assert _relative(ops_torch.cpu_geglu_linear(x, packed_wi), want_geglu) < tol


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_cpu_model_on_packed_weights_matches_the_model_on_blas(small_checkpoint, dtype):
    """The CPU's default GEMMs (oneDNN, GeGLU inside Wi's) against BLAS on the checkpoint's weights:
    the same embeddings up to the order of the sums."""
    from dataclasses import replace

    from conftest import random_ids
    from modernbert_embed import Checkpoint, Embedder, ops
    from modernbert_embed.model import Linear

    blas_ops = replace(ops.CPU_OPS, pack_linear=ops_torch.column_major, linear=ops_torch.linear, geglu_linear=None)
    default = Embedder.from_pretrained(small_checkpoint, device="cpu", dtype=dtype)
    blas = Embedder.from_checkpoint(Checkpoint(small_checkpoint), device="cpu", dtype=dtype, ops=blas_ops)
    linears = [m for m in default.model.modules() if isinstance(m, Linear)]
    if ops_torch.onednn_supports(default.dtype):  # only the packed copies stay in memory
        assert all(m.weight.is_meta for m in linears)
        assert all(p.is_mkldnn for m in linears for p in (m.packed if m.geglu else (m.packed,)))
    ids = random_ids([1, 5, 64, 65, 130, 300], seed=4)
    a = default.encode_tokens(ids, convert_to_tensor=True)
    b = blas.encode_tokens(ids, convert_to_tensor=True)
    if dtype == "float32":
        assert (a - b).abs().max() < 1e-5
    else:
        assert (a * b).sum(1).min() > 0.999


# ----------------------------------------------------------------------------- against the reference
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_tuned_rotary_and_geglu_give_the_references_values(dtype):
    """The in-place rotary and the one-buffer GeGLU compute the reference's products and sums, in
    the same order: the same values, bit for bit."""
    from modernbert_embed.rope import rope_tables

    lengths = [1, 7, 130]
    g = torch.Generator().manual_seed(2)
    qkv = (torch.randn(sum(lengths), 3, 2, 64, generator=g) * 3).to(dtype)
    positions = batch_of(lengths, "cpu").positions
    cos, sin = rope_tables(10000.0, 64, 256)
    want = reference.rotary(qkv, positions, cos, sin)
    got = ops_torch.rotary(qkv.clone(), positions, cos, sin)
    assert torch.equal(got, want), (got.float() - want.float()).abs().max()
    u = (torch.randn(37, 2 * 48, generator=g) * 3).to(dtype)
    assert torch.equal(ops_torch.geglu(u), reference.geglu(u))


@pytest.mark.parametrize("w", [None, 1, 5, 16])
def test_tuned_attention_is_the_references(w):
    lengths = [1, 9, 17, 48, 49, 130]
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(sum(lengths), 3, 2, 16, generator=g) * 2
    batch = batch_of(lengths, "cpu")
    diff = (ops_torch.attention(qkv, batch, w, 0.25) - reference.attention(qkv, batch, w, 0.25)).abs()
    assert diff.max() <= 1e-5, f"max diff {diff.max():.3g} at token {int(diff.max(1).values.argmax())}"
