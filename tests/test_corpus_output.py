"""Reading an output folder: shard by shard, memory-mapped, verified in bounded memory; folders
of the previous format version (1), read and verified but not resumed; and int8 folders written
before their codes' convention was recorded, read and resumed under the convention of then."""

from __future__ import annotations

import json
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from corpus_helpers import cli, make_texts, shared_checkpoint, shared_embedder, write_text
from modernbert_embed import quantize as Q
from modernbert_embed.corpus import CorpusError, iter_shards, read_output, verify_output
from modernbert_embed.corpus.files import file_record, meta_bytes, npy_bytes
from modernbert_embed.corpus.manifest import Manifest

V1_FOLDER = Path(__file__).parent / "data" / "corpus-v1"  # written by the version before the journal
# int8, written before the convention was recorded: 7 rows of make_texts(7, seed=5), shards of 3,
# truncate_dim 8, ranges given with dimension 2 constant at 0.0 (where the conventions differ)
LEGACY_INT8_FOLDER = Path(__file__).parent / "data" / "corpus-int8-legacy"
LEGACY_ARGS = ("--shard-size", 3, "--truncate-dim", 8, "--precision", "int8", "--meta-format", "jsonl")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return shared_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def model(ckpt):
    return shared_embedder(ckpt)


def synthetic_folder(folder: Path, shards: int, rows: int, width: int) -> np.ndarray:
    """A finished folder of random float32 shards written with the corpus module's own file
    writers (no model needed); returns all its embeddings."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    data, entries = [], []
    for k in range(shards):
        arr = rng.standard_normal((rows, width), dtype=np.float32)
        data.append(arr)
        start = k * rows
        meta = {"row": list(range(start, start + rows)), "id": [None] * rows, "tokens": [3] * rows,
                "truncated": [False] * rows}
        files = {}
        for kind, name, raw in (("embeddings", f"shard-{k:05d}.npy", npy_bytes(arr)),
                                ("meta", f"shard-{k:05d}.meta.jsonl", meta_bytes(meta, "jsonl"))):
            (folder / name).write_bytes(raw)
            files[kind] = file_record(name, raw)
        entries.append({"index": k, "rows": [start, start + rows], "documents": rows, "skipped": [],
                        "tokens": 3 * rows, "truncated": 0, "input_sha256": "", "files": files, "run": 1})
    m = Manifest.new(folder, {
        "complete": True, "model": {}, "options": {}, "inputs": [], "calibration": None, "runs": [],
        "embeddings": {"precision": "float32", "dtype": "float32", "width": width, "dim": width,
                       "packed_bits": False, "normalized": False},
        "totals": {"rows": shards * rows, "documents": shards * rows, "skipped": 0, "shards": shards,
                   "tokens": 3 * shards * rows, "truncated": 0},
        "shards": entries})
    m.save()
    return np.concatenate(data)


def peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_iter_shards_and_memory_mapped_reading(tmp_path):
    want = synthetic_folder(tmp_path / "out", shards=3, rows=5, width=16)
    shards = list(iter_shards(tmp_path / "out", mmap_mode="r"))
    assert [s.rows for s in shards] == [(0, 5), (5, 10), (10, 15)]
    assert all(isinstance(s.embeddings, np.memmap) for s in shards)
    assert [s.meta["row"] for s in shards] == [list(range(a, b)) for a, b in [(0, 5), (5, 10), (10, 15)]]
    res = read_output(tmp_path / "out", mmap_mode="r")
    assert all(isinstance(a, np.memmap) for a in res.shards)
    np.testing.assert_array_equal(res.embeddings, want)
    assert not isinstance(read_output(tmp_path / "out").shards[0], np.memmap)


def test_verify_and_mapped_reading_hold_one_shard_at_a_time(tmp_path):
    shard_bytes = 2000 * 256 * 4
    synthetic_folder(tmp_path / "out", shards=6, rows=2000, width=256)
    report = []
    peak = peak_bytes(lambda: report.append(verify_output(tmp_path / "out")))
    assert "complete, 12000 documents + 0 skipped = 12000 rows in 6 shards; embeddings [12000, 256] float32" \
        in report[0]
    assert peak < 2 * shard_bytes, f"verify held {peak / 1e6:.1f} MB; the shards are {6 * shard_bytes / 1e6:.1f} MB"
    peak = peak_bytes(lambda: read_output(tmp_path / "out", mmap_mode="r"))
    assert peak < 2 * shard_bytes, f"read_output(mmap_mode='r') held {peak / 1e6:.1f} MB"


def test_verify_names_what_does_not_add_up(tmp_path):
    synthetic_folder(tmp_path / "out", shards=3, rows=4, width=8)
    m = Manifest.load(tmp_path / "out")
    m.data["totals"]["documents"] = 13
    m.save()
    with pytest.raises(CorpusError, match=r"do not add up to the totals \(documents: 12 found, 13 in manifest"):
        verify_output(tmp_path / "out")
    m.data["totals"]["documents"] = 12
    m.shards[1]["skipped"] = [{"row": 3, "where": "x", "error": "y"}]
    m.save()
    with pytest.raises(CorpusError, match=r"shard 1: its documents and skipped rows do not add up to its rows 4..7"):
        verify_output(tmp_path / "out")


def test_a_version_1_folder_is_read_and_verified_but_not_resumed(tmp_path, capsys, ckpt, model):
    folder = tmp_path / "v1"
    shutil.copytree(V1_FOLDER, folder)
    res = read_output(folder)
    assert res.manifest["version"] == 1 and res.embeddings.shape == (7, 8)
    assert res.meta["row"] == list(range(7)) and np.isfinite(res.embeddings).all()
    np.testing.assert_allclose(np.linalg.norm(res.embeddings, axis=1), 1.0, rtol=1e-5)  # normalised
    rc, out, _ = cli(capsys, "verify", folder)
    assert rc == 0 and "complete, 7 documents + 0 skipped = 7 rows in 3 shards; embeddings [7, 8] float32" in out

    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    inp = write_text(tmp_path / "c.txt", make_texts(7, seed=31))
    rc, _, err = cli(capsys, "embed", inp, "-o", folder, "--model", ckpt, "--shard-size", 3, "--truncate-dim", 8,
                     "--meta-format", "jsonl", embedder=model)
    assert rc == 2 and "earlier version of modernbert-embed (manifest format 1)" in err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before

    shard = folder / "shard-00001.npy"
    shard.write_bytes(shard.read_bytes()[:-1] + b"\0")
    rc, _, err = cli(capsys, "verify", folder)
    assert rc == 1 and f"{shard} is missing or does not match its checksum" in err


def _legacy_copy(tmp_path) -> tuple[Path, Path]:
    """A copy of the legacy int8 folder whose manifest names a copy of its input here."""
    folder = tmp_path / "legacy"
    shutil.copytree(LEGACY_INT8_FOLDER, folder)
    inp = write_text(tmp_path / "corpus.txt", make_texts(7, seed=5))
    m = json.loads((folder / "manifest.json").read_text())
    m["inputs"][0]["path"] = str(inp.resolve())
    (folder / "manifest.json").write_text(json.dumps(m))
    return folder, inp


def test_an_int8_folder_without_a_convention_is_read_as_written(tmp_path, capsys):
    folder, _ = _legacy_copy(tmp_path)
    res = read_output(folder)
    assert "convention" not in res.manifest["calibration"]
    assert res.convention == Q.LEGACY_CONVENTION
    codes = res.embeddings
    assert codes.dtype == np.int8 and codes.shape == (7, 8)
    # dimension 2 was calibrated constant at 0.0: split there (-128 below, 127 above), which the
    # sentence-transformers convention would not make of values within 1 of it
    assert set(codes[:, 2].tolist()) == {-128, 127}
    floats = res.dequantize()
    assert (floats[:, 2] == 0.0).all()  # not 255.0, which code 127 means under the new convention
    np.testing.assert_array_equal(floats, Q.dequantize(codes, "int8", res.ranges, Q.LEGACY_CONVENTION))
    rc, out, _ = cli(capsys, "verify", folder)
    assert rc == 0 and "embeddings [7, 8] int8" in out


def test_a_resumed_legacy_int8_folder_keeps_its_convention(tmp_path, capsys, ckpt, model):
    folder, inp = _legacy_copy(tmp_path)
    old = np.load(folder / "shard-00001.npy")
    (folder / "shard-00001.npy").unlink()
    rc, _, err = cli(capsys, "embed", inp, "-o", folder, "--model", ckpt, *LEGACY_ARGS, embedder=model)
    assert rc == 0, err
    assert "shard 1 will be embedded again" in err
    res = read_output(folder)
    assert res.convention == Q.LEGACY_CONVENTION and "convention" not in res.manifest["calibration"]
    floats = model.encode(make_texts(7, seed=5)[3:6], truncate_dim=8)
    again = np.load(folder / "shard-00001.npy")
    np.testing.assert_array_equal(again, Q.quantize_embeddings(floats, "int8", res.ranges,
                                                               convention=Q.LEGACY_CONVENTION))
    assert again[:, 2].tolist() == old[:, 2].tolist() == [127, -128, -128]  # split as the other shards are


def test_a_new_int8_folder_records_the_convention(tmp_path, capsys, ckpt, model):
    inp = write_text(tmp_path / "corpus.txt", make_texts(7, seed=5))
    rc, _, err = cli(capsys, "embed", inp, "-o", tmp_path / "new", "--model", ckpt, *LEGACY_ARGS,
                     "--calibration", LEGACY_INT8_FOLDER / "manifest.json", embedder=model)  # the same ranges
    assert rc == 0, err
    res = read_output(tmp_path / "new")
    assert res.manifest["calibration"]["convention"] == Q.CONVENTION == res.convention
    assert json.loads((tmp_path / "new" / "calibration.json").read_text())["convention"] == Q.CONVENTION
    floats = model.encode(make_texts(7, seed=5), truncate_dim=8)
    np.testing.assert_array_equal(res.embeddings, Q.quantize_embeddings(floats, "int8", res.ranges))
    assert (res.embeddings[:, 2] == -128).all()  # within 1 of the constant: bucket 0
    assert (res.dequantize()[:, 2] == 0.0).all()


def test_an_unknown_convention_is_named(tmp_path):
    folder, _ = _legacy_copy(tmp_path)
    m = json.loads((folder / "manifest.json").read_text())
    m["calibration"]["convention"] = "from-the-future"
    (folder / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CorpusError, match="int8/uint8 convention 'from-the-future' .* is unknown to this version"):
        read_output(folder).dequantize()
    with pytest.raises(CorpusError, match="dequantize works for int8/uint8 folders; this one holds float32"):
        read_output(V1_FOLDER).dequantize()
