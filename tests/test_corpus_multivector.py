"""The corpus command with a multi-vector (ColBERT) model: per shard one flat array of token
vectors and int64 offsets, equal to `MultiVectorEncoder.encode_document` (or `encode_query`) on the
same texts in the same order, through the same manifest, resume and verify as embeddings; the
reader's documents read from memory-mapped shards; the options that mean nothing here refused by
name.

One random ColBERT folder in PyLate's layout (tests/multivector_data.py: the real widths, four
layers, a 768 -> 128 projection, document_length 300 so that a long document is truncated), and a
second folder of the same weights with another document_length."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from conftest import TEST_DEVICE, fixture_file
from corpus_helpers import (cli, full_disk_after, make_texts, same_folder, shared_checkpoint, shared_embedder,
                            write_jsonl, write_text)
from modernbert_embed import MultiVectorEncoder
from modernbert_embed.corpus import CorpusError, EmbedOptions, Manifest, RefusedError, read_output, verify_output
from modernbert_embed.corpus.files import sha256_file
from modernbert_embed.weights import colbert_st_config, write_random_checkpoint
from multivector_data import COLBERT_CONFIG, DOCUMENTS, QUERIES, VARIANTS


@pytest.fixture(scope="module")
def colbert_dir(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("colbert") / "expand", COLBERT_CONFIG, seed=7,
                                   tokenizer_json=fixture_file("tokenizer.json"),
                                   colbert=colbert_st_config(**VARIANTS["expand"]), dense_dim=128)


@pytest.fixture(scope="module")
def colbert(colbert_dir):
    return MultiVectorEncoder.from_pretrained(colbert_dir, device=TEST_DEVICE, dtype="float32")


@pytest.fixture(scope="module")
def shorter_dir(colbert_dir, tmp_path_factory):
    """The same weights, documents cut at 64 tokens."""
    folder = tmp_path_factory.mktemp("colbert-short") / "short"
    folder.mkdir()
    for f in colbert_dir.iterdir():
        if f.name != "config_sentence_transformers.json":
            os.symlink(f, folder / f.name)
    fields = colbert_st_config(**VARIANTS["expand"])
    fields["document_length"] = 64
    (folder / "config_sentence_transformers.json").write_text(json.dumps(fields, indent=2))
    return folder


def corpus(n=14):
    """The shared documents (long, truncated, almost all skiplist) and random ones."""
    return DOCUMENTS + make_texts(n - len(DOCUMENTS), seed=60, max_words=40)


@pytest.fixture
def run(capsys):
    """`run(model, folder, inputs, out, *flags)` -> (exit status, stdout, stderr): the command in
    this process with a loaded model (`load=True`: the command loads --model itself)."""

    def go(model, folder, inputs, out, *extra, load=False):
        return cli(capsys, "embed", *inputs, "-o", out, "--model", folder, "--no-progress", *extra,
                   embedder=None if load else model)

    return go


def same(got, want):
    """The float32 vectors written are the encoder's: exactly on the CPU; on a GPU, where batches
    of other documents may order a kernel's sums otherwise, to float32's last bits."""
    if TEST_DEVICE == "cpu":
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, atol=2e-5)


def same16(got, want):
    """float16 vectors: the encoder's float32 ones rounded (on a GPU: to float16's rounding)."""
    assert got.dtype == np.float16
    if TEST_DEVICE == "cpu":
        np.testing.assert_array_equal(got, want.astype(np.float16))
    np.testing.assert_allclose(got, want, atol=1e-3)


def flat(res):
    return [np.asarray(d) for d in res.iter_documents()]


# ------------------------------------------------------------------------------- round trips
def test_documents_are_written_as_encode_document_gives_them(tmp_path, run, colbert, colbert_dir):
    texts = corpus()
    inp = write_jsonl(tmp_path / "c.jsonl", texts)
    rc, out, err = run(colbert, colbert_dir, [inp], tmp_path / "f32", "--shard-size", 4, "--precision", "float32",
                       load=True)  # the command opens the folder as what it is
    assert rc == 0, err
    assert out.startswith(f"embedded {len(texts)} documents, ")

    expected = colbert.encode_document(texts)
    res = read_output(tmp_path / "f32")
    assert res.kind == "multivector" and len(res) == len(texts)
    assert res.ids == [f"doc-{i}" for i in range(len(texts))]
    docs = flat(res)
    assert len(docs) == len(texts)
    for i, (got, want) in enumerate(zip(docs, expected)):
        assert got.dtype == np.float32 and got.shape == want.shape, i
        same(got, want)
        same(res.document(i), want)
    assert res.token_counts.tolist() == [len(e) for e in expected]
    assert res.total_tokens == sum(len(e) for e in expected)
    ids, truncated, _, _ = colbert.tokenize(texts, is_query=False)
    assert len(expected[0]) == len(ids[0]) - 1  # "... France.": the period left out (the skiplist)
    assert res.meta["tokens"] == [len(s) for s in ids]
    assert res.meta["truncated"] == truncated and any(truncated)

    man = res.manifest
    assert man["model"]["kind"] == "multivector" and "embeddings" not in man and "scores" not in man
    assert man["model"]["colbert"]["document_length"] == 300
    assert man["model"]["colbert"]["skiplist"] == list(colbert.spec.skiplist_words)
    assert man["options"] == {"input_format": "auto", "text_field": "text", "id_field": "id", "id_required": False,
                              "multivector_mode": "document", "truncate_dim": None, "precision": "float32",
                              "shard_size": 4, "meta_format": man["options"]["meta_format"]}
    v = man["vectors"]
    assert (v["mode"], v["dtype"], v["dim"], v["prefix"], v["length"]) == ("document", "float32", 128, "[D] ", 300)
    assert man["totals"]["vectors"] == res.total_tokens
    shard = man["shards"][1]
    assert set(shard["files"]) == {"tokens", "offsets", "meta"}
    assert shard["files"]["tokens"]["name"] == "shard-00001.tokens.npy"
    offsets = np.load(tmp_path / "f32" / "shard-00001.offsets.npy")
    assert offsets.dtype == np.int64 and offsets.tolist() == [0] + np.cumsum(res.token_counts[4:8]).tolist()
    assert shard["vectors"] == offsets[-1] == np.load(tmp_path / "f32" / "shard-00001.tokens.npy").shape[0]
    assert verify_output(tmp_path / "f32").startswith(f"{tmp_path / 'f32'}: complete, {len(texts)} documents")

    # float16 by default: the same vectors to float16's rounding
    assert run(colbert, colbert_dir, [inp], tmp_path / "f16", "--shard-size", 4)[0] == 0
    res16 = read_output(tmp_path / "f16")
    assert res16.manifest["options"]["precision"] == "float16" and res16.manifest["vectors"]["dtype"] == "float16"
    for got, want in zip(flat(res16), expected):
        assert got.dtype == np.float16
        same16(got, want)
        np.testing.assert_allclose(got, want, atol=1e-3)


def test_a_document_is_read_from_the_memory_mapped_shard(tmp_path, run, colbert, colbert_dir):
    texts = corpus(10)
    inp = write_jsonl(tmp_path / "c.jsonl", texts)
    assert run(colbert, colbert_dir, [inp], tmp_path / "out", "--shard-size", 3)[0] == 0
    res = read_output(tmp_path / "out", verify=False)
    assert all(isinstance(s, np.memmap) for s in res.shards)  # no shard read into memory
    doc = res.document(7)  # shard 2, its second document
    assert isinstance(doc, np.memmap)
    assert str(doc.filename) == str((tmp_path / "out" / "shard-00002.tokens.npy").resolve())
    same16(doc, colbert.encode_document(texts[7]))
    np.testing.assert_array_equal(res.document(-1), res.document(9))
    assert all(isinstance(d, np.memmap) for d in res.iter_documents())
    with pytest.raises(IndexError, match="document 10 of a folder of 10 documents"):
        res.document(10)
    with pytest.raises(CorpusError, match="token vectors .*read .document"):
        res.embeddings
    assert not isinstance(read_output(tmp_path / "out", mmap_mode=None).document(7), np.memmap)


def test_queries_and_truncate_dim(tmp_path, run, colbert, colbert_dir):
    inp = write_jsonl(tmp_path / "q.jsonl", QUERIES)
    rc, _, err = run(colbert, colbert_dir, [inp], tmp_path / "q", "--multivector-mode", "query", "--precision",
                     "float32", "--shard-size", 2)
    assert rc == 0, err
    res = read_output(tmp_path / "q")
    for got, want in zip(flat(res), colbert.encode_query(QUERIES)):
        assert got.shape == (32, 128)  # expanded with [MASK] to query_length
        same(got, want)
    assert res.manifest["vectors"]["prefix"] == "[Q] " and res.manifest["vectors"]["query_expansion"] is True

    texts = corpus(6)
    rc, _, err = run(colbert, colbert_dir, [write_jsonl(tmp_path / "c.jsonl", texts)], tmp_path / "t",
                     "--truncate-dim", 48, "--precision", "float32")
    assert rc == 0, err
    res = read_output(tmp_path / "t")
    assert res.manifest["vectors"]["dim"] == 48
    for got, want in zip(flat(res), colbert.encode_document(texts, truncate_dim=48)):
        same(got, want)


def test_skipped_rows_leave_no_vectors(tmp_path, run, colbert, colbert_dir):
    texts = corpus(7)
    inp = write_jsonl(tmp_path / "c.jsonl", texts)
    with open(inp, "a", encoding="utf-8") as f:
        f.write(json.dumps({"id": "bad", "text": 5}) + "\n")
        for i in range(4):  # rows 8-11: a shard of skipped rows only, with no vectors
            f.write(json.dumps({"id": f"bad{i}"}) + "\n")
        f.write(json.dumps({"id": "last", "text": "after the bad row"}) + "\n")
    rc, _, err = run(colbert, colbert_dir, [inp], tmp_path / "out", "--shard-size", 4, "--on-error", "skip",
                     "--precision", "float32")
    assert rc == 0, err
    res = read_output(tmp_path / "out")
    assert res.ids == [f"doc-{i}" for i in range(7)] + ["last"]
    for got, want in zip(flat(res), colbert.encode_document(texts + ["after the bad row"])):
        same(got, want)  # want: last, the one of "after the bad row"
    assert [s["row"] for s in res.manifest["shards"][1]["skipped"]] == [7]
    empty = res.manifest["shards"][2]
    assert empty["documents"] == 0 and empty["vectors"] == 0 and len(empty["skipped"]) == 4
    assert res.shards[2].shape == (0, 128) and res.offset_shards[2].tolist() == [0]
    assert len(res) == 8 and res.document(-1).shape == want.shape
    assert "8 documents + 5 skipped = 13 rows in 4 shards" in verify_output(tmp_path / "out")


# ------------------------------------------------------------------------------- resume
def test_an_interrupted_run_resumes_to_the_same_bytes(tmp_path, run, colbert, colbert_dir, monkeypatch):
    texts = corpus(13)
    inp = write_jsonl(tmp_path / "c.jsonl", texts)
    full_disk_after(monkeypatch, shard_files=6)  # three files a shard: two shards, then a full disk
    rc, _, err = run(colbert, colbert_dir, [inp], tmp_path / "out", "--shard-size", 4)
    assert rc == 1 and "No space left on device" in err and "run the same command again to resume" in err
    assert [s["index"] for s in Manifest.load(tmp_path / "out").shard_list()] == [0, 1]
    monkeypatch.undo()
    rc, out, err = run(colbert, colbert_dir, [inp], tmp_path / "out", "--shard-size", 4)
    assert rc == 0 and out.startswith("embedded 5 documents"), err
    assert "warning" not in err
    assert run(colbert, colbert_dir, [inp], tmp_path / "fresh", "--shard-size", 4)[0] == 0
    same_folder(tmp_path / "out", tmp_path / "fresh")
    rc, out, err = run(colbert, colbert_dir, [inp], tmp_path / "out", "--shard-size", 4)
    assert rc == 0 and "nothing to do" in out, err


def test_a_resume_refuses_other_options_settings_or_kind(tmp_path, run, colbert, colbert_dir, shorter_dir,
                                                          tmp_path_factory):
    texts = corpus(6)
    inp = write_jsonl(tmp_path / "c.jsonl", texts)
    out = tmp_path / "out"
    assert run(colbert, colbert_dir, [inp], out, "--shard-size", 4)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    for extra, message in [(["--precision", "float32"], 'options.precision: "float16" in the folder, "float32" now'),
                           (["--multivector-mode", "query"],
                            'options.multivector_mode: "document" in the folder, "query" now'),
                           (["--truncate-dim", 64], "options.truncate_dim: null in the folder, 64 now"),
                           (["--shard-size", 5], "options.shard_size: 4 in the folder, 5 now")]:
        args = [a for a in extra]
        if "--shard-size" not in args:
            args += ["--shard-size", 4]
        rc, _, err = run(colbert, colbert_dir, [inp], out, *args)
        assert rc == 2 and message in err, (extra, err)
    rc, out_text, err = run(colbert, colbert_dir, [inp], out, "--shard-size", 4, "--precision", "float16")
    assert rc == 0 and "nothing to do" in out_text, err  # the default, given: the same job
    short = MultiVectorEncoder.from_pretrained(shorter_dir, device=TEST_DEVICE, dtype="float32")
    rc, _, err = run(short, shorter_dir, [inp], out, "--shard-size", 4)
    assert rc == 2 and "model.colbert.document_length: 300 in the folder, 64 now" in err
    ckpt = shared_checkpoint(tmp_path_factory)
    rc, _, err = run(shared_embedder(ckpt), ckpt, [inp], out, "--shard-size", 4)
    assert rc == 2 and "model.kind: the folder holds token vectors of a multi-vector model" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # refused: not a byte written

    emb_out = tmp_path / "emb"
    assert run(shared_embedder(ckpt), ckpt, [inp], emb_out, "--shard-size", 4)[0] == 0
    rc, _, err = run(colbert, colbert_dir, [inp], emb_out, "--shard-size", 4)
    assert rc == 2 and "model.kind: the folder holds embeddings of an embedder, but" in err
    assert "is a multi-vector model" in err


# ------------------------------------------------------------------------------- verify
def _rewrite(folder, name, array):
    """Replace a shard file and make the manifest's checksum agree, as if it had been written so."""
    np.save(folder / name, array, allow_pickle=False)
    m = json.loads((folder / "manifest.json").read_text())
    for s in m["shards"]:
        for f in s["files"].values():
            if f["name"] == name:
                f["sha256"], f["bytes"] = sha256_file(folder / name), (folder / name).stat().st_size
    (folder / "manifest.json").write_text(json.dumps(m))


def test_verify_catches_corrupted_tokens_or_offsets(tmp_path, run, colbert, colbert_dir, capsys):
    texts = corpus(10)
    inp = write_jsonl(tmp_path / "c.jsonl", texts)
    out = tmp_path / "out"
    assert run(colbert, colbert_dir, [inp], out, "--shard-size", 4)[0] == 0
    rc, text, _ = cli(capsys, "verify", out)
    assert rc == 0 and "document token vectors [" in text and "float16 with int64 offsets" in text

    good = (out / "shard-00001.tokens.npy").read_bytes()
    bad = bytearray(good)
    bad[-3] ^= 0x40
    (out / "shard-00001.tokens.npy").write_bytes(bytes(bad))
    rc, _, err = cli(capsys, "verify", out)
    assert rc == 1 and "shard-00001.tokens.npy is missing or does not match its checksum" in err
    rc, _, err = run(colbert, colbert_dir, [inp], out, "--shard-size", 4)
    assert rc == 0 and "shard-00001.tokens.npy is missing or damaged; shard 1 will be embedded again" in err
    assert (out / "shard-00001.tokens.npy").read_bytes() == good
    assert cli(capsys, "verify", out)[0] == 0

    # files whose checksums were made to agree: the checks of the arrays themselves
    offsets = np.load(out / "shard-00000.offsets.npy")
    tokens = np.load(out / "shard-00000.tokens.npy")
    cases = [
        ("shard-00000.offsets.npy", offsets[[0, 2, 1, 3, 4]], "offsets do not start at 0 and never decrease"),
        ("shard-00000.offsets.npy", np.concatenate([offsets[:-1], [offsets[-1] - 1]]),
         "the last offset is"),
        ("shard-00000.offsets.npy", offsets.astype(np.int32), "offsets int32"),
        ("shard-00000.offsets.npy", offsets[:-1], "offsets int64 [4], but the manifest says int64 [5]"),
        ("shard-00000.tokens.npy", np.where(np.arange(len(tokens))[:, None] == 5, np.float16(np.nan), tokens),
         "token vector 5 is not finite"),
        ("shard-00000.tokens.npy", tokens.astype(np.float32), "token vectors float32"),
    ]
    for name, array, message in cases:
        saved = (out / name).read_bytes(), (out / "manifest.json").read_bytes()
        _rewrite(out, name, array)
        rc, _, err = cli(capsys, "verify", out)
        assert rc == 1 and message in err, (message, err)
        with pytest.raises(CorpusError, match="shard 0"):
            read_output(out)
        (out / name).write_bytes(saved[0])
        (out / "manifest.json").write_bytes(saved[1])
    assert cli(capsys, "verify", out)[0] == 0


# ------------------------------------------------------------------------------- refusals
def test_options_that_mean_nothing_here_are_refused_by_name(tmp_path, run, colbert, colbert_dir, tmp_path_factory):
    inp = write_jsonl(tmp_path / "c.jsonl", corpus(6))
    out = tmp_path / "out"
    for extra, named in [(["--prompt", "x: "], "--prompt"), (["--prompt-name", "query"], "--prompt-name"),
                         (["--normalize"], "--normalize/--no-normalize"),
                         (["--no-normalize"], "--normalize/--no-normalize"),
                         (["--long", "chunk"], "--long"), (["--scores", "logits"], "--scores"),
                         (["--text-pair-field", "extra"], "--text-pair-field"),
                         (["--precision", "int8", "--calibration-size", 5], "--calibration-size")]:
        rc, _, err = run(colbert, colbert_dir, [inp], out, *extra)
        assert rc == 2 and f"{named} does not apply to multi-vector (ColBERT) models" in err, (extra, err)
    for precision in ("int8", "uint8", "binary", "ubinary"):
        rc, _, err = run(colbert, colbert_dir, [inp], out, "--precision", precision)
        assert rc == 2 and f"--precision {precision} is not for multi-vector output" in err, err
        assert "float16 or float32" in err
    rc, _, err = run(colbert, colbert_dir, [inp], out, "--truncate-dim", 129)
    assert rc == 2 and "--truncate-dim must be in 1..128" in err
    assert not out.exists()

    ckpt = shared_checkpoint(tmp_path_factory)
    rc, _, err = run(shared_embedder(ckpt), ckpt, [inp], out, "--multivector-mode", "query")
    assert rc == 2 and "--multivector-mode applies to multi-vector (ColBERT) models; " in err
    assert "Leave out --multivector-mode" in err
    with pytest.raises(RefusedError, match="--multivector-mode must be one of .'document', 'query'., got 'passage'"):
        EmbedOptions([str(inp)], str(out), multivector_mode="passage").validate()


# ------------------------------------------------------------------------------- non-finite vectors
FOX = 30013  # " fox" in the real vocabulary


@pytest.fixture(scope="module")
def poisoned(colbert_dir, tmp_path_factory):
    """(folder, MultiVectorEncoder): the ColBERT folder with the " fox" token's embedding NaN, so
    that every text with " fox" in it gets NaN vectors."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path_factory.mktemp("colbert-poisoned") / "p"
    shutil.copytree(colbert_dir, folder)
    sd = load_file(folder / "model.safetensors")
    key = next(k for k in sd if k.endswith("tok_embeddings.weight"))
    sd[key][FOX] = float("nan")
    save_file(sd, folder / "model.safetensors")
    return folder, MultiVectorEncoder.from_pretrained(folder, device=TEST_DEVICE, dtype="float32")


def test_non_finite_vectors_stop_or_are_skipped(tmp_path, run, poisoned):
    folder, enc = poisoned
    texts = [t.replace("fox", "cat") for t in make_texts(7, seed=61, max_words=20)]
    texts[2] = "the quick brown fox jumps over the lazy dog"
    texts[5] = "a fox again"
    assert FOX in enc.tokenize([texts[2]], is_query=False)[0][0]
    inp = write_text(tmp_path / "c.txt", texts)
    rc, _, err = run(enc, folder, [inp], tmp_path / "stop", "--shard-size", 4)
    assert rc == 1 and f"non-finite token vectors (NaN or infinity) for 1 document(s): {inp}, line 3" in err
    assert "--on-error skip" in err and "Traceback" not in err

    rc, out, err = run(enc, folder, [inp], tmp_path / "skip", "--shard-size", 4, "--on-error", "skip",
                       "--precision", "float32")
    assert rc == 0 and "embedded 5 documents (2 rows skipped)" in out, err
    res = read_output(tmp_path / "skip")
    skipped = [s for sh in res.manifest["shards"] for s in sh["skipped"]]
    assert [s["row"] for s in skipped] == [2, 5] and all("non-finite token vectors" in s["error"] for s in skipped)
    kept = [texts[i] for i in range(7) if i not in (2, 5)]
    assert res.meta["row"] == [0, 1, 3, 4, 6]
    for got, want in zip(flat(res), enc.encode_document(kept)):
        same(got, want)
    assert verify_output(tmp_path / "skip")
