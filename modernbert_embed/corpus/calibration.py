"""int8/uint8 in a corpus folder: one set of per-dimension ranges, used by every shard.

Ranges quantised separately per shard would put the same value in different buckets from one
shard to the next. So the folder is calibrated once, before its first shard: from `--calibration`
(ranges of an earlier run, or float embeddings), or else from a sample of documents spread evenly
over the corpus. The ranges go into the manifest and calibration.json, with the convention the
codes are made with; a resume reuses both (a folder without a recorded convention keeps the one it
was written with), and a `--calibration` that differs from the ranges is refused.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import quantize as Q
from .errors import CorpusError, RefusedError
from .manifest import CALIBRATION, MANIFEST, Manifest
from .pipeline import Prepared, Shards
from .sources import Rows, Source


def known_ranges(calibration: str | None, recorded: dict | None, dim: int, out: Path) -> np.ndarray | None:
    """The ranges known before anything is embedded: the folder's own (`recorded`, from its
    manifest), or those of the `calibration` file, which must equal the folder's. None: take them
    from a sample. Checks only; writes nothing."""
    given = None
    if calibration:
        try:
            given, _ = Q.load_calibration(calibration)
        except (OSError, ValueError) as e:
            raise RefusedError(f"--calibration: {e}") from None
        if given.shape[1] != dim:
            raise RefusedError(f"--calibration {calibration}: ranges for {given.shape[1]} dimensions, "
                               f"but this job writes {dim}")
    if recorded is None:
        return given
    ranges = Q.check_ranges([recorded["min"], recorded["max"]])
    if given is not None and not np.array_equal(given, ranges):
        raise RefusedError(f"--calibration {calibration} differs from the ranges that {out} was quantised "
                           f"with (in its {MANIFEST})")
    return ranges


def sample_ranges(shards: Shards, sources: list[Source], total: int, size: int, log=None):
    """(ranges, source record) from `size` documents spread evenly over the corpus. A row that
    cannot be read is left out of the sample (it is reported, or skipped, where its shard is
    embedded), as is a document whose embedding is not finite under on_error "skip"."""
    n = min(size, total)
    want = sorted({(i * total) // n for i in range(n)})
    prep = Prepared(-1, 0, total)
    texts: list[str] = []
    rows = Rows(sources)
    for row in want:  # stops reading after the last row of the sample
        _, src, local, raw = rows.take(row)
        try:
            text, _ = src.parse(local, raw)
        except CorpusError:
            continue
        prep.rows.append(row)
        prep.where.append(src.where(local))
        texts.append(text)
    if not texts:
        raise CorpusError("no readable rows to calibrate int8/uint8 with")
    prep.ids = [None] * len(texts)
    shards.tokenize(prep, texts)
    if log is not None:
        log(f"calibrating {shards.precision} ranges on {len(texts)} documents spread over the input")
    floats = shards.embed(prep)
    if floats.shape[0] == 0:
        raise CorpusError("no finite embeddings in the calibration sample to calibrate int8/uint8 with")
    return Q.calibration_ranges(floats), {"source": "sample", "rows": int(floats.shape[0])}


def record(m: Manifest, precision: str, ranges: np.ndarray, source: dict) -> None:
    """Write the ranges, and the convention the codes are made with, into the manifest and
    calibration.json, before the first shard."""
    m.data["calibration"] = {"precision": precision, "convention": Q.CONVENTION, **source,
                             "min": ranges[0].tolist(), "max": ranges[1].tolist()}
    Q.save_calibration(m.folder / CALIBRATION, ranges, model=m.data["model"]["name"],
                       fingerprint=m.data["model"]["fingerprint"], convention=Q.CONVENTION, **source)
    m.save()


__all__ = ["known_ranges", "sample_ranges", "record"]
