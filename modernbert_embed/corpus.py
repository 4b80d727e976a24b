"""Embedding a corpus into a folder of shards: input readers, shard writers, the manifest, resume.

Output folder layout:

```
OUT/manifest.json             what was asked (model, options, inputs), what is done (shards)
OUT/.lock                     held (flock) while a run writes here: a second run is refused
OUT/calibration.json          int8/uint8 only: the ranges every shard was quantised with
OUT/shard-00000.npy           embeddings of the shard's documents, [n, d] (or [n, d/8] bits)
OUT/shard-00000.meta.parquet  row-aligned: row, id, tokens, truncated (+ windows with chunking)
...                           (.meta.jsonl instead with --meta-format jsonl)
```

Shard k holds input rows [k * shard_size, (k + 1) * shard_size) in global row order (the rows of
all inputs one after the other). A row that fails under `--on-error skip` has no embedding and is
listed in its shard's `skipped`, so `documents + skipped == rows` for every shard and in total.

Crash safety: each file is written to a temporary name, synced and renamed; a shard enters the
manifest (itself replaced atomically) only after both of its files are in place, with their sizes
and sha256. A rerun of the same command reads the manifest, checks the recorded shards (files and
checksums, and a digest of each shard's input rows) and embeds only the shards that are missing,
each exactly as an uninterrupted run would (a shard is one unit of work whose result depends only
on its rows), so the finished folder is the same file for file. A different model (weights,
tokenizer or config: a fingerprint of the files), dtype or output-changing option on an existing
folder is refused, naming the difference; so are inputs whose embedded rows changed. Runtime
settings (device, max batch tokens, on-error) may change between runs.

manifest.json: `format`, `version`, `complete`; `model` (name, revision, fingerprint,
embedding_dim, max_seq_length, pooling, dtype); `options` (the output-changing ones); `inputs`
(path, format, bytes, rows); `calibration` (int8/uint8: source, min, max); `embeddings`
(precision, dtype, width, dim, packed_bits, normalized); `shards` (index, rows [start, end),
documents, skipped [{row, where, error}], tokens, truncated, input_sha256, files {embeddings,
meta: name, bytes, sha256}); `totals` once complete; `runs` (one record per run that wrote shards:
seconds, documents/s, tokens/s, device, ...).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib
import io
import json
import os
import queue
import re
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from . import quantize as Q
from .weights.resolve import DEFAULT_MODEL

MANIFEST = "manifest.json"
LOCK = ".lock"
CALIBRATION = "calibration.json"
FORMAT_NAME = "modernbert-embed corpus"
FORMAT_VERSION = 1
INPUT_FORMATS = ("text", "jsonl", "parquet")
META_FORMATS = ("parquet", "jsonl")
ON_ERROR = ("stop", "skip")
_SUFFIXES = {".txt": "text", ".text": "text", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl",
             ".parquet": "parquet", ".pq": "parquet"}
_BOM = b"\xef\xbb\xbf"


class CorpusError(Exception):
    """A problem with the input, the options or the output folder; the message is for the user."""

    exit_code = 1


class RefusedError(CorpusError):
    """The output folder cannot be used for this command (different model or options, foreign files)."""

    exit_code = 2


class RowError(CorpusError):
    """One input row that cannot be embedded; `where` names the file and line (or row)."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"{where}: {reason}")
        self.where, self.reason = where, reason


def have_pyarrow() -> bool:
    try:
        importlib.import_module("pyarrow.parquet")
    except ImportError:
        return False
    return True


def _need_pyarrow(why: str):
    if not have_pyarrow():
        raise CorpusError(f"{why} needs pyarrow: pip install 'modernbert-embed[parquet]' (or pyarrow)")
    import pyarrow
    import pyarrow.parquet

    return pyarrow, pyarrow.parquet


# ================================================================================ inputs
def detect_format(path: Path, given: str | None = None) -> str:
    if given and given != "auto":
        if given not in INPUT_FORMATS:
            raise CorpusError(f"unknown input format {given!r}; choose one of {INPUT_FORMATS}")
        return given
    fmt = _SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise CorpusError(f"{path}: cannot tell the format from the name; use --input-format "
                          f"({', '.join(INPUT_FORMATS)}) or name it .txt, .jsonl or .parquet")
    return fmt


def _type_name(value) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", list: "a list", dict: "an object",
            str: "a string"}.get(type(value), f"a {type(value).__name__}")


class Source:
    """One input file. `records()` yields (local index, raw) cheaply; `parse(local, raw)` turns a
    raw record into (text, id) or raises RowError naming the file and line (or row)."""

    def __init__(self, path: str | os.PathLike, fmt: str, text_field: str = "text", id_field: str | None = "id",
                 id_required: bool = False):
        self.path = Path(path)
        self.fmt = fmt
        self.text_field, self.id_field, self.id_required = text_field, id_field, id_required
        self._parquet_id = None  # set by check() for Parquet: the id column if there is one

    # ---- checks and counts
    def check(self) -> None:
        p = self.path
        if not p.exists():
            raise RefusedError(f"input not found: {p}")
        if p.is_dir():
            raise RefusedError(f"input {p} is a folder; give the files inside it")
        if not os.access(p, os.R_OK):
            raise RefusedError(f"input {p} cannot be read (permissions)")
        if self.fmt == "parquet":
            self._check_parquet()
        elif self.fmt == "jsonl":
            with open(p, "rb") as f:
                first = f.readline(1 << 20).lstrip(_BOM).strip()
            try:
                json.loads(first)
                one_line = True
            except ValueError:
                one_line = False
            if first.startswith(b"[") and not one_line:
                raise CorpusError(f"{p}: this is a JSON array, not JSON Lines (one object per line); "
                                  "convert it, e.g. jq -c '.[]'")

    def _check_parquet(self):
        pa, pq = _need_pyarrow(f"reading {self.path}")
        try:
            schema = pq.read_schema(self.path)
        except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a non-Parquet file
            raise CorpusError(f"{self.path}: not a readable Parquet file ({e})") from None
        names = schema.names
        if self.text_field not in names:
            raise CorpusError(f"{self.path}: no column {self.text_field!r} (columns: {', '.join(names)}); "
                              "choose one with --text-field")

        def base(t):
            return t.value_type if pa.types.is_dictionary(t) else t

        t = base(schema.field(self.text_field).type)
        if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)
                or str(t) == "string_view"):
            raise CorpusError(f"{self.path}: column {self.text_field!r} holds {t}, not strings")
        self._parquet_id = None
        if self.id_field and self.id_field in names:
            it = base(schema.field(self.id_field).type)
            if not (pa.types.is_string(it) or pa.types.is_large_string(it) or pa.types.is_integer(it)
                    or pa.types.is_null(it) or str(it) == "string_view"):
                raise CorpusError(f"{self.path}: id column {self.id_field!r} holds {it}; "
                                  "ids must be strings or integers")
            self._parquet_id = self.id_field
        elif self.id_field and self.id_required:
            raise CorpusError(f"{self.path}: no id column {self.id_field!r} (columns: {', '.join(names)})")

    def count(self) -> int:
        """Rows in the file (lines for text and JSONL, a final line without newline included)."""
        if self.fmt == "parquet":
            _, pq = _need_pyarrow(f"reading {self.path}")
            return pq.ParquetFile(self.path).metadata.num_rows
        n, last = 0, b"\n"
        with open(self.path, "rb") as f:
            while chunk := f.read(1 << 22):
                n += chunk.count(b"\n")
                last = chunk[-1:]
        return n + (last != b"\n")

    def where(self, local: int) -> str:
        return f"{self.path}, row {local}" if self.fmt == "parquet" else f"{self.path}, line {local + 1}"

    # ---- records
    def records(self) -> Iterator[tuple[int, Any]]:
        if self.fmt == "parquet":
            yield from self._parquet_records()
            return
        with open(self.path, "rb") as f:
            for i, line in enumerate(f):
                if line.endswith(b"\n"):
                    line = line[:-2] if line.endswith(b"\r\n") else line[:-1]
                if i == 0 and line.startswith(_BOM):
                    line = line[len(_BOM):]
                yield i, line

    def _parquet_records(self):
        _, pq = _need_pyarrow(f"reading {self.path}")
        columns = [self.text_field] + ([self._parquet_id] if self._parquet_id else [])
        local = 0
        batches = pq.ParquetFile(self.path).iter_batches(batch_size=8192, columns=columns)
        while True:
            try:
                batch = next(batches, None)
            except Exception as e:  # a damaged page or row group: pyarrow's own error types
                raise CorpusError(f"{self.path}: cannot read the Parquet data after row {local} ({e})") from None
            if batch is None:
                return
            texts = batch.column(0).to_pylist()
            ids = batch.column(1).to_pylist() if self._parquet_id else [None] * len(texts)
            for t, i in zip(texts, ids):
                yield local, (t, i)
                local += 1

    @staticmethod
    def digest_bytes(raw) -> bytes:
        if isinstance(raw, bytes):
            return raw
        return json.dumps(list(raw), ensure_ascii=False).encode("utf-8")

    def parse(self, local: int, raw) -> tuple[str, str | None]:
        if self.fmt == "parquet":
            text, ident = raw
            if text is None:
                raise RowError(self.where(local), f"{self.text_field!r} is null")
            return text, (None if ident is None else str(ident))
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RowError(self.where(local), f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte "
                                              f"{e.start + 1} of the line)") from None
        if self.fmt == "text":
            return line, None
        if not line.strip():
            raise RowError(self.where(local), "blank line; expected a JSON object")
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise RowError(self.where(local), f"not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(rec, dict):
            hint = " (a JSON array file? JSON Lines holds one object per line)" \
                if local == 0 and isinstance(rec, list) else ""
            raise RowError(self.where(local), f"{_type_name(rec)} where a JSON object was expected{hint}")
        if self.text_field not in rec:
            fields = ", ".join(list(rec)[:8]) or "none"
            raise RowError(self.where(local), f"no field {self.text_field!r} (fields: {fields}); "
                                              "choose one with --text-field")
        text = rec[self.text_field]
        if not isinstance(text, str):
            raise RowError(self.where(local), f"field {self.text_field!r} is {_type_name(text)}, not a string")
        ident = None
        if self.id_field:
            if self.id_field in rec:
                value = rec[self.id_field]
                if isinstance(value, str):
                    ident = value
                elif isinstance(value, int) and not isinstance(value, bool):
                    ident = str(value)
                elif value is not None:
                    raise RowError(self.where(local), f"field {self.id_field!r} is {_type_name(value)}; "
                                                      "ids must be strings or integers")
            elif self.id_required:
                raise RowError(self.where(local), f"no id field {self.id_field!r}")
        return text, ident


def quick_input_info(src: Source) -> dict:
    st = src.path.stat()
    return {"path": str(src.path.resolve()), "format": src.fmt, "bytes": st.st_size}


# ================================================================================ atomic files
def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, sync_dir: bool = True) -> None:
    """Write `data` to `path` so that `path` is either the old file or all of the new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    if sync_dir:
        _fsync_dir(path.parent)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def meta_bytes(meta: dict[str, list], fmt: str) -> bytes:
    if fmt == "jsonl":
        keys = list(meta)
        rows = zip(*(meta[k] for k in keys))
        return "".join(json.dumps(dict(zip(keys, r)), ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    pa, pq = _need_pyarrow("--meta-format parquet")
    types = {"row": pa.int64(), "id": pa.string(), "tokens": pa.int32(), "truncated": pa.bool_(),
             "windows": pa.int32()}
    table = pa.table({k: pa.array(v, type=types[k]) for k, v in meta.items()})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def read_meta(path: Path) -> dict[str, list]:
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        keys = list(rows[0]) if rows else ["row", "id", "tokens", "truncated"]
        return {k: [r[k] for r in rows] for k in keys}
    _, pq = _need_pyarrow(f"reading {path}")
    return pq.read_table(path).to_pydict()


# ================================================================================ options and manifest
@dataclass
class EmbedOptions:
    inputs: list[str]
    output: str
    model: str = DEFAULT_MODEL
    revision: str | None = None
    input_format: str = "auto"
    text_field: str = "text"
    id_field: str | None = "id"
    id_required: bool = False
    prompt: str = ""
    prompt_name: str | None = None
    truncate_dim: int | None = None
    normalize: bool = True
    precision: str = "float32"
    calibration: str | None = None
    calibration_size: int = 1000
    long: str = "truncate"
    overlap: int | None = None
    shard_size: int = 10000
    meta_format: str | None = None  # None: parquet when pyarrow is installed, else jsonl
    on_error: str = "stop"
    max_batch_tokens: int | None = None
    device: str | None = None
    dtype: str | None = None
    local_files_only: bool | None = None
    progress: bool = True
    quiet: bool = False

    def validate(self) -> None:
        if not self.inputs:
            raise RefusedError("no input files given")
        Q.check_precision(self.precision)
        if self.long not in ("truncate", "chunk"):
            raise RefusedError(f"--long must be truncate or chunk, got {self.long!r}")
        if self.overlap is not None and self.long != "chunk":
            raise RefusedError("--overlap applies to --long chunk only")
        if self.overlap is not None and self.overlap < 0:
            raise RefusedError(f"--overlap must be >= 0, got {self.overlap}")
        if self.shard_size < 1:
            raise RefusedError(f"--shard-size must be >= 1, got {self.shard_size}")
        if self.on_error not in ON_ERROR:
            raise RefusedError(f"--on-error must be one of {ON_ERROR}, got {self.on_error!r}")
        if self.calibration and self.precision not in Q.SCALAR_PRECISIONS:
            raise RefusedError("--calibration applies to --precision int8 or uint8 only")
        if self.calibration_size < 1:
            raise RefusedError(f"--calibration-size must be >= 1, got {self.calibration_size}")
        if self.max_batch_tokens is not None and self.max_batch_tokens < 1:
            raise RefusedError(f"--max-batch-tokens must be >= 1, got {self.max_batch_tokens}")
        if self.meta_format is None:
            self.meta_format = "parquet" if have_pyarrow() else "jsonl"
        if self.meta_format not in META_FORMATS:
            raise RefusedError(f"--meta-format must be one of {META_FORMATS}, got {self.meta_format!r}")
        if self.meta_format == "parquet":
            _need_pyarrow("--meta-format parquet")


# Options that change what ends up in the folder: a rerun must give the same values.
_IDENTITY_OPTIONS = ("input_format", "text_field", "id_field", "prompt", "truncate_dim", "normalize",
                     "precision", "calibration_size", "long", "overlap", "shard_size", "meta_format")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


class Manifest:
    """manifest.json: the job's identity, its calibration, and the shards done so far."""

    def __init__(self, folder: Path, data: dict):
        self.folder, self.data = folder, data

    @property
    def path(self) -> Path:
        return self.folder / MANIFEST

    @classmethod
    def load(cls, folder: Path) -> "Manifest":
        path = folder / MANIFEST
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RefusedError(f"{path} cannot be read ({e}); not an output folder of this command") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise RefusedError(f"{path} is not a manifest of modernbert-embed")
        if data.get("version") != FORMAT_VERSION:
            raise RefusedError(f"{path} has format version {data.get('version')}; this program writes "
                               f"version {FORMAT_VERSION}")
        return cls(folder, data)

    def save(self) -> None:
        atomic_write(self.path, (json.dumps(self.data, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))

    @property
    def shards(self) -> dict[int, dict]:
        return {s["index"]: s for s in self.data.get("shards", [])}

    def add_shard(self, entry: dict) -> None:
        shards = self.shards
        shards[entry["index"]] = entry
        self.data["shards"] = [shards[k] for k in sorted(shards)]
        self.save()


def _differences(old: dict, new: dict, prefix="") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, prefix + k + ".")
        elif a != b:
            out.append(f"{prefix}{k}: {json.dumps(a)} in the folder, {json.dumps(b)} now")
    return out


# ================================================================================ the job
@dataclass
class Prepared:
    """One shard, read and tokenised, waiting for the model."""

    index: int
    start: int
    end: int
    digest: str
    rows: list[int] = field(default_factory=list)
    ids: list[str | None] = field(default_factory=list)
    seqs: list[list[int]] = field(default_factory=list)  # token ids (truncate) or windows (chunk)
    tokens: list[int] = field(default_factory=list)
    truncated: list[bool] = field(default_factory=list)
    windows: Any = None  # chunking.Windows in chunk mode
    skipped: list[dict] = field(default_factory=list)
    texts: list[str] | None = None  # parsed, not yet tokenised

    @property
    def num_docs(self) -> int:
        return len(self.rows)


@dataclass
class RunResult:
    documents: int = 0  # embedded by this run
    skipped: int = 0
    tokens: int = 0  # tokens through the model in this run
    seconds: float = 0.0
    shards_written: int = 0
    already_complete: bool = False
    total_documents: int = 0
    total_rows: int = 0
    device: str = ""
    load_seconds: float = 0.0
    calibration_seconds: float = 0.0

    @property
    def docs_per_s(self) -> float:
        return self.documents / self.seconds if self.seconds > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        if self.already_complete:
            return (f"nothing to do: the output is already complete ({self.total_documents} documents "
                    f"of {self.total_rows} rows)")
        skipped = f" ({self.skipped} rows skipped)" if self.skipped else ""
        return (f"embedded {self.documents} documents{skipped}, {self.tokens} tokens in {self.seconds:.2f} s: "
                f"{self.docs_per_s:.1f} documents/s, {self.tokens_per_s:.0f} tokens/s on {self.device}")


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


class CorpusJob:
    """Runs `modernbert-embed embed`: see the module docstring for the folder and its rules."""

    def __init__(self, opts: EmbedOptions, embedder=None, log=None):
        opts.validate()
        self.opts = opts
        self.out = Path(opts.output)
        self._embedder = embedder
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        for p in opts.inputs:
            if not Path(p).exists():
                raise RefusedError(f"input not found: {p}")
            if Path(p).is_dir():
                raise RefusedError(f"input {p} is a folder; give the files inside it")
        self.sources = [Source(p, detect_format(Path(p), opts.input_format), opts.text_field, opts.id_field,
                               opts.id_required) for p in opts.inputs]

    # ---------------------------------------------------------------- set-up
    def _load_model(self):
        if self._embedder is not None:
            return self._embedder
        from .api import Embedder

        self._embedder = Embedder.from_pretrained(self.opts.model, device=self.opts.device, dtype=self.opts.dtype,
                                                  revision=self.opts.revision,
                                                  local_files_only=self.opts.local_files_only)
        return self._embedder

    def _model_record(self, emb) -> dict:
        ckpt = emb.checkpoint
        if ckpt is None:
            raise RefusedError("the corpus command needs an Embedder loaded from a checkpoint folder "
                               "(Embedder.from_pretrained or from_checkpoint)")
        return {
            "name": self.opts.model,
            "revision": self.opts.revision or ckpt.revision,
            "fingerprint": ckpt.fingerprint,
            "embedding_dim": emb.config.hidden_size,
            "max_seq_length": emb.max_seq_length,
            "pooling": emb.pooling,
            "dtype": str(emb.dtype).removeprefix("torch."),
        }

    def _identity_options(self) -> dict:
        o = asdict(self.opts)
        return {k: o[k] for k in _IDENTITY_OPTIONS}

    def _refuse(self, diffs: list[str]) -> None:
        if diffs:
            raise RefusedError(f"{self.out} holds the output of a different job; refusing to mix them.\n  "
                               + "\n  ".join(diffs)
                               + f"\nUse another output folder, or delete {self.out} to start over.")

    def _open_folder(self) -> Manifest | None:
        """The existing manifest, its options and inputs checked against this run (before the model
        is loaded); None for a new or empty folder. A folder of anything else is refused."""
        out = self.out
        if (out / MANIFEST).is_file():
            m = Manifest.load(out)
            diffs = _differences({"options": m.data["options"]}, {"options": self._identity_options()})
            old_inputs = [(i["path"], i["format"]) for i in m.data["inputs"]]
            new_inputs = [(str(s.path.resolve()), s.fmt) for s in self.sources]
            if old_inputs != new_inputs:
                diffs.append(f"inputs: {[p for p, _ in old_inputs]} in the folder, {[p for p, _ in new_inputs]} now")
            self._refuse(diffs)
            return m
        if out.exists():
            if not out.is_dir():
                raise RefusedError(f"output {out} exists and is not a folder")
            if any(p.name != LOCK for p in out.iterdir()):
                raise RefusedError(f"output folder {out} is not empty and has no {MANIFEST}: it is not an "
                                   "output of this command; give a new or empty folder")
        return None

    def _prepare_folder(self, m: Manifest | None, model: dict) -> Manifest:
        """Check the model against an existing manifest, or start a new one."""
        inputs = [quick_input_info(s) for s in self.sources]
        if m is not None:
            # The name and revision as given are notes: the fingerprint is what must match
            # (a local copy of the same weights, or the same folder by another path, is the same model).
            notes = ("name", "revision")
            self._refuse(_differences({"model": {k: v for k, v in m.data["model"].items() if k not in notes}},
                                      {"model": {k: v for k, v in model.items() if k not in notes}}))
            m.data["model"].update({k: model[k] for k in notes})
            m.data["inputs"] = inputs
            return m
        self.out.mkdir(parents=True, exist_ok=True)
        m = Manifest(self.out, {
            "format": FORMAT_NAME, "version": FORMAT_VERSION, "created": _now(), "complete": False,
            "model": model, "options": self._identity_options(), "inputs": inputs, "calibration": None,
            "embeddings": None, "totals": None, "shards": [], "runs": [],
        })
        m.save()
        return m

    def _lock(self) -> None:
        """Hold an exclusive lock on the folder for the life of this process (released by the OS
        when it ends, however it ends), so that two runs never write into one folder."""
        self.out.mkdir(parents=True, exist_ok=True)
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return
        f = open(self.out / LOCK, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            raise RefusedError(f"another modernbert-embed is writing into {self.out}; wait for it to "
                               "finish (or stop it) before running this command there") from None
        self._lock_file = f  # kept open: closing it would release the lock

    def _clean_temporaries(self) -> None:
        for p in self.out.glob(".*.tmp-*"):
            try:
                p.unlink()
            except OSError:
                pass

    def _verify_done(self, m: Manifest) -> dict[int, dict]:
        """Recorded shards whose files are intact; a missing or damaged one is dropped (redone)."""
        good = {}
        for k, s in m.shards.items():
            ok = True
            for f in s["files"].values():
                p = self.out / f["name"]
                if not p.is_file() or p.stat().st_size != f["bytes"] or sha256_file(p) != f["sha256"]:
                    self.log(f"warning: {p} is missing or damaged; shard {k} will be embedded again")
                    ok = False
                    break
            if ok:
                good[k] = s
        if len(good) != len(m.shards):
            m.data["shards"] = [good[k] for k in sorted(good)]
            m.save()
        return good

    # ---------------------------------------------------------------- reading
    def _records(self) -> Iterator[tuple[int, Source, int, Any]]:
        row = 0
        for src in self.sources:
            for local, raw in src.records():
                yield row, src, local, raw
                row += 1

    def _parse_into(self, prep: Prepared, texts: list[str], row: int, src: Source, local: int, raw) -> None:
        try:
            text, ident = src.parse(local, raw)
        except RowError as e:
            if self.opts.on_error == "stop":
                raise
            prep.skipped.append({"row": row, "where": e.where, "error": e.reason})
            return
        prep.rows.append(row)
        prep.ids.append(ident)
        texts.append(text)

    def _tokenize(self, prep: Prepared, texts: list[str]) -> None:
        emb = self._embedder
        if self.opts.long == "chunk":
            from .chunking import split_long

            w = split_long(emb.tokenizer, texts, self.opts.prompt, emb.max_seq_length, self.opts.overlap)
            prep.windows, prep.seqs = w, w.ids
            prep.tokens, prep.truncated = w.doc_tokens, [False] * len(texts)
        else:
            ids, truncated = emb.tokenize(texts, self.opts.prompt) if texts else ([], [])
            prep.seqs, prep.tokens, prep.truncated = ids, [len(s) for s in ids], list(truncated)

    def _shards(self, done: dict[int, dict], total: int, stop: threading.Event) -> Iterator[Prepared]:
        """Read every row once, in order; check the rows of finished shards against their recorded
        digest; parse and tokenise the rest into Prepared shards."""
        S = self.opts.shard_size
        it = self._records()
        for k in range(-(-total // S)):
            if stop.is_set():
                return
            start, end = k * S, min((k + 1) * S, total)
            h = hashlib.sha256()
            prep = Prepared(k, start, end, "")
            texts: list[str] = []
            for row in range(start, end):
                try:
                    r, src, local, raw = next(it)
                except StopIteration:
                    raise CorpusError(f"the inputs ended at row {row}, but {total} rows were counted: "
                                      "did a file change while it was being read?") from None
                b = Source.digest_bytes(raw)
                h.update(len(b).to_bytes(8, "little"))
                h.update(b)
                if k not in done:
                    self._parse_into(prep, texts, r, src, local, raw)
            prep.digest = h.hexdigest()
            if k in done:
                if done[k]["rows"] != [start, end] or done[k]["input_sha256"] != prep.digest:
                    raise RefusedError(
                        f"the input rows {start}..{end - 1} of shard {k} differ from the ones embedded "
                        f"into {self.out}: the inputs changed. Use another output folder, or delete "
                        f"{self.out} to start over.")
                continue
            if self._embedder.tokenize_beside_model:
                self._tokenize(prep, texts)
            else:
                prep.texts = texts
            yield prep
        if next(it, None) is not None:
            raise CorpusError(f"the inputs hold more than the {total} rows counted: did a file change "
                              "while it was being read?")

    # ---------------------------------------------------------------- calibration
    def _calibrate(self, m: Manifest, total: int) -> np.ndarray | None:
        if self.opts.precision not in Q.SCALAR_PRECISIONS:
            return None
        given = None
        if self.opts.calibration:
            try:
                given, info = Q.load_calibration(self.opts.calibration)
            except (OSError, ValueError) as e:
                raise RefusedError(f"--calibration: {e}") from None
            dim = self.opts.truncate_dim or m.data["model"]["embedding_dim"]
            if given.shape[1] != dim:
                raise RefusedError(f"--calibration {self.opts.calibration}: ranges for {given.shape[1]} "
                                   f"dimensions, but this job writes {dim}")
        cal = m.data.get("calibration")
        if cal is not None:
            ranges = Q.check_ranges([cal["min"], cal["max"]])
            if given is not None and not np.array_equal(given, ranges):
                raise RefusedError(f"--calibration {self.opts.calibration} differs from the ranges that "
                                   f"{self.out} was quantised with (in its {MANIFEST})")
            return ranges
        t0 = time.perf_counter()
        if given is not None:
            ranges, source = given, {"source": "file", "file": str(Path(self.opts.calibration).resolve())}
        else:
            ranges, source = self._calibration_from_sample(total)
        m.data["calibration"] = {"precision": self.opts.precision, **source,
                                 "min": ranges[0].tolist(), "max": ranges[1].tolist()}
        Q.save_calibration(self.out / CALIBRATION, ranges, model=m.data["model"]["name"],
                           fingerprint=m.data["model"]["fingerprint"], **source)
        m.save()
        self._calibration_seconds = time.perf_counter() - t0
        return ranges

    def _calibration_from_sample(self, total: int):
        n = min(self.opts.calibration_size, total)
        want = {(i * total) // n for i in range(n)}  # evenly spread over the corpus
        prep = Prepared(-1, 0, total, "")
        texts: list[str] = []
        for row, src, local, raw in self._records():
            if row in want:
                try:
                    text, _ = src.parse(local, raw)
                except RowError:
                    continue  # reported (or skipped) where the row's shard is embedded
                prep.rows.append(row)
                texts.append(text)
        if not texts:
            raise CorpusError("no readable rows to calibrate int8/uint8 with")
        self._tokenize(prep, texts)
        if not self.opts.quiet:
            self.log(f"calibrating {self.opts.precision} ranges on {len(texts)} documents spread over the input")
        emb = self._embed(prep, progress=None)
        return Q.calibration_ranges(emb), {"source": "sample", "rows": len(texts)}

    # ---------------------------------------------------------------- embedding
    def _embed(self, prep: Prepared, progress) -> np.ndarray:
        """float32 embeddings [docs, dim] of one prepared shard, batch by batch as Embedder.encode
        would plan them, reporting progress as batches finish."""
        import torch

        from .batching import DEFAULT_MAX_BATCH_TOKENS

        emb = self._embedder
        o = self.opts
        mbt = o.max_batch_tokens or DEFAULT_MAX_BATCH_TOKENS
        dim = o.truncate_dim or emb.config.hidden_size
        seqs = prep.seqs
        done_seqs = 0

        def on_done(n, tokens):
            nonlocal done_seqs
            done_seqs += n
            if progress is not None:
                progress(done_seqs, len(seqs), tokens)

        out = emb.engine.embed(seqs, dim=dim, normalize=o.normalize, max_batch_tokens=mbt, on_batch=on_done)
        if prep.windows is not None:
            from .chunking import combine

            w = prep.windows
            out = combine(out, w.owner, w.content_tokens, w.num_docs, o.normalize)
        return out.cpu().numpy()

    # ---------------------------------------------------------------- writing
    def _write_shard(self, m: Manifest, prep: Prepared, floats: np.ndarray, ranges) -> dict:
        o = self.opts
        dim = o.truncate_dim or m.data["model"]["embedding_dim"]
        if floats.shape[0] == 0:
            codes = np.empty((0, Q.output_width(o.precision, dim)), dtype=Q.output_dtype(o.precision))
        else:
            codes = Q.quantize_embeddings(floats, o.precision, ranges=ranges)
        name = shard_name(prep.index)
        meta = {"row": prep.rows, "id": prep.ids, "tokens": prep.tokens, "truncated": prep.truncated}
        if o.long == "chunk":
            meta["windows"] = prep.windows.doc_windows
        files = {}
        for kind, fname, data in (("embeddings", f"{name}.npy", npy_bytes(codes)),
                                  ("meta", f"{name}.meta.{o.meta_format}", meta_bytes(meta, o.meta_format))):
            atomic_write(self.out / fname, data, sync_dir=False)
            files[kind] = {"name": fname, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        _fsync_dir(self.out)
        entry = {
            "index": prep.index, "rows": [prep.start, prep.end], "documents": prep.num_docs,
            "skipped": prep.skipped, "tokens": int(sum(prep.tokens)),
            "truncated": int(sum(prep.truncated)), "input_sha256": prep.digest, "files": files,
        }
        if o.long == "chunk":
            entry["windows"] = len(prep.seqs)
        m.add_shard(entry)
        return entry

    # ---------------------------------------------------------------- the run
    def run(self) -> RunResult:
        try:
            return self._run()
        finally:
            f = getattr(self, "_lock_file", None)
            if f is not None:
                f.close()  # releases the lock
                self._lock_file = None

    def _run(self) -> RunResult:
        from .batching import DEFAULT_MAX_BATCH_TOKENS

        o = self.opts
        for s in self.sources:
            s.check()
        counts = [s.count() for s in self.sources]
        total = sum(counts)
        empty = [str(s.path) for s, c in zip(self.sources, counts) if c == 0]
        if total == 0:
            raise CorpusError(f"no documents to embed: {', '.join(empty)} "
                              f"{'is' if len(empty) == 1 else 'are'} empty")
        if empty and o.on_error == "stop":
            raise CorpusError(f"{empty[0]}: empty input (no documents); remove it, or pass --on-error skip "
                              "to go on without it")

        existing = self._open_folder()
        self._lock()
        t_load = time.perf_counter()
        emb = self._load_model()
        if o.truncate_dim is not None and not 1 <= o.truncate_dim <= emb.config.hidden_size:
            raise RefusedError(f"--truncate-dim must be in 1..{emb.config.hidden_size}, got {o.truncate_dim}")
        if emb.tokenizer is None:
            raise RefusedError(f"the model {o.model} has no tokenizer.json; the corpus command needs one")
        model = self._model_record(emb)
        load_seconds = time.perf_counter() - t_load
        result = RunResult(device=self._device_name(emb), load_seconds=load_seconds)

        m = self._prepare_folder(existing, model)
        self._clean_temporaries()
        for (info, c) in zip(m.data["inputs"], counts):
            info["rows"] = c
        if empty:
            m.data["empty_inputs"] = empty
        was_complete = bool(m.data.get("complete"))
        m.data["complete"] = False  # until every shard is checked (a rerun also re-reads the inputs)
        m.data["embeddings"] = {"precision": o.precision, "dtype": str(Q.output_dtype(o.precision)),
                                "width": Q.output_width(o.precision, o.truncate_dim or model["embedding_dim"]),
                                "dim": o.truncate_dim or model["embedding_dim"],
                                "packed_bits": o.precision in Q.BINARY_PRECISIONS,
                                "normalized": o.normalize}
        m.save()
        done = self._verify_done(m)
        S = o.shard_size
        for k, s in sorted(done.items()):
            if s["rows"] != [k * S, min((k + 1) * S, total)]:
                raise RefusedError(f"shard {k} of {self.out} holds rows {s['rows'][0]}..{s['rows'][1] - 1}, "
                                   f"which does not fit the {total} rows the inputs have now: the inputs "
                                   f"changed. Use another output folder, or delete {self.out} to start over.")

        self._calibration_seconds = 0.0
        ranges = self._calibrate(m, total)
        result.calibration_seconds = self._calibration_seconds

        already = sum(s["rows"][1] - s["rows"][0] for s in done.values())
        started = _now()
        t0 = time.perf_counter()
        self._run_shards(m, done, total, ranges, result, already)
        result.seconds = time.perf_counter() - t0
        if was_complete and result.shards_written == 0:
            result.already_complete = True

        shards = m.shards
        n_shards = -(-total // o.shard_size)
        if sorted(shards) != list(range(n_shards)):
            raise CorpusError(f"internal error: shards {sorted(shards)} recorded, {n_shards} expected")
        documents = sum(s["documents"] for s in shards.values())
        skipped = sum(len(s["skipped"]) for s in shards.values())
        if documents + skipped != total:
            raise CorpusError(f"internal error: {documents} documents + {skipped} skipped != {total} rows")
        m.data["totals"] = {
            "rows": total, "documents": documents, "skipped": skipped, "shards": n_shards,
            "tokens": sum(s["tokens"] for s in shards.values()),
            "truncated": sum(s["truncated"] for s in shards.values()),
        }
        m.data["complete"] = True
        if result.shards_written:
            m.data["runs"].append({
                "started": started, "seconds": round(result.seconds, 3), "documents": result.documents,
                "skipped": result.skipped, "tokens": result.tokens, "shards_written": result.shards_written,
                "documents_per_s": round(result.docs_per_s, 2), "tokens_per_s": round(result.tokens_per_s, 1),
                "device": result.device, "on_error": o.on_error,
                "max_batch_tokens": o.max_batch_tokens or DEFAULT_MAX_BATCH_TOKENS,
                "load_seconds": round(load_seconds, 3),
                "calibration_seconds": round(result.calibration_seconds, 3),
            })
        m.save()
        result.total_documents, result.total_rows = documents, total
        return result

    @staticmethod
    def _device_name(emb) -> str:
        dev = str(emb.device)
        if emb.device.type == "cuda":
            import torch

            dev += f" ({torch.cuda.get_device_name(emb.device)})"
        return f"{dev}, {str(emb.dtype).removeprefix('torch.')}"

    def _run_shards(self, m: Manifest, done: dict, total: int, ranges, result: RunResult, already: int) -> None:
        """Three stages in step: a reader thread parses and tokenises the next shard, this thread
        runs the model, a writer thread quantises, writes and records the previous shard."""
        stop = threading.Event()
        ready: queue.Queue = queue.Queue(maxsize=2)
        written: queue.Queue = queue.Queue(maxsize=2)
        errors: list[BaseException] = []

        def reader():
            try:
                for prep in self._shards(done, total, stop):
                    while not stop.is_set():
                        try:
                            ready.put(prep, timeout=0.1)
                            break
                        except queue.Full:
                            pass
            except BaseException as e:  # handed to the main thread
                ready.put(e)
                return
            ready.put(None)

        def writer():
            while True:
                item = written.get()
                if item is None:
                    return
                prep, floats = item
                try:
                    if not errors:
                        self._write_shard(m, prep, floats, ranges)
                        result.shards_written += 1
                except BaseException as e:
                    errors.append(e)
                    stop.set()

        # On a GPU the reader thread tokenises ahead while the GPU computes; on the CPU the model
        # already keeps every core busy, and a tokeniser running alongside only gets in its way.
        bar = self._bar(total, already)
        t0 = time.perf_counter()
        threads = [threading.Thread(target=reader, daemon=True, name="corpus-reader"),
                   threading.Thread(target=writer, daemon=True, name="corpus-writer")]
        for t in threads:
            t.start()
        try:
            while True:
                item = ready.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                if errors:
                    break
                prep = item
                base_docs = bar.n if bar is not None else 0

                def progress(done_seqs, n_seqs, tokens, prep=prep, base=base_docs):
                    result.tokens += tokens
                    if bar is not None:
                        docs = prep.num_docs * done_seqs // max(n_seqs, 1)
                        bar.update(base + docs - bar.n)
                        self._postfix(bar, result, t0)

                if prep.texts is not None:
                    self._tokenize(prep, prep.texts)
                    prep.texts = None
                floats = self._embed(prep, progress)
                result.documents += prep.num_docs
                result.skipped += len(prep.skipped)
                if bar is not None:  # skipped rows count as handled
                    bar.update(base_docs + prep.end - prep.start - bar.n)
                    self._postfix(bar, result, t0)
                written.put((prep, floats))
        finally:
            stop.set()
            written.put(None)
            threads[1].join()
            if bar is not None:
                bar.close()
        if errors:
            raise errors[0]

    def _bar(self, total: int, already: int):
        if not self.opts.progress or self.opts.quiet:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=already, unit="doc", desc="embedding", dynamic_ncols=True,
                    smoothing=0.1, file=sys.stderr)

    @staticmethod
    def _postfix(bar, result: RunResult, t0: float) -> None:
        dt = max(time.perf_counter() - t0, 1e-9)
        bar.set_postfix_str(f"{result.tokens / dt:,.0f} tok/s", refresh=False)


# ================================================================================ reading an output
@dataclass
class CorpusOutput:
    embeddings: np.ndarray
    meta: dict[str, list]
    manifest: dict

    @property
    def ranges(self) -> np.ndarray | None:
        cal = self.manifest.get("calibration")
        return None if cal is None else Q.check_ranges([cal["min"], cal["max"]])


def read_output(folder: str | os.PathLike, verify: bool = True, allow_incomplete: bool = False) -> CorpusOutput:
    """All shards of an output folder concatenated in row order, with their metadata columns.
    verify: check every file's checksum and the counts against the manifest."""
    folder = Path(folder)
    m = Manifest.load(folder)
    if not m.data.get("complete") and not allow_incomplete:
        raise CorpusError(f"{folder} is not complete; rerun the command that made it to finish it")
    arrays, meta = [], {}
    for s in m.data["shards"]:
        files = s["files"]
        for f in files.values():
            p = folder / f["name"]
            if verify and (not p.is_file() or sha256_file(p) != f["sha256"]):
                raise CorpusError(f"{p} is missing or does not match its checksum in {MANIFEST}")
        arr = np.load(folder / files["embeddings"]["name"], allow_pickle=False)
        part = read_meta(folder / files["meta"]["name"])
        if verify and (arr.shape[0] != s["documents"] or len(part.get("row", [])) != s["documents"]):
            raise CorpusError(f"shard {s['index']}: {arr.shape[0]} embeddings, {len(part.get('row', []))} "
                              f"metadata rows, {s['documents']} documents in the manifest")
        arrays.append(arr)
        for k, v in part.items():
            meta.setdefault(k, []).extend(v)
    info = m.data.get("embeddings") or {}
    if arrays:
        emb = np.concatenate(arrays)
    else:
        emb = np.empty((0, info.get("width", 0)), dtype=info.get("dtype", "float32"))
    return CorpusOutput(emb, meta, m.data)


def verify_output(folder: str | os.PathLike) -> str:
    """Check an output folder (files, checksums, counts); a one-line report, or CorpusError."""
    out = read_output(folder, verify=True)
    t = out.manifest["totals"]
    return (f"{folder}: complete, {t['documents']} documents + {t['skipped']} skipped = {t['rows']} rows in "
            f"{t['shards']} shards; embeddings {list(out.embeddings.shape)} {out.embeddings.dtype}; checksums ok")


__all__ = ["CorpusJob", "EmbedOptions", "CorpusError", "RefusedError", "RowError", "Source", "Manifest",
           "read_output", "verify_output", "RunResult"]
