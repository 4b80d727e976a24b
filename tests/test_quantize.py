"""Quantised embeddings: int8/uint8 calibration semantics, binary packing, and the encode option."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import SMALL_CONFIG, TEST_DEVICE, random_ids
from modernbert_embed import quantize as Q


def st_reference(emb, precision, ranges=None):
    """sentence-transformers' quantize_embeddings (its release 5.7 on), written out."""
    if precision in ("int8", "uint8"):
        if ranges is None:
            ranges = np.vstack((np.min(emb, axis=0), np.max(emb, axis=0)))
        ranges = ranges.astype(np.float32, copy=False)
        starts = ranges[0, :]
        steps = (ranges[1, :] - starts) / 255
        steps = np.where(steps == 0, 1, steps)
        q = np.clip(np.floor((emb - starts) / steps), 0, 255)
        return q.astype(np.uint8) if precision == "uint8" else (q - 128).astype(np.int8)
    packed = np.packbits(emb > 0, axis=-1)
    if precision == "binary":
        return (packed - 128).astype(np.int8)
    return packed


def st_before_5_7_int8(emb, ranges):
    """int8 as sentence-transformers made it before 5.7: shift, then truncate toward zero."""
    steps = (ranges[1] - ranges[0]) / 255
    return ((emb - ranges[0]) / np.where(steps == 0, 1, steps) - 128).astype(np.int8)


@pytest.fixture
def emb():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 768)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# Ranges by column: symmetric, narrow, constant at 0, constant at 0.3, lopsided, all positive.
HARD_RANGES = np.array([[-1.0, -0.5, 0.0, 0.3, -0.2, 2.0], [1.0, 0.5, 0.0, 0.3, 0.7, 3.0]], np.float32)


def hard_values(ranges=HARD_RANGES, seed=0) -> np.ndarray:
    """Rows of values per column of `ranges`: every bucket edge and its float32 neighbours, the
    range ends and just past them, far outside on both sides, and random values over the range
    and half a span beyond it (negative and positive)."""
    lo, hi = ranges
    span = np.where(hi > lo, hi - lo, np.float32(1))
    edges = lo + np.arange(256, dtype=np.float32)[:, None] * ((hi - lo) / np.float32(255))
    rows = [edges, np.nextafter(edges, np.float32(-np.inf)), np.nextafter(edges, np.float32(np.inf)),
            np.stack([lo, hi, np.nextafter(lo, np.float32(-np.inf)), np.nextafter(hi, np.float32(np.inf)),
                      lo - 100 * span, hi + 100 * span, lo - 0.3 * span, hi + 0.3 * span, lo + 1.5, lo + 300])]
    rng = np.random.default_rng(seed)
    rows.append(rng.uniform(lo - span / 2, hi + span / 2, size=(2000, ranges.shape[1])))
    return np.concatenate(rows).astype(np.float32)


def test_matches_sentence_transformers_formula_on_hard_values():
    x = hard_values()
    for precision in ("int8", "uint8"):
        got = Q.quantize_embeddings(x, precision, ranges=HARD_RANGES)
        np.testing.assert_array_equal(got, st_reference(x, precision, HARD_RANGES))
    # the cases where the conventions part are all in there: the lower half (truncation rounds
    # toward zero, floor down), both range ends and beyond, and the constant columns
    old = st_before_5_7_int8(x, HARD_RANGES)
    got = Q.quantize_embeddings(x, "int8", ranges=HARD_RANGES)
    inside = (x >= HARD_RANGES[0]) & (x <= HARD_RANGES[1]) & (HARD_RANGES[1] > HARD_RANGES[0])
    assert ((old.astype(int) - got == 1) & inside & (got < 0)).any()
    assert (old == got)[inside & (got >= 0)].all()
    lo, hi = HARD_RANGES
    varying, margin = hi > lo, (hi - lo) / 100  # past the ends by more than float32 rounding: clipped
    assert (got[(x < lo) & varying] == -128).all() and (got[(x > hi + margin) & varying] == 127).all()
    assert (old[(x > hi + margin) & varying] != 127).any()  # where truncation wrapped around
    assert (old != got)[:, ~varying].any()  # the constant columns: steps of 1, codes past 255 wrapped there


def check_against(got, ref):
    assert got.dtype == ref.dtype
    assert got.shape == ref.shape
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("precision", ["int8", "uint8", "binary", "ubinary"])
def test_matches_sentence_transformers_formula(emb, precision):
    got = Q.quantize_embeddings(emb, precision)
    check_against(got, st_reference(emb, precision))
    if precision == "int8":
        np.testing.assert_array_equal(got, (st_reference(emb, "uint8").astype(int) - 128).astype(np.int8))


@pytest.mark.parametrize("precision", ["int8", "uint8", "binary", "ubinary"])
def test_matches_sentence_transformers_itself(emb, precision):
    """The codes of sentence-transformers' own function, on the same ranges: hard values (bucket
    edges, range ends, outside them, constant columns), and embeddings calibrated on themselves."""
    st = pytest.importorskip("sentence_transformers", minversion="5.7",
                             reason="sentence-transformers 5.7 or newer is not installed (the bench extra)")
    x = hard_values()
    ranges = HARD_RANGES if precision in Q.SCALAR_PRECISIONS else None
    check_against(Q.quantize_embeddings(x, precision, ranges=ranges),
                  st.quantize_embeddings(x, precision, ranges=ranges))
    check_against(Q.quantize_embeddings(emb, precision), st.quantize_embeddings(emb, precision))
    if precision in Q.SCALAR_PRECISIONS:
        cal = emb[:20]  # a small sample: later rows fall outside its ranges
        check_against(Q.quantize_embeddings(emb, precision, calibration_embeddings=cal),
                      st.quantize_embeddings(emb, precision, calibration_embeddings=cal))


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


def test_constant_dimension_by_convention():
    # a dimension calibrated as constant at 0.25 takes steps of 1 (sentence-transformers); the
    # legacy convention split it at the value: 0 at and below, 255 above
    r = np.array([[0.0, 0.25], [1.0, 0.25]], np.float32)
    x = np.array([[0.5, v] for v in (0.25, 0.5, 1.75, 300.0, -1.0)], np.float32)
    new = Q.quantize_embeddings(x, "uint8", ranges=r)
    old = Q.quantize_embeddings(x, "uint8", ranges=r, convention=Q.LEGACY_CONVENTION)
    assert new[:, 1].tolist() == [0, 0, 1, 255, 0]
    assert old[:, 1].tolist() == [0, 255, 255, 255, 0]
    assert (new[:, 0] == old[:, 0]).all() and new[0, 0] == 127  # other dimensions alike
    np.testing.assert_array_equal(Q.quantize_embeddings(x, "int8", ranges=r, convention=Q.LEGACY_CONVENTION),
                                  (old.astype(int) - 128).astype(np.int8))
    # back to floats: each convention reads its own codes
    assert Q.dequantize(new, "uint8", r)[:, 1].tolist() == [0.25, 0.25, 1.25, 255.25, 0.25]
    assert Q.dequantize(old, "uint8", r, convention=Q.LEGACY_CONVENTION)[:, 1].tolist() == [0.25] * 5
    with pytest.raises(ValueError, match="convention 'floor' is not known"):
        Q.quantize_embeddings(x, "int8", ranges=r, convention="floor")
    with pytest.raises(ValueError, match="convention 'floor' is not known"):
        Q.dequantize(new, "uint8", r, convention="floor")


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
