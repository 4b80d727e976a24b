"""The work on shards: read and check input rows, tokenise, embed (or score), quantise and write.

A shard is one unit of work whose result depends only on its rows (and on the engine's settings,
see the package docstring): its rows are parsed and tokenised together, embedded with
`Engine.embed` under the token budget, quantised with the folder's one calibration, and written as
two files before it enters the journal. For a classifier (`Shards(scoring=...)`), the rows (texts,
or pairs of texts) are scored with `Engine.score` instead, and the shard's files are its scores and
labels (see `scoring.py`) beside its metadata. For a multi-vector model (`Shards(vectors=...)`),
the rows are tokenised as `MultiVectorEncoder` does and run through `Engine.tokens`; the shard's
files are its token vectors and their offsets (see `multivector.py`).

`Shards.run` does that for many shards with three stages in step: a reader thread parses (and on a
GPU tokenises) the next shard, the calling thread runs the model, a writer thread quantises, writes
and records the previous shard. Every wait in the stages gives up when the pipeline stops, so a
failure in any stage ends all three, and `run` returns only after both threads have ended.
"""

from __future__ import annotations

import hashlib
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from .. import quantize as Q
from ..chunking import combine, split_long
from ..engine import NonFiniteError
from ..loaded import LoadedModel
from . import files
from .errors import CorpusError, RefusedError, RowError
from .manifest import Manifest
from .multivector import TokenVectors, drop_documents
from .scoring import Scoring
from .sources import Rows, Source

# How long a stage waits on a queue before it looks again whether the pipeline has stopped.
POLL_SECONDS = 0.1
# Rows a reader parses between two looks at whether the pipeline has stopped.
STOP_CHECK_ROWS = 1024


@dataclass
class Prepared:
    """One shard, read (and tokenised), waiting for the model. Per document: rows, ids, where,
    tokens, truncated, doc_windows; per sequence through the model: seqs (windows in chunk mode)."""

    index: int
    start: int
    end: int
    digest: str = ""
    rows: list[int] = field(default_factory=list)
    ids: list[str | None] = field(default_factory=list)
    where: list[str] = field(default_factory=list)
    seqs: list[list[int]] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    truncated: list[bool] = field(default_factory=list)
    windows: Any = None  # chunking.Windows in chunk mode
    skipped: list[dict] = field(default_factory=list)
    texts: list | None = None  # parsed, not yet tokenised (strings, or pairs of strings)
    keep: list | None = None  # a multi-vector model: the tokens of each sequence it returns (None: all)
    key_lengths: list | None = None  # a multi-vector model's expanded queries: the tokens attended to

    @property
    def num_docs(self) -> int:
        return len(self.rows)

    def drop(self, docs: list[int], reason: str) -> None:
        """Move documents (by position in this shard) to `skipped`, with `reason`."""
        gone = set(docs)
        for d in docs:
            self.skipped.append({"row": self.rows[d], "where": self.where[d], "error": reason})
        self.skipped.sort(key=lambda s: s["row"])
        keep = [d for d in range(self.num_docs) if d not in gone]
        for name in ("rows", "ids", "where", "tokens", "truncated"):
            values = getattr(self, name)
            setattr(self, name, [values[d] for d in keep])
        if self.windows is not None:
            self.windows.doc_windows = [self.windows.doc_windows[d] for d in keep]


class Shards:
    """The shards of one job: how to read, embed (or score) and write them (see the module
    docstring). `scoring`: a classifier's (`scoring.Scoring`); None for an embedder."""

    def __init__(self, sources: list[Source], out: Path, *, model: LoadedModel, shard_size: int, on_error: str,
                 prompt: str, long: str, overlap: int | None, max_seq_length: int, dim: int, normalize: bool,
                 max_batch_tokens: int, precision: str, meta_format: str, scoring: Scoring | None = None,
                 vectors: TokenVectors | None = None):
        self.sources, self.out = sources, out
        self.model, self.engine, self.tokenizer = model, model.engine, model.text_tokenizer()
        self.tokenize_beside_model = model.tokenize_beside_model
        self.shard_size, self.on_error = shard_size, on_error
        self.prompt, self.long, self.overlap, self.max_seq_length = prompt, long, overlap, max_seq_length
        self.dim, self.normalize, self.max_batch_tokens = dim, normalize, max_batch_tokens
        self.precision, self.meta_format = precision, meta_format
        self.scoring, self.vectors = scoring, vectors
        # floats per document through the model: embedding features, or a classifier's logits
        self.width = dim if scoring is None else scoring.num_labels
        self.what = "scores" if scoring is not None else "token vectors" if vectors is not None else "embeddings"

    def bounds(self, k: int, total: int) -> tuple[int, int]:
        return k * self.shard_size, min((k + 1) * self.shard_size, total)

    # ---------------------------------------------------------------- reading
    def check_recorded(self, done: dict[int, dict], total: int) -> Rows:
        """Read the input rows of every recorded shard and compare them with the digest it was
        embedded from (RefusedError on a difference). Returns the rows, positioned after the last
        recorded shard."""
        rows = Rows(self.sources)
        for k in sorted(done):
            start, end = self.bounds(k, total)
            h = hashlib.sha256()
            for row in range(start, end):
                _, _, _, raw = rows.take(row)
                _digest_update(h, raw)
            if h.hexdigest() != done[k]["input_sha256"]:
                raise RefusedError(
                    f"the input rows {start}..{end - 1} of shard {k} differ from the ones embedded into "
                    f"{self.out}: the inputs changed. Use another output folder, or delete {self.out} to "
                    "start over.")
        return rows

    def prepared(self, todo: list[int], total: int, rows: Rows, stop: threading.Event) -> Iterator[Prepared]:
        """Parse (and, beside a GPU, tokenise) the shards `todo`, in order, from `rows`."""
        last = -(-total // self.shard_size) - 1
        for k in todo:
            start, end = self.bounds(k, total)
            prep = Prepared(k, start, end)
            texts: list[str] = []
            h = hashlib.sha256()
            for row in range(start, end):
                if (row - start) % STOP_CHECK_ROWS == 0 and stop.is_set():
                    return
                r, src, local, raw = rows.take(row)
                _digest_update(h, raw)
                self._parse_into(prep, texts, r, src, local, raw)
            prep.digest = h.hexdigest()
            if self.tokenize_beside_model:
                self.tokenize(prep, texts)
            else:
                prep.texts = texts
            yield prep
            if k == last and rows.next() is not None:
                raise CorpusError(f"the inputs hold more than the {total} rows counted: did a file change "
                                  "while it was being read?")

    def _parse_into(self, prep: Prepared, texts: list[str], row: int, src: Source, local: int, raw) -> None:
        try:
            text, ident = src.parse(local, raw)
        except RowError as e:
            if self.on_error == "stop":
                raise
            prep.skipped.append({"row": row, "where": e.where, "error": e.reason})
            return
        prep.rows.append(row)
        prep.ids.append(ident)
        prep.where.append(src.where(local))
        texts.append(text)

    def tokenize(self, prep: Prepared, texts: list) -> None:
        if self.vectors is not None:
            ids, truncated, keep, keys = self.vectors.tokenize(texts) if texts else ([], [], None, None)
            prep.seqs, prep.tokens, prep.truncated = ids, [len(s) for s in ids], list(truncated)
            prep.keep, prep.key_lengths = keep, keys
        elif self.scoring is not None and texts and isinstance(texts[0], tuple):  # a cross-encoder's pairs
            ids, truncated = self.model.tokenize_pairs(texts, self.max_seq_length)
            prep.seqs, prep.tokens, prep.truncated = ids, [len(s) for s in ids], list(truncated)
        elif self.long == "chunk":
            w = split_long(self.tokenizer, texts, self.prompt, self.max_seq_length, self.overlap)
            prep.windows, prep.seqs = w, w.ids
            prep.tokens, prep.truncated = list(w.doc_tokens), [False] * len(texts)
        else:
            ids, truncated = self.model.tokenize(texts, self.prompt, self.max_seq_length) if texts else ([], [])
            prep.seqs, prep.tokens, prep.truncated = ids, [len(s) for s in ids], list(truncated)
        prep.texts = None

    # ---------------------------------------------------------------- embedding
    def embed(self, prep: Prepared, on_batch: Callable[[int, int], None] | None = None) -> np.ndarray:
        """float32 embeddings [documents, dim] of a tokenised shard (a classifier's logits
        [documents, num_labels]). Documents whose embedding is not finite are embedded again, each
        on its own; those still not finite stop the job (on_error "stop": a CorpusError naming
        them by file and line) or are moved to the shard's skipped rows (on_error "skip")."""
        if self.vectors is not None:
            return self._token_vectors(prep, on_batch)
        seqs = prep.seqs
        out = torch.empty(len(seqs), self.width, dtype=torch.float32, device=self.engine.device)
        try:
            self._embed_into(seqs, out, on_batch)
        except NonFiniteError as e:
            bad = self._retry_alone(prep, out, e.rows)
            if bad and self.on_error == "stop":
                shown = "; ".join(prep.where[d] for d in bad[:5]) + (" ..." if len(bad) > 5 else "")
                raise CorpusError(f"non-finite {self.what} (NaN or infinity) for {len(bad)} document(s): {shown} "
                                  f"(model dtype {self.engine.dtype_name}). Pass "
                                  "--on-error skip to record them as skipped and go on.") from None
        else:
            bad = []
        if prep.windows is not None:
            w = prep.windows
            out = combine(out, w.owner, w.content_tokens, w.num_docs, self.normalize)
        floats = out.cpu().numpy()
        if bad:
            prep.drop(bad, "non-finite embedding (NaN or infinity), also when embedded on its own"
                      if self.scoring is None else "non-finite score (NaN or infinity), also when scored on its own")
            floats = np.delete(floats, bad, axis=0)
        return floats

    def _tokens(self, prep: Prepared, docs: list[int] | None = None, on_batch=None):
        """A multi-vector model's float32 token vectors and offsets of the documents `docs` of a
        shard (None: all)."""
        pick = (lambda xs: xs) if docs is None else (lambda xs: None if xs is None else [xs[d] for d in docs])
        out, offsets = self.engine.tokens(pick(prep.seqs), keep=pick(prep.keep), key_lengths=pick(prep.key_lengths),
                                          dim=self.vectors.truncate_dim, max_batch_tokens=self.max_batch_tokens,
                                          on_batch=on_batch)
        return out.cpu().numpy(), offsets

    def _token_vectors(self, prep: Prepared, on_batch=None) -> tuple[np.ndarray, np.ndarray]:
        """A multi-vector model's shard: float32 token vectors [K, dim] and int64 offsets
        [documents + 1]. Documents with a non-finite vector are run again, each on its own; those
        still not finite stop the job or are skipped, as `embed` does."""
        if not prep.seqs:
            vectors, offsets = self.vectors.empty()
            return vectors.astype(np.float32), offsets
        try:
            return self._tokens(prep, on_batch=on_batch)
        except NonFiniteError as e:
            bad_docs = e.rows
        vectors, offsets = self._tokens_unchecked(prep)
        still = []
        for d in bad_docs:
            try:
                v, _ = self._tokens(prep, [d])
            except NonFiniteError:
                still.append(d)
            else:
                vectors[offsets[d]:offsets[d + 1]] = v
        if still and self.on_error == "stop":
            shown = "; ".join(prep.where[d] for d in still[:5]) + (" ..." if len(still) > 5 else "")
            raise CorpusError(f"non-finite token vectors (NaN or infinity) for {len(still)} document(s): {shown} "
                              f"(model dtype {self.engine.dtype_name}). Pass --on-error skip to record them as "
                              "skipped and go on.")
        if still:
            prep.drop(still, "non-finite token vectors (NaN or infinity), also when encoded on its own")
            vectors, offsets = drop_documents(vectors, offsets, still)
        return vectors, offsets

    def _tokens_unchecked(self, prep: Prepared) -> tuple[np.ndarray, np.ndarray]:
        out, offsets = self.engine.tokens(prep.seqs, keep=prep.keep, key_lengths=prep.key_lengths,
                                          dim=self.vectors.truncate_dim, max_batch_tokens=self.max_batch_tokens,
                                          check_finite=False)
        return out.cpu().numpy(), offsets

    def _embed_into(self, seqs, out: torch.Tensor, on_batch=None) -> None:
        if self.scoring is not None:
            self.engine.score(seqs, max_batch_tokens=self.max_batch_tokens, on_batch=on_batch, out=out)
            return
        self.engine.embed(seqs, dim=self.dim, normalize=self.normalize, max_batch_tokens=self.max_batch_tokens,
                          on_batch=on_batch, out=out)

    def _retry_alone(self, prep: Prepared, out: torch.Tensor, bad_seqs: list[int]) -> list[int]:
        """Embed each document with a non-finite sequence again on its own (all its windows in
        chunk mode) into its rows of `out`; the documents still not finite, in order."""
        if prep.windows is None:
            spans = {d: (d, d + 1) for d in bad_seqs}
        else:
            first = np.concatenate([[0], np.cumsum(prep.windows.doc_windows)]).tolist()
            spans = {d: (first[d], first[d + 1]) for d in sorted({prep.windows.owner[s] for s in bad_seqs})}
        still = []
        for d, (a, b) in sorted(spans.items()):
            try:
                self._embed_into(prep.seqs[a:b], out[a:b])
            except NonFiniteError:
                still.append(d)
        return still

    # ---------------------------------------------------------------- writing
    def arrays(self, index: int, floats: np.ndarray, ranges, convention: str) -> list[tuple[str, str, np.ndarray]]:
        """The arrays of shard `index` as (kind, file name, array): an embedder's codes (quantised,
        int8/uint8 on `ranges` under `convention`), a classifier's scores and labels, or a
        multi-vector model's token vectors and offsets (`floats`: the pair `_token_vectors` gives)."""
        name = f"shard-{index:05d}"
        if self.vectors is not None:
            vectors, offsets = floats
            return [("tokens", f"{name}.tokens.npy", vectors.astype(self.vectors.dtype, copy=False)),
                    ("offsets", f"{name}.offsets.npy", np.asarray(offsets, dtype=np.int64))]
        if self.scoring is not None:
            if floats.shape[0] == 0:
                scores, labels = self.scoring.empty()
            else:
                logits = torch.from_numpy(floats)
                scores, labels = self.scoring.scores(logits), self.scoring.labels(logits)
            return [("scores", f"{name}.scores.npy", scores), ("labels", f"{name}.labels.npy", labels)]
        if floats.shape[0] == 0:
            codes = np.empty((0, Q.output_width(self.precision, self.dim)), dtype=Q.output_dtype(self.precision))
        else:
            codes = Q.quantize_embeddings(floats, self.precision, ranges=ranges, convention=convention)
        return [("embeddings", f"{name}.npy", codes)]

    def write(self, m: Manifest, prep: Prepared, floats: np.ndarray, ranges, run: int,
              convention: str = Q.CONVENTION) -> dict:
        """Quantise (int8/uint8: on `ranges`, under `convention`) and write one shard's files
        (`arrays`, then the metadata), then record it in the journal. A write that
        fails (a full disk) is a CorpusError naming the file and the reason; the shards recorded
        before it stay, and a rerun resumes from there."""
        arrays = self.arrays(prep.index, floats, ranges, convention)
        name = f"shard-{prep.index:05d}"
        meta = {"row": prep.rows, "id": prep.ids, "tokens": prep.tokens, "truncated": prep.truncated}
        if prep.windows is not None:
            meta["windows"] = prep.windows.doc_windows
        written = {}
        try:
            for kind, fname, data in ([(kind, fname, files.npy_bytes(a)) for kind, fname, a in arrays]
                                      + [("meta", f"{name}.meta.{self.meta_format}",
                                          files.meta_bytes(meta, self.meta_format))]):
                files.atomic_write(self.out / fname, data, sync_dir=False)
                written[kind] = files.file_record(fname, data)
            files.fsync_dir(self.out)
            entry = {
                "index": prep.index, "rows": [prep.start, prep.end], "documents": prep.num_docs,
                "skipped": prep.skipped, "tokens": int(sum(prep.tokens)), "truncated": int(sum(prep.truncated)),
                "input_sha256": prep.digest, "files": written, "run": run,
            }
            if prep.windows is not None:
                entry["windows"] = int(sum(prep.windows.doc_windows))
            if self.vectors is not None:
                entry["vectors"] = int(arrays[0][2].shape[0])
            m.add_shard(entry)
        except OSError as e:
            raise CorpusError(f"cannot write {e.filename or m.journal_path}: {e.strerror or e}. The shards "
                              "recorded so far are kept; fix the cause and run the same command again to "
                              "resume.") from None
        return entry

    # ---------------------------------------------------------------- the three stages
    def run(self, m: Manifest, todo: list[int], total: int, rows: Rows, ranges, run: int, result,
            bar=None, on_shard: Callable[[dict], None] | None = None, convention: str = Q.CONVENTION) -> None:
        """Embed and write the shards `todo` (see the module docstring); counts go into `result`."""
        stop = threading.Event()
        ready: queue.Queue = queue.Queue(maxsize=2)
        written: queue.Queue = queue.Queue(maxsize=2)
        errors: list[BaseException] = []

        def put_ready(item) -> bool:
            while not stop.is_set():
                try:
                    ready.put(item, timeout=POLL_SECONDS)
                    return True
                except queue.Full:
                    pass
            return False

        def reader():
            try:
                for prep in self.prepared(todo, total, rows, stop):
                    if not put_ready(prep):
                        return
            except BaseException as e:  # handed to the calling thread
                put_ready(e)
                return
            put_ready(None)

        def writer():
            while True:
                item = written.get()
                if item is None:
                    return
                if errors:
                    continue  # drain: the calling thread stops sending
                prep, floats = item
                try:
                    entry = self.write(m, prep, floats, ranges, run, convention)
                    result.shards_written += 1
                    if on_shard is not None:
                        on_shard(entry)
                except BaseException as e:
                    errors.append(e)
                    stop.set()

        threads = [threading.Thread(target=reader, daemon=True, name="corpus-reader"),
                   threading.Thread(target=writer, daemon=True, name="corpus-writer")]
        for t in threads:
            t.start()
        t0 = time.perf_counter()
        try:
            while not errors:
                try:
                    item = ready.get(timeout=POLL_SECONDS)
                except queue.Empty:
                    continue
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                prep = item
                if prep.texts is not None:
                    self.tokenize(prep, prep.texts)
                base = bar.n if bar is not None else 0
                floats = self.embed(prep, _Progress(prep, result, bar, base, t0))
                result.documents += prep.num_docs
                result.skipped += len(prep.skipped)
                if bar is not None:  # skipped rows count as handled
                    bar.update(base + prep.end - prep.start - bar.n)
                    _postfix(bar, result, t0)
                written.put((prep, floats))
        finally:
            stop.set()
            written.put(None)
            for t in reversed(threads):
                t.join()
        if errors:
            raise errors[0]


class _Progress:
    """`on_batch` for one shard: counts tokens, moves the bar as the shard's batches finish."""

    def __init__(self, prep: Prepared, result, bar, base: int, t0: float):
        self.prep, self.result, self.bar, self.base, self.t0 = prep, result, bar, base, t0
        self.seqs_done = 0

    def __call__(self, seqs: int, tokens: int) -> None:
        self.seqs_done += seqs
        self.result.tokens += tokens
        if self.bar is not None:
            docs = self.prep.num_docs * self.seqs_done // max(len(self.prep.seqs), 1)
            self.bar.update(self.base + docs - self.bar.n)
            _postfix(self.bar, self.result, self.t0)


def _digest_update(h, raw) -> None:
    b = Source.digest_bytes(raw)
    h.update(len(b).to_bytes(8, "little"))
    h.update(b)


def progress_bar(total: int, already: int, show: bool, desc: str = "embedding"):
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=already, unit="doc", desc=desc, dynamic_ncols=True,
                smoothing=0.1, file=sys.stderr)


def _postfix(bar, result, t0: float) -> None:
    dt = max(time.perf_counter() - t0, 1e-9)
    bar.set_postfix_str(f"{result.tokens / dt:,.0f} tok/s", refresh=False)


__all__ = ["Prepared", "Shards", "progress_bar"]
