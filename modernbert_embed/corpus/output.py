"""Reading an output folder: shard by shard (`iter_shards`), whole (`read_output`), or checked
(`verify_output`).

`iter_shards` holds one shard at a time, so `verify_output` runs in bounded memory however large
the corpus. `read_output` gathers every shard; with `mmap_mode="r"` the shard arrays are
memory-mapped (`CorpusOutput.shards`), and only `CorpusOutput.embeddings` (all rows in one array)
reads them into memory.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .. import quantize as Q
from .errors import CorpusError
from .files import read_meta, sha256_file
from .manifest import MANIFEST, Manifest, scalar_convention


@dataclass
class Shard:
    """One shard of an output folder: rows [start, end) of the inputs, the embeddings and metadata
    of its documents (row-aligned), and the rows it skipped."""

    index: int
    rows: tuple[int, int]
    embeddings: np.ndarray
    meta: dict[str, list]
    skipped: list[dict]


class CorpusOutput:
    """Every shard of a folder in row order: `shards` (one array each, memory-mapped when read
    with `mmap_mode`), `meta` (the metadata columns of all documents), `manifest` (the folder's
    manifest with all shards), and `embeddings` (all rows in one array, made on first use)."""

    def __init__(self, shards: list[np.ndarray], meta: dict[str, list], manifest: dict):
        self.shards, self.meta, self.manifest = shards, meta, manifest

    @functools.cached_property
    def embeddings(self) -> np.ndarray:
        if self.shards:
            return np.concatenate(self.shards)
        info = self.manifest.get("embeddings") or {}
        return np.empty((0, info.get("width", 0)), dtype=info.get("dtype", "float32"))

    @property
    def ranges(self) -> np.ndarray | None:
        """int8/uint8: the calibration ranges [2, d] the shards were quantised with."""
        cal = self.manifest.get("calibration")
        return None if cal is None else Q.check_ranges([cal["min"], cal["max"]])

    @property
    def convention(self) -> str | None:
        """int8/uint8: how the codes were made from `ranges` (see `quantize.CONVENTIONS`; a folder
        written before it was recorded: `quantize.LEGACY_CONVENTION`)."""
        cal = self.manifest.get("calibration")
        return None if cal is None else scalar_convention(cal)

    def dequantize(self, codes=None) -> np.ndarray:
        """int8/uint8: approximate float32 embeddings back from `codes` (default: all of
        `embeddings`) with this folder's ranges and convention."""
        precision = (self.manifest.get("embeddings") or {}).get("precision")
        if self.ranges is None or precision not in Q.SCALAR_PRECISIONS:
            raise CorpusError(f"dequantize works for int8/uint8 folders; this one holds {precision}")
        return Q.dequantize(self.embeddings if codes is None else codes, precision, self.ranges, self.convention)


def _open(folder: Path, allow_incomplete: bool) -> Manifest:
    m = Manifest.load(folder)
    if not m.data.get("complete") and not allow_incomplete:
        raise CorpusError(f"{folder} is not complete; rerun the command that made it to finish it")
    return m


def _load_shard(folder: Path, s: dict, info: dict, verify: bool, mmap_mode) -> Shard:
    files = s["files"]
    if verify:
        for f in files.values():
            p = folder / f["name"]
            if not p.is_file() or sha256_file(p) != f["sha256"]:
                raise CorpusError(f"{p} is missing or does not match its checksum in {MANIFEST}")
    # An array of no rows cannot be memory-mapped (there are no bytes to map).
    mode = mmap_mode if s["documents"] else None
    arr = np.load(folder / files["embeddings"]["name"], mmap_mode=mode, allow_pickle=False)
    meta = read_meta(folder / files["meta"]["name"])
    start, end = s["rows"]
    if verify:
        rows = meta.get("row", [])
        if arr.shape[0] != s["documents"] or len(rows) != s["documents"]:
            raise CorpusError(f"shard {s['index']}: {arr.shape[0]} embeddings, {len(rows)} metadata rows, "
                              f"{s['documents']} documents in the manifest")
        if info and (arr.ndim != 2 or arr.shape[1] != info["width"] or str(arr.dtype) != info["dtype"]):
            raise CorpusError(f"shard {s['index']}: embeddings {arr.dtype} {list(arr.shape)}, but the manifest "
                              f"says {info['dtype']} of width {info['width']}")
        if sorted(rows + [k["row"] for k in s["skipped"]]) != list(range(start, end)):
            raise CorpusError(f"shard {s['index']}: its documents and skipped rows do not add up to its "
                              f"rows {start}..{end - 1}")
    return Shard(s["index"], (start, end), arr, meta, s["skipped"])


def iter_shards(folder: str | os.PathLike, verify: bool = True, mmap_mode: str | None = None,
                allow_incomplete: bool = False) -> Iterator[Shard]:
    """The shards of an output folder, one at a time, in row order. verify: check each shard's
    files against their checksums and its counts against the manifest (CorpusError otherwise).
    mmap_mode: memory-map the embeddings (as `numpy.load` does) instead of reading them."""
    folder = Path(folder)
    m = _open(folder, allow_incomplete)
    info = m.data.get("embeddings") or {}
    for s in m.shard_list():
        yield _load_shard(folder, s, info, verify, mmap_mode)


def read_output(folder: str | os.PathLike, verify: bool = True, allow_incomplete: bool = False,
                mmap_mode: str | None = None) -> CorpusOutput:
    """Every shard of an output folder in row order, with their metadata columns.
    verify: check every file's checksum and the counts against the manifest.
    mmap_mode ("r"): memory-map the shard arrays (`CorpusOutput.shards`) instead of reading them."""
    folder = Path(folder)
    m = _open(folder, allow_incomplete)
    info = m.data.get("embeddings") or {}
    arrays, meta = [], {}
    for s in m.shard_list():
        shard = _load_shard(folder, s, info, verify, mmap_mode)
        arrays.append(shard.embeddings)
        for k, v in shard.meta.items():
            meta.setdefault(k, []).extend(v)
    return CorpusOutput(arrays, meta, m.view())


def verify_output(folder: str | os.PathLike) -> str:
    """Check a finished output folder (every file's checksum, every count), one shard at a time;
    a one-line report, or CorpusError naming the first problem."""
    folder = Path(folder)
    m = _open(folder, allow_incomplete=False)
    info, totals = m.data["embeddings"], m.data["totals"]
    next_row = documents = shards = 0
    for shard in iter_shards(folder, verify=True, mmap_mode="r"):
        if shard.rows[0] != next_row:
            raise CorpusError(f"shard {shard.index} starts at row {shard.rows[0]}, not at row {next_row}")
        next_row = shard.rows[1]
        documents += shard.embeddings.shape[0]
        shards += 1
    found = {"rows": next_row, "documents": documents, "shards": shards}
    wrong = [f"{k}: {v} found, {totals[k]} in {MANIFEST}" for k, v in found.items() if totals[k] != v]
    if wrong:
        raise CorpusError(f"{folder}: the shards do not add up to the totals ({'; '.join(wrong)})")
    return (f"{folder}: complete, {documents} documents + {totals['skipped']} skipped = {next_row} rows in "
            f"{shards} shards; embeddings [{documents}, {info['width']}] {info['dtype']}; checksums ok")


__all__ = ["CorpusOutput", "Shard", "iter_shards", "read_output", "verify_output"]
