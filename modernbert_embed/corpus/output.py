"""Reading an output folder: shard by shard (`iter_shards`), whole (`read_output`), or checked
(`verify_output`).

`iter_shards` holds one shard at a time, so `verify_output` runs in bounded memory however large
the corpus. `read_output` gathers every shard; with `mmap_mode="r"` the shard arrays are
memory-mapped (`CorpusOutput.shards`), and only `CorpusOutput.embeddings` (all rows in one array)
reads them into memory.

A classifier's folder (manifest `model.kind` "classifier") holds scores and labels instead of
embeddings: `Shard.scores` / `Shard.labels`, `CorpusOutput.scores` / `labels` / `id2label`; its
`shards` are the score arrays. Asking one kind of folder for the other's arrays is a CorpusError
that says what the folder holds.
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
from .manifest import MANIFEST, Manifest, recorded_kind, scalar_convention


@dataclass
class Shard:
    """One shard of an output folder: rows [start, end) of the inputs, the embeddings (a
    classifier's folder: None, and `scores` float32 [n] or [n, num_labels] and `labels` int32 [n])
    and metadata of its documents (row-aligned), and the rows it skipped."""

    index: int
    rows: tuple[int, int]
    embeddings: np.ndarray | None
    meta: dict[str, list]
    skipped: list[dict]
    scores: np.ndarray | None = None
    labels: np.ndarray | None = None

    @property
    def documents(self) -> int:
        return len(self.embeddings if self.embeddings is not None else self.labels)


class CorpusOutput:
    """Every shard of a folder in row order: `shards` (one array each, memory-mapped when read
    with `mmap_mode`), `meta` (the metadata columns of all documents), `manifest` (the folder's
    manifest with all shards), and `embeddings` (all rows in one array, made on first use).
    A classifier's folder: `shards` holds the score arrays, `label_shards` the label arrays, and
    `scores`, `labels` (all rows) and `id2label` replace `embeddings`."""

    def __init__(self, shards: list[np.ndarray], meta: dict[str, list], manifest: dict,
                 label_shards: list[np.ndarray] | None = None):
        self.shards, self.meta, self.manifest = shards, meta, manifest
        self.label_shards = label_shards

    @property
    def kind(self) -> str:
        """"embedder" (embeddings) or "classifier" (scores and labels)."""
        return recorded_kind(self.manifest)

    def _need(self, kind: str, what: str) -> None:
        if self.kind != kind:
            holds = ("embeddings (written by an embedder): read .embeddings" if self.kind == "embedder"
                     else "scores and labels (written by a classifier): read .scores and .labels")
            raise CorpusError(f"this folder holds {holds}; it has no {what}")

    @functools.cached_property
    def embeddings(self) -> np.ndarray:
        self._need("embedder", "embeddings")
        if self.shards:
            return np.concatenate(self.shards)
        info = self.manifest.get("embeddings") or {}
        return np.empty((0, info.get("width", 0)), dtype=info.get("dtype", "float32"))

    @functools.cached_property
    def scores(self) -> np.ndarray:
        """A classifier's float32 scores of all documents: [n] for one label, else [n, num_labels]
        (what they are: the manifest's `scores`, e.g. `values` "activated" and `activation`)."""
        self._need("classifier", "scores")
        if self.shards:
            return np.concatenate(self.shards)
        k = self.manifest["scores"]["num_labels"]
        return np.empty((0,) if k == 1 else (0, k), dtype=np.float32)

    @functools.cached_property
    def labels(self) -> np.ndarray:
        """A classifier's int32 label id of every document (the rule: the manifest's `scores.labels`)."""
        self._need("classifier", "labels")
        return np.concatenate(self.label_shards) if self.label_shards else np.empty(0, dtype=np.int32)

    @property
    def id2label(self) -> dict[int, str]:
        """A classifier's label names by id."""
        self._need("classifier", "labels")
        return {int(k): v for k, v in self.manifest["scores"]["id2label"].items()}

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


def _check_scores(s: dict, scores: np.ndarray, labels: np.ndarray, info: dict) -> None:
    """A classifier's shard: scores float32 [n] or [n, k], labels int32 [n] in 0..k-1 (0..1 for one label)."""
    k = info["num_labels"]
    want = (s["documents"],) if k == 1 else (s["documents"], k)
    if scores.shape != want or scores.dtype != np.float32:
        raise CorpusError(f"shard {s['index']}: scores {scores.dtype} {list(scores.shape)}, but the manifest says "
                          f"float32 {list(want)}")
    if labels.shape != (s["documents"],) or labels.dtype != np.int32:
        raise CorpusError(f"shard {s['index']}: labels {labels.dtype} {list(labels.shape)}, but the manifest says "
                          f"int32 [{s['documents']}]")
    top = max(k, 2) - 1
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) > top):
        raise CorpusError(f"shard {s['index']}: label ids outside 0..{top}")


def _load_shard(folder: Path, s: dict, info: dict, verify: bool, mmap_mode) -> Shard:
    files = s["files"]
    if verify:
        for f in files.values():
            p = folder / f["name"]
            if not p.is_file() or sha256_file(p) != f["sha256"]:
                raise CorpusError(f"{p} is missing or does not match its checksum in {MANIFEST}")
    # An array of no rows cannot be memory-mapped (there are no bytes to map).
    mode = mmap_mode if s["documents"] else None

    def load(kind):
        return np.load(folder / files[kind]["name"], mmap_mode=mode, allow_pickle=False)

    classifier = "scores" in files
    arr = load("scores" if classifier else "embeddings")
    labels = load("labels") if classifier else None
    meta = read_meta(folder / files["meta"]["name"])
    start, end = s["rows"]
    if verify:
        rows = meta.get("row", [])
        what = "scores" if classifier else "embeddings"
        if arr.shape[0] != s["documents"] or len(rows) != s["documents"]:
            raise CorpusError(f"shard {s['index']}: {arr.shape[0]} {what}, {len(rows)} metadata rows, "
                              f"{s['documents']} documents in the manifest")
        if classifier:
            _check_scores(s, arr, labels, info)
        elif info and (arr.ndim != 2 or arr.shape[1] != info["width"] or str(arr.dtype) != info["dtype"]):
            raise CorpusError(f"shard {s['index']}: embeddings {arr.dtype} {list(arr.shape)}, but the manifest "
                              f"says {info['dtype']} of width {info['width']}")
        if sorted(rows + [k["row"] for k in s["skipped"]]) != list(range(start, end)):
            raise CorpusError(f"shard {s['index']}: its documents and skipped rows do not add up to its "
                              f"rows {start}..{end - 1}")
    if classifier:
        return Shard(s["index"], (start, end), None, meta, s["skipped"], scores=arr, labels=labels)
    return Shard(s["index"], (start, end), arr, meta, s["skipped"])


def _info(m: Manifest) -> dict:
    """What the manifest says the shards' arrays are: `scores` for a classifier, else `embeddings`."""
    key = "scores" if recorded_kind(m.data) == "classifier" else "embeddings"
    return m.data.get(key) or {}


def iter_shards(folder: str | os.PathLike, verify: bool = True, mmap_mode: str | None = None,
                allow_incomplete: bool = False) -> Iterator[Shard]:
    """The shards of an output folder, one at a time, in row order. verify: check each shard's
    files against their checksums and its counts against the manifest (CorpusError otherwise).
    mmap_mode: memory-map the embeddings (as `numpy.load` does) instead of reading them."""
    folder = Path(folder)
    m = _open(folder, allow_incomplete)
    info = _info(m)
    for s in m.shard_list():
        yield _load_shard(folder, s, info, verify, mmap_mode)


def read_output(folder: str | os.PathLike, verify: bool = True, allow_incomplete: bool = False,
                mmap_mode: str | None = None) -> CorpusOutput:
    """Every shard of an output folder in row order, with their metadata columns.
    verify: check every file's checksum and the counts against the manifest.
    mmap_mode ("r"): memory-map the shard arrays (`CorpusOutput.shards`) instead of reading them."""
    folder = Path(folder)
    m = _open(folder, allow_incomplete)
    info = _info(m)
    arrays, labels, meta = [], [], {}
    for s in m.shard_list():
        shard = _load_shard(folder, s, info, verify, mmap_mode)
        arrays.append(shard.embeddings if shard.scores is None else shard.scores)
        if shard.labels is not None:
            labels.append(shard.labels)
        for k, v in shard.meta.items():
            meta.setdefault(k, []).extend(v)
    return CorpusOutput(arrays, meta, m.view(), labels if recorded_kind(m.data) == "classifier" else None)


def verify_output(folder: str | os.PathLike) -> str:
    """Check a finished output folder (every file's checksum, every count), one shard at a time;
    a one-line report, or CorpusError naming the first problem."""
    folder = Path(folder)
    m = _open(folder, allow_incomplete=False)
    info, totals = _info(m), m.data["totals"]
    next_row = documents = shards = 0
    for shard in iter_shards(folder, verify=True, mmap_mode="r"):
        if shard.rows[0] != next_row:
            raise CorpusError(f"shard {shard.index} starts at row {shard.rows[0]}, not at row {next_row}")
        next_row = shard.rows[1]
        documents += shard.documents
        shards += 1
    found = {"rows": next_row, "documents": documents, "shards": shards}
    wrong = [f"{k}: {v} found, {totals[k]} in {MANIFEST}" for k, v in found.items() if totals[k] != v]
    if wrong:
        raise CorpusError(f"{folder}: the shards do not add up to the totals ({'; '.join(wrong)})")
    if recorded_kind(m.data) == "classifier":
        k = info["num_labels"]
        arrays = (f"scores [{documents}{'' if k == 1 else f', {k}'}] float32 ({info['values']}), "
                  f"labels [{documents}] int32")
    else:
        arrays = f"embeddings [{documents}, {info['width']}] {info['dtype']}"
    return (f"{folder}: complete, {documents} documents + {totals['skipped']} skipped = {next_row} rows in "
            f"{shards} shards; {arrays}; checksums ok")


__all__ = ["CorpusOutput", "Shard", "iter_shards", "read_output", "verify_output"]
