"""What the corpus-command tests share: one small random checkpoint with the real tokenizer
(max_seq_length 48, so that truncation and chunking show on short texts), ONE Embedder loaded
from it for the whole session, input writers, `cli`, which runs the command in this process
with that Embedder, and the machinery of the resume tests (`full_disk_after`, `same_folder`).

The checkpoint and Embedder are cached here rather than in fixtures so that every test module
gets the same ones (a session fixture defined in a helper module would be made once per module).
"""

from __future__ import annotations

import errno
import json
import os
import random
from pathlib import Path

import numpy as np

import pytest

from conftest import TEST_DEVICE, fixture_file
from helpers import REAL_VOCAB
from modernbert_embed.cli import main

MSL = 48
PROMPT = "search_document: "
WORDS = ("the a of corpus shard embedding model resume manifest token window vector search "
         "document query parquet line quick brown fox jumps over lazy dog über café naïve").split()

_SHARED: dict = {}


def shared_checkpoint(tmp_path_factory) -> Path:
    if "ckpt" not in _SHARED:
        from modernbert_embed.weights import write_random_checkpoint

        tok = fixture_file("tokenizer.json")
        _SHARED["ckpt"] = write_random_checkpoint(tmp_path_factory.mktemp("corpus-ckpt"), REAL_VOCAB, seed=11,
                                                  tokenizer_json=tok, max_seq_length=MSL)
    return _SHARED["ckpt"]


def shared_embedder(ckpt: Path):
    if "model" not in _SHARED:
        from modernbert_embed import Embedder

        _SHARED["model"] = Embedder.from_pretrained(ckpt, device=TEST_DEVICE, dtype="float32")
    return _SHARED["model"]


# The device options of a command run in a process of its own: where the shared Embedder runs.
DEVICE_ARGS = ["--device", TEST_DEVICE, "--dtype", "float32"]


def make_texts(n, seed=0, max_words=60):
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(1, max_words))) for _ in range(n)]


def write_jsonl(path, texts, ids=None):
    with open(path, "w", encoding="utf-8") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": ids[i] if ids else f"doc-{i}", "text": t, "extra": i}) + "\n")
    return path


def write_text(path, texts):
    Path(path).write_text("".join(t + "\n" for t in texts), encoding="utf-8")
    return path


def write_parquet(path, columns):
    pa = pytest.importorskip("pyarrow", reason="pyarrow is not installed (the parquet extra)")
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path, row_group_size=7)
    return path


def cli(capsys, *args, embedder=None):
    """Run the command line in this process: (exit status, stdout, stderr)."""
    rc = main([str(a) for a in args], embedder=embedder)
    out, err = capsys.readouterr()
    return rc, out, err


def shard_entries(folder) -> list[dict]:
    """The recorded shards of a folder (manifest and journal), finished or not."""
    from modernbert_embed.corpus import Manifest

    return Manifest.load(Path(folder)).shard_list()


def without_run(shards: list[dict]) -> list[dict]:
    """Shard entries less the number of the run that wrote them."""
    return [{k: v for k, v in s.items() if k != "run"} for s in shards]


def full_disk_after(monkeypatch, shard_files: int):
    """Make shard-file writes fail with ENOSPC after `shard_files` of them (two files a shard for
    an embedder, three for a classifier (scores, labels, metadata) or a multi-vector model
    (tokens, offsets, metadata))."""
    from modernbert_embed.corpus import files as corpus_files

    real = corpus_files.atomic_write
    written = [0]

    def atomic_write(path, data, sync_dir=True):
        if path.name.startswith("shard-"):
            if written[0] >= shard_files:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            written[0] += 1
        return real(path, data, sync_dir)

    monkeypatch.setattr(corpus_files, "atomic_write", atomic_write)


def same_folder(a: Path, b: Path) -> None:
    """Two finished folders hold the same shards, byte for byte, and the same files."""
    from modernbert_embed.corpus import read_output

    x, y = read_output(a), read_output(b)
    assert len(x.shards) == len(y.shards)
    for p, q in zip(x.shards, y.shards):
        np.testing.assert_array_equal(p, q)
    for p, q in zip(x.label_shards or [], y.label_shards or []):
        np.testing.assert_array_equal(p, q)
    for p, q in zip(x.offset_shards or [], y.offset_shards or []):
        np.testing.assert_array_equal(p, q)
    assert x.meta == y.meta
    assert [s["files"] for s in x.manifest["shards"]] == [s["files"] for s in y.manifest["shards"]]
    assert x.manifest["totals"] == y.manifest["totals"]
    assert sorted(os.listdir(a)) == sorted(os.listdir(b))
