"""Files of an output folder: atomic writes, checksums, and the bytes of shard files.

A file is written to a temporary name, synced and renamed over its final name, so that a reader
(or a crash) sees the old file or all of the new one, never part of it. Temporaries are named
`.NAME.tmp-PID`, so that a later run can find and remove the debris of a killed one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np

from .sources import need_pyarrow

META_FORMATS = ("parquet", "jsonl")


def fsync_dir(folder: Path) -> None:
    """Make the names in `folder` durable (a rename is not, until its folder is synced)."""
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
    """Write `data` to `path` so that `path` is either the old file or all of the new one. On a
    failure (a full disk) the temporary is removed and the OSError, naming `path`, propagates."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        if e.filename is None or Path(e.filename) == tmp:
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
        raise
    if sync_dir:
        fsync_dir(path.parent)


def remove_temporaries(folder: Path) -> None:
    """Remove the temporaries a killed run left behind."""
    for p in folder.glob(".*.tmp-*"):
        try:
            p.unlink()
        except OSError:
            pass


def sha256_file(path: Path) -> str:
    """sha256 of a file, read piece by piece into one small buffer (bounded memory)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def meta_bytes(meta: dict[str, list], fmt: str) -> bytes:
    """The row-aligned metadata of one shard as a Parquet (zstd) or JSON Lines file."""
    if fmt == "jsonl":
        keys = list(meta)
        rows = zip(*(meta[k] for k in keys))
        return "".join(json.dumps(dict(zip(keys, r)), ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    pa, pq = need_pyarrow("--meta-format parquet")
    types = {"row": pa.int64(), "id": pa.string(), "tokens": pa.int32(), "truncated": pa.bool_(),
             "windows": pa.int32()}
    table = pa.table({k: pa.array(v, type=types[k]) for k, v in meta.items()})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def read_meta(path: Path) -> dict[str, list]:
    """One shard's metadata columns as lists."""
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        keys = list(rows[0]) if rows else ["row", "id", "tokens", "truncated"]
        return {k: [r[k] for r in rows] for k in keys}
    _, pq = need_pyarrow(f"reading {path}")
    return pq.read_table(path).to_pydict()


def file_record(name: str, data: bytes) -> dict:
    """What the manifest records of a written file: its name, size and sha256."""
    return {"name": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def file_matches(folder: Path, record: dict) -> bool:
    """Whether the file a record names is there with its recorded size and checksum."""
    p = folder / record["name"]
    return p.is_file() and p.stat().st_size == record["bytes"] and sha256_file(p) == record["sha256"]


__all__ = ["atomic_write", "fsync_dir", "remove_temporaries", "sha256_file", "npy_bytes", "meta_bytes",
           "read_meta", "file_record", "file_matches", "META_FORMATS"]
