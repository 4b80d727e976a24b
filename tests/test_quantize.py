"""Quantised embeddings: int8/uint8 calibration semantics, binary packing, and the encode option."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import SMALL_CONFIG, TEST_DEVICE, random_ids
from modernbert_embed import quantize as Q


def st_reference(emb, precision, ranges=None):
    """sentence-transformers' quantize_embeddings, written out (valid for in-range values)."""
    if precision in ("int8", "uint8"):
        if ranges is None:
            ranges = np.vstack((np.min(emb, axis=0), np.max(emb, axis=0)))
        starts = ranges[0, :]
        steps = (ranges[1, :] - ranges[0, :]) / 255
        if precision == "uint8":
            return ((emb - starts) / steps).astype(np.uint8)
        return ((emb - starts) / steps - 128).astype(np.int8)
    packed = np.packbits(emb > 0).reshape(emb.shape[0], -1)
    if precision == "binary":
        return (packed - 128).astype(np.int8)
    return packed


@pytest.fixture
def emb():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 768)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def check_against(got, ref, precision):
    assert got.dtype == ref.dtype
    assert got.shape == ref.shape
    if precision != "int8":
        np.testing.assert_array_equal(got, ref)
        return
    # int8 here is exactly uint8 - 128 (floor, then shift). sentence-transformers shifts first and
    # then truncates toward zero, which rounds the lower half up: its codes there are one higher.
    d = ref.astype(int) - got.astype(int)
    assert set(np.unique(d)) <= {0, 1}
    assert (d[got >= 0] == 0).all()


@pytest.mark.parametrize("precision", ["int8", "uint8", "binary", "ubinary"])
def test_matches_sentence_transformers_formula(emb, precision):
    got = Q.quantize_embeddings(emb, precision)
    check_against(got, st_reference(emb, precision), precision)
    if precision == "int8":
        np.testing.assert_array_equal(got, (st_reference(emb, "uint8").astype(int) - 128).astype(np.int8))


@pytest.mark.slow  # importing sentence-transformers takes seconds; the formula above is checked fast
@pytest.mark.parametrize("precision", ["int8", "uint8", "binary", "ubinary"])
def test_matches_sentence_transformers_itself(emb, precision):
    st = pytest.importorskip("sentence_transformers.quantization",
                             reason="sentence-transformers is not installed (the bench extra)")
    check_against(Q.quantize_embeddings(emb, precision), st.quantize_embeddings(emb, precision), precision)


def test_int8_buckets_by_hand():
    ranges = np.array([[-255.0, 0.0], [255.0, 255.0]], dtype=np.float32)  # steps 2 and 1: exact
    x = np.array([[-255.0, 0.0], [255.0, 255.0], [0.0, 10.5], [-300.0, 300.0], [7.0, -3.0],
                  [-2.5, 127.9]], dtype=np.float32)
    u = Q.quantize_embeddings(x, "uint8", ranges=ranges)
    # (0 + 255) / 2 = 127.5 -> 127; (7 + 255) / 2 = 131; (-2.5 + 255) / 2 = 126.25 -> 126;
    # out-of-range values clip to the end buckets
    assert u.tolist() == [[0, 0], [255, 255], [127, 10], [0, 255], [131, 0], [126, 127]]
    i = Q.quantize_embeddings(x, "int8", ranges=ranges)
    assert i.tolist() == [[-128, -128], [127, 127], [-1, -118], [-128, 127], [3, -128], [-2, -1]]
    # float32 arithmetic as in sentence-transformers: with step 2/255 the maximum lands in 254
    edge = Q.quantize_embeddings(np.array([[1.0]], np.float32), "uint8", ranges=[[-1.0], [1.0]])
    assert edge.tolist() == [[254]]


def test_out_of_range_clips_instead_of_wrapping(emb):
    ranges = Q.calibration_ranges(emb[:20])  # a small sample: later rows fall outside
    codes = Q.quantize_embeddings(emb, "int8", ranges=ranges)
    below = emb < ranges[0]
    above = emb > ranges[1]
    assert below.any() and above.any()
    assert (codes[below] == -128).all() and (codes[above] == 127).all()


def test_binary_packing_by_hand():
    signs = np.array([1, -1, 1, 1, -1, -1, -1, 1, 0.0, 2, -2, 3, 0.5, -0.5, 0.1, -0.1], dtype=np.float32)
    ub = Q.quantize_embeddings(signs[None, :], "ubinary")
    # 1 0 1 1 0 0 0 1 -> 0b10110001 = 177; 0 1 0 1 1 0 1 0 -> 0b01011010 = 90 (0 is not > 0)
    assert ub.dtype == np.uint8 and ub.tolist() == [[177, 90]]
    b = Q.quantize_embeddings(signs[None, :], "binary")
    assert b.dtype == np.int8 and b.tolist() == [[177 - 128, 90 - 128]]
    np.testing.assert_array_equal(Q.unpack_bits(b, 16)[0], signs > 0)
    np.testing.assert_array_equal(Q.unpack_bits(ub, 16)[0], signs > 0)


def test_binary_768_dims_is_96_bytes_and_width_not_multiple_of_8(emb):
    ub = Q.quantize_embeddings(emb, "ubinary")
    assert ub.shape == (200, 96) and Q.output_width("ubinary", 768) == 96
    np.testing.assert_array_equal(ub, np.packbits(emb > 0, axis=1))
    np.testing.assert_array_equal(Q.unpack_bits(ub, 768), emb > 0)
    odd = Q.quantize_embeddings(emb[:, :100], "binary")  # 100 dims -> 13 bytes, padded per row
    assert odd.shape == (200, 13) and Q.output_width("binary", 100) == 13
    np.testing.assert_array_equal(Q.unpack_bits(odd, 100), emb[:, :100] > 0)
    assert not Q.unpack_bits(odd)[:, 100:].any()


def test_ranges_from_calibration_or_self(emb):
    cal = emb[:50]
    a = Q.quantize_embeddings(emb[50:], "int8", calibration_embeddings=cal)
    b = Q.quantize_embeddings(emb[50:], "int8", ranges=Q.calibration_ranges(cal))
    np.testing.assert_array_equal(a, b)
    c = Q.quantize_embeddings(emb[50:], "int8")  # self-calibrated: a different scale
    assert not np.array_equal(a, c)
    with pytest.raises(ValueError, match="either ranges or calibration_embeddings"):
        Q.quantize_embeddings(emb, "int8", ranges=Q.calibration_ranges(cal), calibration_embeddings=cal)


def test_constant_dimension_and_dequantize(emb):
    x = emb.copy()
    x[:, 3] = 0.25
    r = Q.calibration_ranges(x)
    codes = Q.quantize_embeddings(x, "uint8", ranges=r)
    assert (codes[:, 3] == 0).all()
    approx = Q.dequantize(codes, "uint8", r)
    step = (r[1] - r[0]) / 255
    err = np.abs(approx - x)
    assert (err[:, np.arange(768) != 3] <= step[np.arange(768) != 3] * 0.5 + 1e-6).all()
    np.testing.assert_allclose(Q.dequantize(Q.quantize_embeddings(x, "int8", ranges=r), "int8", r), approx)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="precision 'int4'"):
        Q.quantize_embeddings(np.zeros((2, 4), np.float32), "int4")
    with pytest.raises(ValueError, match=r"shape \[2, dim\]"):
        Q.quantize_embeddings(np.zeros((2, 4), np.float32), "int8", ranges=np.zeros((3, 4)))
    with pytest.raises(ValueError, match="cover 5 dimensions but the embeddings have 4"):
        Q.quantize_embeddings(np.zeros((2, 4), np.float32), "int8", ranges=np.zeros((2, 5)))
    with pytest.raises(ValueError, match="maximum below minimum in dimension 1"):
        Q.check_ranges([[0, 1], [1, 0]])
    with pytest.raises(TypeError, match="floating point"):
        Q.quantize_embeddings(np.zeros((2, 4), np.int64), "int8")


def test_calibration_files(tmp_path, emb):
    r = Q.calibration_ranges(emb)
    path = Q.save_calibration(tmp_path / "cal.json", r, rows=200)
    got, info = Q.load_calibration(path)
    np.testing.assert_array_equal(got, r)
    assert info["rows"] == 200
    # a manifest holding a calibration
    (tmp_path / "manifest.json").write_text(json.dumps({"calibration": {"min": r[0].tolist(), "max": r[1].tolist()}}))
    np.testing.assert_array_equal(Q.load_calibration(tmp_path / "manifest.json")[0], r)
    # float embeddings in a .npy, and ranges saved as such
    np.save(tmp_path / "emb.npy", emb)
    np.testing.assert_array_equal(Q.load_calibration(tmp_path / "emb.npy")[0], r)
    np.save(tmp_path / "x.ranges.npy", r)
    np.testing.assert_array_equal(Q.load_calibration(tmp_path / "x.ranges.npy")[0], r)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="no calibration ranges"):
        Q.load_calibration(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="calibration file not found: .*missing.json"):
        Q.load_calibration(tmp_path / "missing.json")


# ------------------------------------------------------------------------------- Embedder.encode
@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from modernbert_embed import Embedder
    from modernbert_embed.weights import write_random_checkpoint

    folder = write_random_checkpoint(tmp_path_factory.mktemp("q"), SMALL_CONFIG, seed=3)
    return Embedder.from_pretrained(folder, device=TEST_DEVICE, dtype="float32")


@pytest.fixture(scope="module")
def ids():
    return random_ids([5, 17, 40, 3, 64, 9, 30, 12, 2, 50, 21, 8], seed=1)


@pytest.mark.parametrize("precision", ["float16", "int8", "uint8", "binary", "ubinary"])
def test_encode_precision_equals_quantizing_float32(model, ids, precision):
    ref = model.encode_tokens(ids)
    got = model.encode_tokens(ids, precision=precision)
    np.testing.assert_array_equal(got, Q.quantize_embeddings(ref, precision))
    assert got.dtype == Q.output_dtype(precision)
    t = model.encode_tokens(ids, precision=precision, convert_to_tensor=True)
    np.testing.assert_array_equal(t.cpu().numpy(), got)


def test_encode_int8_with_ranges_or_calibration(model, ids):
    ref = model.encode_tokens(ids)
    cal = model.encode_tokens(random_ids([20, 30, 40, 50, 60] * 4, seed=9))
    r = Q.calibration_ranges(cal)
    a = model.encode_tokens(ids, precision="int8", ranges=r)
    b = model.encode_tokens(ids, precision="int8", calibration_embeddings=cal)
    np.testing.assert_array_equal(a, Q.quantize_embeddings(ref, "int8", ranges=r))
    np.testing.assert_array_equal(a, b)
    # calibrated on itself, the first half gets a different scale than the whole
    half = model.encode_tokens(ids[:6], precision="uint8")
    assert not np.array_equal(half, model.encode_tokens(ids, precision="uint8")[:6])
    with pytest.raises(ValueError, match="applies to precision int8 and uint8"):
        model.encode_tokens(ids, precision="binary", ranges=r)
    with pytest.raises(ValueError, match="precision 'int4'"):
        model.encode_tokens(ids, precision="int4")


def test_encode_truncate_dim_then_binary(model, ids):
    ref = model.encode_tokens(ids, truncate_dim=20)
    got = model.encode_tokens(ids, truncate_dim=20, precision="ubinary")
    assert got.shape == (len(ids), 3)
    np.testing.assert_array_equal(Q.unpack_bits(got, 20), ref > 0)
