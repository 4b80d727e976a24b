"""Input files: which format a file is in, its rows, and each row parsed into (text, id).

Three formats: plain text (one document a line, blank lines included), JSON Lines (one object a
line) and Parquet (a string column). A file is checked once, when it is opened (`Source.open`):
that it exists, is a readable file, and has the shape its format needs. A row that cannot be
embedded raises `RowError` naming the file and line (or Parquet row) when it is parsed.

With a `text_pair_field` (a cross-encoder's pairs, JSON Lines or Parquet), each row is a pair of
texts: `parse` gives ((text, text_pair), id).
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

from .errors import CorpusError, RefusedError, RowError

INPUT_FORMATS = ("text", "jsonl", "parquet")
_SUFFIXES = {".txt": "text", ".text": "text", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl",
             ".parquet": "parquet", ".pq": "parquet"}
_BOM = b"\xef\xbb\xbf"


def have_pyarrow() -> bool:
    try:
        importlib.import_module("pyarrow.parquet")
    except ImportError:
        return False
    return True


def need_pyarrow(why: str):
    """(pyarrow, pyarrow.parquet), or a CorpusError saying how to install it."""
    if not have_pyarrow():
        raise CorpusError(f"{why} needs pyarrow: pip install 'modernbert-embed[parquet]' (or pyarrow)")
    import pyarrow
    import pyarrow.parquet

    return pyarrow, pyarrow.parquet


def detect_format(path: Path, given: str | None = None) -> str:
    """`given` when it names a format, else the format the file's suffix says."""
    if given and given != "auto":
        if given not in INPUT_FORMATS:
            raise RefusedError(f"unknown input format {given!r}; choose one of {INPUT_FORMATS}")
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
    """One input file, checked. `records()` yields (local index, raw) cheaply; `parse(local, raw)`
    turns a raw record into (text, id) or raises RowError naming the file and line (or row)."""

    def __init__(self, path: Path, fmt: str, text_field: str = "text", id_field: str | None = "id",
                 id_required: bool = False, text_pair_field: str | None = None):
        self.path = Path(path)
        self.fmt = fmt
        self.text_field, self.id_field, self.id_required = text_field, id_field, id_required
        self.text_pair_field = text_pair_field
        self._parquet_id = None  # the Parquet id column, when the file has one

    @classmethod
    def open(cls, path: str | os.PathLike, given_format: str | None = "auto", text_field: str = "text",
             id_field: str | None = "id", id_required: bool = False,
             text_pair_field: str | None = None) -> "Source":
        """The file at `path`, checked: it exists, is a readable file, and its format's shape is
        right (a Parquet text column of strings; JSON Lines, not a JSON array)."""
        p = Path(path)
        if not p.exists():
            raise RefusedError(f"input not found: {p}")
        if p.is_dir():
            raise RefusedError(f"input {p} is a folder; give the files inside it")
        if not os.access(p, os.R_OK):
            raise RefusedError(f"input {p} cannot be read (permissions)")
        src = cls(p, detect_format(p, given_format), text_field, id_field, id_required, text_pair_field)
        if text_pair_field is not None and src.fmt == "text":
            raise RefusedError(f"{p}: --text-pair-field needs JSON Lines or Parquet input; a text file has "
                               "one document a line, not pairs")
        if src.fmt == "parquet":
            src._check_parquet()
        elif src.fmt == "jsonl":
            src._check_jsonl()
        return src

    def _check_jsonl(self) -> None:
        with open(self.path, "rb") as f:
            first = f.readline(1 << 20).lstrip(_BOM).strip()
        try:
            json.loads(first)
            one_line = True
        except ValueError:
            one_line = False
        if first.startswith(b"[") and not one_line:
            raise CorpusError(f"{self.path}: this is a JSON array, not JSON Lines (one object per line); "
                              "convert it, e.g. jq -c '.[]'")

    def _check_parquet(self) -> None:
        pa, pq = need_pyarrow(f"reading {self.path}")
        try:
            schema = pq.read_schema(self.path)
        except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a non-Parquet file
            raise CorpusError(f"{self.path}: not a readable Parquet file ({e})") from None
        names = schema.names

        def base(t):
            return t.value_type if pa.types.is_dictionary(t) else t

        for field, flag in ((self.text_field, "--text-field"), (self.text_pair_field, "--text-pair-field")):
            if field is None:
                continue
            if field not in names:
                raise CorpusError(f"{self.path}: no column {field!r} (columns: {', '.join(names)}); "
                                  f"choose one with {flag}")
            t = base(schema.field(field).type)
            if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)
                    or str(t) == "string_view"):
                raise CorpusError(f"{self.path}: column {field!r} holds {t}, not strings")
        if self.id_field and self.id_field in names:
            it = base(schema.field(self.id_field).type)
            if not (pa.types.is_string(it) or pa.types.is_large_string(it) or pa.types.is_integer(it)
                    or pa.types.is_null(it) or str(it) == "string_view"):
                raise CorpusError(f"{self.path}: id column {self.id_field!r} holds {it}; "
                                  "ids must be strings or integers")
            self._parquet_id = self.id_field
        elif self.id_field and self.id_required:
            raise CorpusError(f"{self.path}: no id column {self.id_field!r} (columns: {', '.join(names)})")

    # ---- counts and names
    def count(self) -> int:
        """Rows in the file (lines for text and JSONL, a final line without newline included)."""
        if self.fmt == "parquet":
            _, pq = need_pyarrow(f"reading {self.path}")
            return pq.ParquetFile(self.path).metadata.num_rows
        n, last = 0, b"\n"
        with open(self.path, "rb") as f:
            while chunk := f.read(1 << 22):
                n += chunk.count(b"\n")
                last = chunk[-1:]
        return n + (last != b"\n")

    def where(self, local: int) -> str:
        return f"{self.path}, row {local}" if self.fmt == "parquet" else f"{self.path}, line {local + 1}"

    def info(self) -> dict:
        """What the manifest records of this input (its row count is added by the job)."""
        return {"path": str(self.path.resolve()), "format": self.fmt, "bytes": self.path.stat().st_size}

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
        _, pq = need_pyarrow(f"reading {self.path}")
        pair = self.text_pair_field is not None
        columns = [self.text_field] + ([self.text_pair_field] if pair else []) + \
            ([self._parquet_id] if self._parquet_id else [])
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
            ids = batch.column(len(columns) - 1).to_pylist() if self._parquet_id else [None] * len(texts)
            if pair:  # (text, text_pair, id)
                for t, b, i in zip(texts, batch.column(1).to_pylist(), ids):
                    yield local, (t, b, i)
                    local += 1
                continue
            for t, i in zip(texts, ids):
                yield local, (t, i)
                local += 1

    @staticmethod
    def digest_bytes(raw) -> bytes:
        """The bytes of a raw record that its shard's input digest covers."""
        if isinstance(raw, bytes):
            return raw
        return json.dumps(list(raw), ensure_ascii=False).encode("utf-8")

    def parse(self, local: int, raw) -> tuple[str | tuple[str, str], str | None]:
        """(text, id), or with a `text_pair_field` ((text, text_pair), id)."""
        if self.fmt == "parquet":
            if self.text_pair_field is not None:
                text, pair, ident = raw
                for value, field in ((text, self.text_field), (pair, self.text_pair_field)):
                    if value is None:
                        raise RowError(self.where(local), f"{field!r} is null")
                return (text, pair), (None if ident is None else str(ident))
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
        text = self._field(local, rec, self.text_field, "--text-field")
        if self.text_pair_field is not None:
            text = (text, self._field(local, rec, self.text_pair_field, "--text-pair-field"))
        return text, self._parse_id(local, rec)

    def _field(self, local: int, rec: dict, name: str, flag: str) -> str:
        if name not in rec:
            fields = ", ".join(list(rec)[:8]) or "none"
            raise RowError(self.where(local), f"no field {name!r} (fields: {fields}); choose one with {flag}")
        text = rec[name]
        if not isinstance(text, str):
            raise RowError(self.where(local), f"field {name!r} is {_type_name(text)}, not a string")
        return text

    def _parse_id(self, local: int, rec: dict) -> str | None:
        if not self.id_field:
            return None
        if self.id_field not in rec:
            if self.id_required:
                raise RowError(self.where(local), f"no id field {self.id_field!r}")
            return None
        value = rec[self.id_field]
        if isinstance(value, str):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        if value is not None:
            raise RowError(self.where(local), f"field {self.id_field!r} is {_type_name(value)}; "
                                              "ids must be strings or integers")
        return None


class Rows:
    """The rows of all inputs one after the other, in global row order: `next()` gives
    (row, source, local index, raw); `position` is the row it gives next."""

    def __init__(self, sources: list[Source]):
        self._it = self._chain(sources)
        self.position = 0

    @staticmethod
    def _chain(sources):
        for src in sources:
            for local, raw in src.records():
                yield src, local, raw

    def next(self) -> tuple[int, Source, int, Any] | None:
        """The next row, or None after the last one."""
        item = next(self._it, None)
        if item is None:
            return None
        row = self.position
        self.position += 1
        return (row, *item)

    def take(self, row: int) -> tuple[int, Source, int, Any]:
        """Row `row` (>= position), skipping the rows before it; a CorpusError when the inputs end
        first (a file shrank since it was counted)."""
        if row < self.position:
            raise ValueError(f"row {row} was read already (the next row is {self.position})")
        while True:
            item = self.next()
            if item is None:
                raise CorpusError(f"the inputs ended at row {self.position}, but more rows were counted: "
                                  "did a file change while it was being read?")
            if item[0] == row:
                return item


__all__ = ["Source", "Rows", "detect_format", "have_pyarrow", "need_pyarrow", "INPUT_FORMATS"]
