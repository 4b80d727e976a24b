"""Quantised embeddings: int8 / uint8 scalar quantisation and binary / ubinary packed bits.

The semantics follow sentence-transformers' `quantize_embeddings`, so stored vectors can be
compared with ones quantised there:

- int8 / uint8: every dimension's [min, max], taken from calibration embeddings, is cut into 256
  buckets: `start = min`, `step = (max - min) / 255` (1 where max == min),
  `q = floor((x - start) / step)`, clipped to 0..255 (uint8), then shifted by -128 to -128..127
  (int8), so int8 == uint8 - 128 exactly. Values outside the calibrated range land in the end
  buckets. These are the codes of sentence-transformers' `quantize_embeddings` from its release
  5.7 on, bit for bit on the same ranges: the arithmetic is float32 in the same order, so bucket
  edges fall where they fall there (`CONVENTION`). Its releases before 5.7 made other int8 codes
  (they shifted by -128 before truncating toward zero, which put the codes of the lower half one
  higher, and let values outside the range wrap around): int8 vectors from those and from here do
  not mix in one index (their uint8 codes of values inside float32 ranges agree with these).
  Corpus folders record the convention their codes were made with; one without the record was
  written before it was recorded (`LEGACY_CONVENTION`): the same codes, except in a dimension
  with max == min, which took bucket 0 at and below the value and 255 above it.
- binary / ubinary: one bit per dimension, `x > 0`, packed big-endian 8 to a byte per row
  (`np.packbits(x > 0, axis=-1)`: 768 dims -> 96 bytes; a width that is not a multiple of 8 is
  padded with zero bits). ubinary stores the bytes as uint8; binary as int8 (`byte - 128`).

The ranges are a float32 array [2, d]: row 0 the minima, row 1 the maxima (the `ranges` argument
of sentence-transformers). Computing them once from a calibration sample and reusing them for
every later batch keeps codes comparable across calls, shards and machines.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

FLOAT_PRECISIONS = ("float32", "float16")
SCALAR_PRECISIONS = ("int8", "uint8")
BINARY_PRECISIONS = ("binary", "ubinary")
QUANTIZED_PRECISIONS = SCALAR_PRECISIONS + BINARY_PRECISIONS
PRECISIONS = FLOAT_PRECISIONS + QUANTIZED_PRECISIONS

# How int8/uint8 codes are made from the ranges (see above), as a corpus folder's manifest records it.
CONVENTION = "sentence-transformers-5.7"
LEGACY_CONVENTION = "split-constant"  # written before the convention was recorded
CONVENTIONS = (CONVENTION, LEGACY_CONVENTION)

_DTYPES = {
    "float32": np.float32, "float16": np.float16, "int8": np.int8, "uint8": np.uint8,
    "binary": np.int8, "ubinary": np.uint8,
}


def check_precision(precision) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not supported; choose one of {PRECISIONS}")
    return precision


def output_dtype(precision: str) -> np.dtype:
    """The numpy dtype stored for `precision`."""
    return np.dtype(_DTYPES[check_precision(precision)])


def output_width(precision: str, dim: int) -> int:
    """Values per row stored for `dim`-wide embeddings: dim, or ceil(dim / 8) packed bytes."""
    return -(-dim // 8) if check_precision(precision) in BINARY_PRECISIONS else dim


def check_convention(convention) -> str:
    if convention not in CONVENTIONS:
        raise ValueError(f"int8/uint8 convention {convention!r} is not known; choose one of {CONVENTIONS}")
    return convention


def calibration_ranges(embeddings) -> np.ndarray:
    """Per-dimension [min, max] of float embeddings [n, d] -> float32 [2, d]."""
    emb = _as_float_matrix(embeddings, "calibration embeddings")
    if emb.shape[0] == 0:
        raise ValueError("calibration needs at least one embedding, got none")
    if not np.isfinite(emb).all():
        raise ValueError("calibration embeddings contain NaN or infinite values")
    return np.stack([emb.min(axis=0), emb.max(axis=0)]).astype(np.float32)


def check_ranges(ranges, dim: int | None = None) -> np.ndarray:
    r = np.asarray(ranges, dtype=np.float32)
    if r.ndim != 2 or r.shape[0] != 2:
        raise ValueError(f"ranges must have shape [2, dim] (minima, maxima), got {list(r.shape)}")
    if dim is not None and r.shape[1] != dim:
        raise ValueError(f"ranges cover {r.shape[1]} dimensions but the embeddings have {dim}")
    if not np.isfinite(r).all():
        raise ValueError("ranges contain NaN or infinite values")
    if (r[1] < r[0]).any():
        bad = int(np.flatnonzero(r[1] < r[0])[0])
        raise ValueError(f"ranges: maximum below minimum in dimension {bad}")
    return r


def quantize_embeddings(embeddings, precision: str, ranges=None, calibration_embeddings=None,
                        convention: str = CONVENTION) -> np.ndarray:
    """Quantise float embeddings [n, d] (or one [d]) to `precision`.

    For int8/uint8 the ranges come from `ranges` ([2, d]), else from `calibration_embeddings`,
    else from `embeddings` themselves (fine for one large batch; pass ranges to keep several
    batches on one scale). `convention`: how codes are made from the ranges (`CONVENTION`, or
    `LEGACY_CONVENTION` to add to a folder written before it was recorded). float32/float16 just
    convert.
    """
    check_precision(precision)
    check_convention(convention)
    if ranges is not None and calibration_embeddings is not None:
        raise ValueError("give either ranges or calibration_embeddings, not both")
    emb = _as_float_matrix(embeddings, "embeddings")
    one = emb.ndim == 1
    if one:
        emb = emb[None, :]
    if precision in FLOAT_PRECISIONS:
        out = emb.astype(_DTYPES[precision])
    elif precision in SCALAR_PRECISIONS:
        if ranges is None:
            if calibration_embeddings is None:
                if emb.shape[0] == 0:
                    return np.empty((0, emb.shape[1]), dtype=_DTYPES[precision])
                calibration_embeddings = emb
            ranges = calibration_ranges(calibration_embeddings)
        codes = _buckets(emb, check_ranges(ranges, emb.shape[1]), convention)
        out = (codes - 128).astype(np.int8) if precision == "int8" else codes.astype(np.uint8)
    else:
        packed = np.packbits(emb > 0, axis=-1)
        if precision == "binary":
            out = (packed.astype(np.int16) - 128).astype(np.int8)
        else:
            out = packed
    return out[0] if one else out


def _steps(r: np.ndarray) -> np.ndarray:
    """Bucket widths of float32 ranges [2, d], float32 as sentence-transformers computes them (0 for a
    dimension with max == min)."""
    return (r[1] - r[0]) / np.float32(255)


def _buckets(emb: np.ndarray, r: np.ndarray, convention: str) -> np.ndarray:
    """Bucket numbers 0..255 (float32) of float32 embeddings on ranges `r`."""
    starts, steps = r[0], _steps(r)
    constant = steps == 0
    codes = np.floor((emb - starts) / np.where(constant, np.float32(1), steps))
    if convention == LEGACY_CONVENTION:
        codes = np.where(constant, np.where(emb > starts, np.float32(255), np.float32(0)), codes)
    return np.clip(codes, 0, 255)


def unpack_bits(packed, dim: int | None = None) -> np.ndarray:
    """binary (int8) or ubinary (uint8) codes [n, ceil(d/8)] -> bool [n, d] (x > 0 per dimension)."""
    arr = np.asarray(packed)
    if arr.dtype == np.int8:
        arr = (arr.astype(np.int16) + 128).astype(np.uint8)
    bits = np.unpackbits(arr.astype(np.uint8), axis=-1).astype(bool)
    return bits if dim is None else bits[..., :dim]


def dequantize(codes, precision: str, ranges, convention: str = CONVENTION) -> np.ndarray:
    """Approximate floats back from int8/uint8 codes made under `convention`: the centre of each
    bucket. A dimension with max == min gives its value back (plus the code, in steps of 1, under
    `CONVENTION`, where the codes above 0 count whole units past it)."""
    if precision not in SCALAR_PRECISIONS:
        raise ValueError(f"dequantize works for int8/uint8 codes, not {precision!r}")
    check_convention(convention)
    c = np.asarray(codes).astype(np.float64)
    r = check_ranges(ranges, c.shape[-1])
    if precision == "int8":
        c = c + 128
    constant = _steps(r) == 0
    r = r.astype(np.float64)
    values = r[0] + (c + 0.5) * (r[1] - r[0]) / 255.0
    if convention == CONVENTION:
        values = np.where(constant, r[0] + c, values)
    return values.astype(np.float32)


# ------------------------------------------------------------------------------- calibration files
def save_calibration(path: str | Path, ranges, **info) -> Path:
    """Write ranges [2, d] to a JSON file (with any extra `info`, e.g. model and sample size)."""
    r = check_ranges(ranges)
    data = {"kind": "modernbert-embed calibration", "dim": int(r.shape[1]),
            "min": r[0].tolist(), "max": r[1].tolist(), **info}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data), encoding="utf-8")
    tmp.replace(path)
    return path


def load_calibration(path: str | Path) -> tuple[np.ndarray, dict]:
    """Ranges [2, d] from a calibration JSON file, a corpus manifest.json that holds one, or a
    .npy file: either ranges [2, d] saved as such (`*.ranges.npy`) or float embeddings [n, d]
    from which the ranges are computed. Returns (ranges, info)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration file not found: {path}")
    if path.suffix == ".npy":
        arr = np.load(path, allow_pickle=False)
        if path.name.endswith(".ranges.npy"):
            return check_ranges(arr), {"source": str(path)}
        return calibration_ranges(arr), {"source": str(path), "rows": int(np.asarray(arr).shape[0])}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a calibration JSON file ({e})") from None
    if isinstance(data, dict) and isinstance(data.get("calibration"), dict):  # a manifest
        data = data["calibration"]
    if not isinstance(data, dict) or "min" not in data or "max" not in data:
        raise ValueError(f"{path}: no calibration ranges ('min' and 'max') in this file")
    info = {k: v for k, v in data.items() if k not in ("min", "max")}
    return check_ranges([data["min"], data["max"]]), info


def _as_float_matrix(x, what: str) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().float().cpu().numpy()
    arr = np.asarray(x)
    if arr.ndim not in (1, 2):
        raise ValueError(f"{what} must be [n, d] (or one [d]), got shape {list(arr.shape)}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"{what} must be floating point, got {arr.dtype}")
    return arr.astype(np.float32, copy=False)
