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

A multi-vector (ColBERT) model's folder (`model.kind` "multivector") holds per shard one flat
array of token vectors [total_tokens, dim] and int64 offsets [n + 1]: `CorpusOutput.document(i)`
is document i's [n_i, dim] vectors, a slice of the memory-mapped shard (`read_output` maps these
folders by default, so a document is read from disk, not the whole shard), `iter_documents()`
gives every document in order, `ids`, `token_counts` and `total_tokens` say what there is.
"""

from __future__ import annotations

import bisect
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
    tokens: np.ndarray | None = None  # a multi-vector folder: [total_tokens, dim]
    offsets: np.ndarray | None = None  # a multi-vector folder: int64 [n + 1]

    @property
    def documents(self) -> int:
        if self.offsets is not None:
            return len(self.offsets) - 1
        return len(self.embeddings if self.embeddings is not None else self.labels)

    def document(self, j: int) -> np.ndarray:
        """A multi-vector folder: the token vectors [n_j, dim] of this shard's document j (a view
        of `tokens`: memory-mapped when the shard is)."""
        if self.offsets is None:
            raise CorpusError("this shard holds no token vectors (not a multi-vector folder)")
        if not -self.documents <= j < self.documents:
            raise IndexError(f"document {j} of a shard of {self.documents}")
        j %= self.documents
        return self.tokens[int(self.offsets[j]):int(self.offsets[j + 1])]


class CorpusOutput:
    """Every shard of a folder in row order: `shards` (one array each, memory-mapped when read
    with `mmap_mode`), `meta` (the metadata columns of all documents), `manifest` (the folder's
    manifest with all shards), and `embeddings` (all rows in one array, made on first use).
    A classifier's folder: `shards` holds the score arrays, `label_shards` the label arrays, and
    `scores`, `labels` (all rows) and `id2label` replace `embeddings`."""

    def __init__(self, shards: list[np.ndarray], meta: dict[str, list], manifest: dict,
                 label_shards: list[np.ndarray] | None = None, offset_shards: list[np.ndarray] | None = None):
        self.shards, self.meta, self.manifest = shards, meta, manifest
        self.label_shards = label_shards
        self.offset_shards = offset_shards
        if offset_shards is not None:  # the first document of each shard, and one past the last
            self._first = np.concatenate([[0], np.cumsum([len(o) - 1 for o in offset_shards])]).astype(np.int64)

    @property
    def kind(self) -> str:
        """"embedder" (embeddings), "classifier" (scores and labels) or "multivector" (token vectors)."""
        return recorded_kind(self.manifest)

    def _need(self, kind: str, what: str) -> None:
        if self.kind != kind:
            holds = {"embedder": "embeddings (written by an embedder): read .embeddings",
                     "classifier": "scores and labels (written by a classifier): read .scores and .labels",
                     "multivector": "token vectors (written by a multi-vector model): read .document(i) or "
                                    ".iter_documents()"}[self.kind]
            raise CorpusError(f"this folder holds {holds}; it has no {what}")

    # ---------------------------------------------------------------- a multi-vector folder
    def __len__(self) -> int:
        """The documents of the folder."""
        return len(self.meta.get("row", []))

    @property
    def ids(self) -> list:
        """Every document's id (None where the input had none), in row order."""
        return list(self.meta.get("id", []))

    def document(self, i: int) -> np.ndarray:
        """A multi-vector folder: document i's token vectors [n_i, dim] (i counts documents in row
        order, skipped rows left out: `meta["row"][i]` is its input row). A slice of its shard,
        memory-mapped when the folder was read with `mmap_mode="r"` (the default for these)."""
        self._need("multivector", "token vectors")
        n = int(self._first[-1])
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"a document index is an int, got {type(i).__name__}")
        if not -n <= i < n:
            raise IndexError(f"document {i} of a folder of {n} documents")
        i = int(i) % n
        k = bisect.bisect_right(self._first.tolist(), i) - 1
        j = i - int(self._first[k])
        offsets = self.offset_shards[k]
        return self.shards[k][int(offsets[j]):int(offsets[j + 1])]

    def iter_documents(self):
        """A multi-vector folder: every document's token vectors, in row order (see `document`)."""
        self._need("multivector", "token vectors")
        for tokens, offsets in zip(self.shards, self.offset_shards):
            bounds = offsets.tolist()
            for a, b in zip(bounds[:-1], bounds[1:]):
                yield tokens[a:b]

    @functools.cached_property
    def token_counts(self) -> np.ndarray:
        """A multi-vector folder: int64 token vectors of each document, in row order."""
        self._need("multivector", "token vectors")
        return (np.concatenate([np.diff(o) for o in self.offset_shards]) if self.offset_shards
                else np.empty(0, dtype=np.int64))

    @property
    def total_tokens(self) -> int:
        """A multi-vector folder: token vectors in all."""
        return int(self.token_counts.sum())

    # ---------------------------------------------------------------- the other kinds
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


# Token vectors checked for NaN and infinity at a time by `verify` (bounded memory).
FINITE_CHECK_ROWS = 1 << 16


def _check_vectors(s: dict, tokens: np.ndarray, offsets: np.ndarray, info: dict) -> None:
    """A multi-vector shard: tokens [K, dim] of the recorded dtype, all finite; offsets int64
    [documents + 1] from 0, never decreasing, ending at K."""
    k = s["index"]
    if offsets.dtype != np.int64 or offsets.shape != (s["documents"] + 1,):
        raise CorpusError(f"shard {k}: offsets {offsets.dtype} {list(offsets.shape)}, but the manifest says int64 "
                          f"[{s['documents'] + 1}] ({s['documents']} documents + 1)")
    if tokens.ndim != 2 or tokens.shape[1] != info["dim"] or str(tokens.dtype) != info["dtype"]:
        raise CorpusError(f"shard {k}: token vectors {tokens.dtype} {list(tokens.shape)}, but the manifest says "
                          f"{info['dtype']} of width {info['dim']}")
    if offsets[0] != 0 or (offsets.size > 1 and np.any(np.diff(offsets) < 0)):
        raise CorpusError(f"shard {k}: offsets do not start at 0 and never decrease")
    if int(offsets[-1]) != tokens.shape[0] or tokens.shape[0] != s.get("vectors", tokens.shape[0]):
        raise CorpusError(f"shard {k}: the last offset is {int(offsets[-1])}, the shard has {tokens.shape[0]} token "
                          f"vectors, the manifest says {s.get('vectors')}")
    for a in range(0, tokens.shape[0], FINITE_CHECK_ROWS):
        block = np.asarray(tokens[a:a + FINITE_CHECK_ROWS])
        if not np.isfinite(block).all():
            row = a + int(np.flatnonzero(~np.isfinite(block).all(axis=1))[0])
            raise CorpusError(f"shard {k}: token vector {row} is not finite (NaN or infinity)")


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
    multivector = "tokens" in files
    start, end = s["rows"]
    if multivector:
        mode = mmap_mode if s.get("vectors", 1) else None  # no token vectors: nothing to map
        tokens = np.load(folder / files["tokens"]["name"], mmap_mode=mode, allow_pickle=False)
        offsets = np.load(folder / files["offsets"]["name"], allow_pickle=False)  # small: read
        meta = read_meta(folder / files["meta"]["name"])
        if verify:
            _check_vectors(s, tokens, offsets, info)
            _check_rows(s, meta, s["documents"], "token vector offsets")
        return Shard(s["index"], (start, end), None, meta, s["skipped"], tokens=tokens, offsets=offsets)
    arr = load("scores" if classifier else "embeddings")
    labels = load("labels") if classifier else None
    meta = read_meta(folder / files["meta"]["name"])
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


def _check_rows(s: dict, meta: dict, documents: int, what: str) -> None:
    """A shard's metadata rows: one per document, and with its skipped rows exactly its rows."""
    rows = meta.get("row", [])
    start, end = s["rows"]
    if len(rows) != s["documents"] or documents != s["documents"]:
        raise CorpusError(f"shard {s['index']}: {documents} documents in its {what}, {len(rows)} metadata rows, "
                          f"{s['documents']} documents in the manifest")
    if sorted(rows + [k["row"] for k in s["skipped"]]) != list(range(start, end)):
        raise CorpusError(f"shard {s['index']}: its documents and skipped rows do not add up to its "
                          f"rows {start}..{end - 1}")


def _info(m: Manifest) -> dict:
    """What the manifest says the shards' arrays are: `scores` for a classifier, `vectors` for a
    multi-vector model, else `embeddings`."""
    key = {"classifier": "scores", "multivector": "vectors"}.get(recorded_kind(m.data), "embeddings")
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


_DEFAULT = object()


def read_output(folder: str | os.PathLike, verify: bool = True, allow_incomplete: bool = False,
                mmap_mode: str | None = _DEFAULT) -> CorpusOutput:
    """Every shard of an output folder in row order, with their metadata columns.
    verify: check every file's checksum and the counts against the manifest (a multi-vector
    folder: also its offsets and that its vectors are finite), reading each file once.
    mmap_mode ("r"): memory-map the shard arrays (`CorpusOutput.shards`) instead of reading them;
    the default is "r" for a multi-vector folder (its documents are read one at a time), None
    (read) for the others. verify=False opens a folder without reading its shards."""
    folder = Path(folder)
    m = _open(folder, allow_incomplete)
    info = _info(m)
    kind = recorded_kind(m.data)
    if mmap_mode is _DEFAULT:
        mmap_mode = "r" if kind == "multivector" else None
    arrays, labels, offsets, meta = [], [], [], {}
    for s in m.shard_list():
        shard = _load_shard(folder, s, info, verify, mmap_mode)
        arrays.append(shard.tokens if shard.offsets is not None
                      else shard.embeddings if shard.scores is None else shard.scores)
        if shard.labels is not None:
            labels.append(shard.labels)
        if shard.offsets is not None:
            offsets.append(shard.offsets)
        for k, v in shard.meta.items():
            meta.setdefault(k, []).extend(v)
    return CorpusOutput(arrays, meta, m.view(), labels if kind == "classifier" else None,
                        offsets if kind == "multivector" else None)


def verify_output(folder: str | os.PathLike) -> str:
    """Check a finished output folder (every file's checksum, every count), one shard at a time;
    a one-line report, or CorpusError naming the first problem."""
    folder = Path(folder)
    m = _open(folder, allow_incomplete=False)
    info, totals = _info(m), m.data["totals"]
    next_row = documents = shards = vectors = 0
    for shard in iter_shards(folder, verify=True, mmap_mode="r"):
        if shard.rows[0] != next_row:
            raise CorpusError(f"shard {shard.index} starts at row {shard.rows[0]}, not at row {next_row}")
        next_row = shard.rows[1]
        documents += shard.documents
        shards += 1
        if shard.tokens is not None:
            vectors += shard.tokens.shape[0]
    found = {"rows": next_row, "documents": documents, "shards": shards}
    wrong = [f"{k}: {v} found, {totals[k]} in {MANIFEST}" for k, v in found.items() if totals[k] != v]
    if wrong:
        raise CorpusError(f"{folder}: the shards do not add up to the totals ({'; '.join(wrong)})")
    if recorded_kind(m.data) == "multivector":
        if vectors != totals.get("vectors"):
            raise CorpusError(f"{folder}: the shards hold {vectors} token vectors, {totals.get('vectors')} in "
                              f"{MANIFEST}")
        arrays = (f"{info['mode']} token vectors [{vectors}, {info['dim']}] {info['dtype']} with int64 offsets "
                  "per shard")
    elif recorded_kind(m.data) == "classifier":
        k = info["num_labels"]
        arrays = (f"scores [{documents}{'' if k == 1 else f', {k}'}] float32 ({info['values']}), "
                  f"labels [{documents}] int32")
    else:
        arrays = f"embeddings [{documents}, {info['width']}] {info['dtype']}"
    return (f"{folder}: complete, {documents} documents + {totals['skipped']} skipped = {next_row} rows in "
            f"{shards} shards; {arrays}; checksums ok")


__all__ = ["CorpusOutput", "Shard", "iter_shards", "read_output", "verify_output"]
