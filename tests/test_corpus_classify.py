"""The corpus command with a classifier or cross-encoder: scores and labels per shard, equal to
`CrossEncoder.predict` on the same inputs in the same order, through the same manifest, resume and
verify as embeddings; the options of the other kind of model refused by name; and the defaults that
follow an embedder's folder (normalize, prompts).

Two random classifiers in the real layout with the real tokenizer (max_seq_length 48, so that
truncation shows): a one-label cross-encoder scoring pairs, and a three-label single-text
classifier."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from conftest import TEST_DEVICE, fixture_file
from corpus_helpers import (MSL, cli, full_disk_after, make_texts, same_folder, shared_checkpoint, shared_embedder,
                            write_jsonl, write_parquet, write_text)
from helpers import REAL_VOCAB
from modernbert_embed import CrossEncoder, Embedder, LoadedModel, TruncationWarning
from modernbert_embed.corpus import CorpusError, CorpusJob, EmbedOptions, Manifest, read_output, verify_output
from modernbert_embed.weights import classifier_config, write_random_checkpoint

SIGMOID = "torch.nn.modules.activation.Sigmoid"
IDENTITY = "torch.nn.modules.linear.Identity"


def write_classifier(folder, seed, **kw):
    return write_random_checkpoint(folder, classifier_config(REAL_VOCAB, **kw), seed=seed,
                                   tokenizer_json=fixture_file("tokenizer.json"), max_seq_length=MSL)


@pytest.fixture(scope="module")
def reranker_dir(tmp_path_factory):
    return write_classifier(tmp_path_factory.mktemp("reranker"), seed=31, num_labels=1, pooling="mean")


@pytest.fixture(scope="module")
def reranker(reranker_dir):
    return CrossEncoder.from_pretrained(reranker_dir, device=TEST_DEVICE, dtype="float32")


@pytest.fixture(scope="module")
def tagger_dir(tmp_path_factory):
    return write_classifier(tmp_path_factory.mktemp("tagger"), seed=32, num_labels=3, pooling="cls")


@pytest.fixture(scope="module")
def tagger(tagger_dir):
    return CrossEncoder.from_pretrained(tagger_dir, device=TEST_DEVICE, dtype="float32")


def predict(ce, inputs, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TruncationWarning)
        return ce.predict(inputs, **kw)


def make_pairs(n, seed):
    queries, docs = make_texts(n, seed=seed, max_words=8), make_texts(n, seed=seed + 1, max_words=50)
    return list(zip(queries, docs))


def write_pairs(path, pairs):
    with open(path, "w", encoding="utf-8") as f:
        for i, (q, d) in enumerate(pairs):
            f.write(json.dumps({"id": f"p{i}", "query": q, "document": d}) + "\n")
    return path


PAIR_FLAGS = ["--text-field", "query", "--text-pair-field", "document"]


@pytest.fixture
def run(capsys):
    """`run(model, inputs, out, *flags)` -> (exit status, stdout, stderr): the command in this
    process with a loaded model (`load=True`: the command loads --model itself)."""

    def go(model, folder, inputs, out, *extra, load=False):
        return cli(capsys, "embed", *inputs, "-o", out, "--model", folder, *extra, embedder=None if load else model)

    return go


# ------------------------------------------------------------------------------- round trips
def test_a_cross_encoder_scores_pairs_of_a_jsonl_file(tmp_path, run, reranker, reranker_dir, capsys):
    pairs = make_pairs(23, seed=40)
    inp = write_pairs(tmp_path / "pairs.jsonl", pairs)
    rc, out, err = run(reranker, reranker_dir, [inp], tmp_path / "out", *PAIR_FLAGS, "--shard-size", 5,
                       "--meta-format", "jsonl", load=True)  # the command opens the folder as what it is
    assert rc == 0, err
    assert out.startswith("scored 23 documents, ") and "scoring" in err

    res = read_output(tmp_path / "out")
    assert res.kind == "classifier"
    expected = predict(reranker, pairs)
    assert res.scores.shape == (23,) and res.scores.dtype == np.float32
    np.testing.assert_allclose(res.scores, expected, atol=1e-5)
    logits = predict(reranker, pairs, activation_fn=torch.nn.Identity())
    assert res.labels.dtype == np.int32
    np.testing.assert_array_equal(res.labels, (logits >= 0).astype(np.int32))
    assert 0 < res.labels.sum() < 23  # both labels occur: the rule is seen to work
    ids, truncated = reranker.tokenize(pairs)
    assert res.meta["id"] == [f"p{i}" for i in range(23)]
    assert res.meta["tokens"] == [len(s) for s in ids]
    assert res.meta["truncated"] == truncated and any(truncated) and not all(truncated)

    man = res.manifest
    assert man["model"]["kind"] == "classifier" and man["model"]["num_labels"] == 1
    assert man["model"]["pooling"] == "mean" and "embeddings" not in man
    assert man["scores"] == {"dtype": "float32", "shape": "[n]", "num_labels": 1, "values": "activated",
                             "activation": SIGMOID, "softmax": False, "id2label": {"0": "LABEL_0"},
                             "labels": {"dtype": "int32",
                                        "rule": "1 when the logit >= 0 (sigmoid >= 0.5), else 0"}}
    assert man["options"] == {"input_format": "auto", "text_field": "query", "text_pair_field": "document",
                              "id_field": "id", "id_required": False, "scores": "activated", "shard_size": 5,
                              "meta_format": "jsonl"}
    assert sorted(man["shards"][0]["files"]) == ["labels", "meta", "scores"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.startswith("shard-00000")) == [
        "shard-00000.labels.npy", "shard-00000.meta.jsonl", "shard-00000.scores.npy"]
    with pytest.raises(CorpusError, match=r"holds scores and labels \(written by a classifier\)"):
        res.embeddings

    rc, report, err = cli(capsys, "verify", tmp_path / "out")
    assert rc == 0, err
    assert "complete, 23 documents + 0 skipped = 23 rows in 5 shards; scores [23] float32 (activated), " \
           "labels [23] int32; checksums ok" in report

    # raw logits on request, with the same labels
    rc, _, err = run(reranker, reranker_dir, [inp], tmp_path / "raw", *PAIR_FLAGS, "--scores", "logits")
    assert rc == 0, err
    raw = read_output(tmp_path / "raw")
    np.testing.assert_allclose(raw.scores, logits, atol=1e-5)
    np.testing.assert_array_equal(raw.labels, res.labels)
    assert raw.manifest["scores"]["values"] == "logits" and raw.manifest["scores"]["activation"] is None


def test_a_three_label_classifier_scores_single_texts_of_a_parquet_file(tmp_path, run, tagger, tagger_dir,
                                                                          monkeypatch):
    # the GPU path, where the reader thread tokenises the next shard while the model runs
    monkeypatch.setattr(tagger.loaded, "tokenize_beside_model", True)
    texts = make_texts(19, seed=41)
    inp = write_parquet(tmp_path / "c.parquet", {"id": list(range(19)), "body": texts})
    rc, out, err = run(tagger, tagger_dir, [inp], tmp_path / "out", "--text-field", "body", "--shard-size", 6)
    assert rc == 0, err
    res = read_output(tmp_path / "out")
    expected = predict(tagger, [[t] for t in texts])  # single texts; identity for three labels: the logits
    assert res.scores.shape == (19, 3) and res.scores.dtype == np.float32
    np.testing.assert_allclose(res.scores, expected, atol=1e-5)
    np.testing.assert_array_equal(res.labels, np.argmax(expected, axis=1))
    assert len(set(res.labels.tolist())) > 1
    assert res.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}
    assert res.manifest["scores"]["activation"] == IDENTITY and res.manifest["scores"]["shape"] == "[n, 3]"
    assert res.meta["id"] == [str(i) for i in range(19)]
    assert verify_output(tmp_path / "out").endswith("scores [19, 3] float32 (activated), labels [19] int32; "
                                                    "checksums ok")

    rc, _, err = run(tagger, tagger_dir, [inp], tmp_path / "soft", "--text-field", "body", "--scores", "softmax")
    assert rc == 0, err
    soft = read_output(tmp_path / "soft")
    np.testing.assert_allclose(soft.scores, predict(tagger, [[t] for t in texts], apply_softmax=True), atol=1e-6)
    np.testing.assert_array_equal(soft.labels, res.labels)
    assert soft.manifest["scores"]["softmax"] is True


def test_pairs_from_parquet_and_a_classifier_given_as_a_loaded_model(tmp_path, tagger, monkeypatch):
    monkeypatch.setattr(tagger.loaded, "tokenize_beside_model", True)  # pairs tokenised on the reader thread
    pairs = make_pairs(9, seed=42)
    inp = write_parquet(tmp_path / "p.parquet", {"a": [q for q, _ in pairs], "b": [d for _, d in pairs]})
    opts = EmbedOptions([str(inp)], str(tmp_path / "out"), text_field="a", text_pair_field="b", shard_size=4,
                        progress=False)
    result = CorpusJob(opts, model=tagger.loaded).run()
    assert result.documents == 9 and "scored 9 documents" in result.summary()
    res = read_output(tmp_path / "out")
    np.testing.assert_allclose(res.scores, predict(tagger, pairs), atol=1e-5)
    # a mmap'd read gives the same arrays
    mm = read_output(tmp_path / "out", mmap_mode="r")
    np.testing.assert_array_equal(mm.scores, res.scores)
    np.testing.assert_array_equal(mm.labels, res.labels)


# ------------------------------------------------------------------------------- resume and verify
def test_an_interrupted_run_resumes_to_the_same_bytes(tmp_path, run, reranker, reranker_dir, monkeypatch):
    pairs = make_pairs(17, seed=43)
    inp = write_pairs(tmp_path / "pairs.jsonl", pairs)
    full_disk_after(monkeypatch, shard_files=6)  # three files a shard: two shards, then a full disk
    rc, _, err = run(reranker, reranker_dir, [inp], tmp_path / "out", *PAIR_FLAGS, "--shard-size", 4)
    assert rc == 1 and "No space left on device" in err and "run the same command again to resume" in err
    assert [s["index"] for s in Manifest.load(tmp_path / "out").shard_list()] == [0, 1]
    monkeypatch.undo()
    rc, out, err = run(reranker, reranker_dir, [inp], tmp_path / "out", *PAIR_FLAGS, "--shard-size", 4)
    assert rc == 0 and out.startswith("scored 9 documents"), err
    assert "warning" not in err
    assert run(reranker, reranker_dir, [inp], tmp_path / "fresh", *PAIR_FLAGS, "--shard-size", 4)[0] == 0
    same_folder(tmp_path / "out", tmp_path / "fresh")
    np.testing.assert_allclose(read_output(tmp_path / "out").scores, predict(reranker, pairs), atol=1e-5)
    rc, out, err = run(reranker, reranker_dir, [inp], tmp_path / "out", *PAIR_FLAGS, "--shard-size", 4)
    assert rc == 0 and "nothing to do" in out, err


def test_a_resume_refuses_other_score_options_or_another_kind_of_model(tmp_path, run, reranker, reranker_dir,
                                                                         tagger, tagger_dir, tmp_path_factory):
    pairs = make_pairs(6, seed=44)
    inp = write_pairs(tmp_path / "pairs.jsonl", pairs)
    out = tmp_path / "out"
    assert run(reranker, reranker_dir, [inp], out, *PAIR_FLAGS, "--shard-size", 4)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    rc, _, err = run(reranker, reranker_dir, [inp], out, *PAIR_FLAGS, "--shard-size", 4, "--scores", "logits")
    assert rc == 2 and 'options.scores: "activated" in the folder, "logits" now' in err
    rc, _, err = run(reranker, reranker_dir, [inp], out, "--text-field", "query", "--shard-size", 4)
    assert rc == 2 and 'options.text_pair_field: "document" in the folder, null now' in err
    rc, _, err = run(tagger, tagger_dir, [inp], out, *PAIR_FLAGS, "--shard-size", 4)
    assert rc == 2 and "model.fingerprint" in err and "model.num_labels: 1 in the folder, 3 now" in err
    ckpt = shared_checkpoint(tmp_path_factory)
    rc, _, err = run(shared_embedder(ckpt), ckpt, [inp], out, "--text-field", "query", "--shard-size", 4)
    assert rc == 2 and "model.kind: the folder holds scores and labels of a classifier" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # refused: not a byte written

    texts = make_texts(5, seed=45)
    emb_out = tmp_path / "emb"
    assert run(shared_embedder(ckpt), ckpt, [write_text(tmp_path / "c.txt", texts)], emb_out)[0] == 0
    rc, _, err = run(tagger, tagger_dir, [tmp_path / "c.txt"], emb_out)
    assert rc == 2 and "model.kind: the folder holds embeddings of an embedder" in err


def test_verify_catches_a_corrupted_score_shard_and_a_resume_redoes_it(tmp_path, run, tagger, tagger_dir, capsys):
    texts = make_texts(12, seed=46)
    inp = write_jsonl(tmp_path / "c.jsonl", texts)
    out = tmp_path / "out"
    assert run(tagger, tagger_dir, [inp], out, "--shard-size", 5)[0] == 0
    good = (out / "shard-00001.scores.npy").read_bytes()
    bad = bytearray(good)
    bad[-3] ^= 0x40  # a bit of the last score
    (out / "shard-00001.scores.npy").write_bytes(bytes(bad))
    rc, _, err = cli(capsys, "verify", out)
    assert rc == 1 and "shard-00001.scores.npy is missing or does not match its checksum" in err
    with pytest.raises(CorpusError, match="shard-00001.scores.npy is missing or does not match"):
        read_output(out)
    rc, out_text, err = run(tagger, tagger_dir, [inp], out, "--shard-size", 5)
    assert rc == 0 and "shard-00001.scores.npy is missing or damaged; shard 1 will be embedded again" in err
    assert (out / "shard-00001.scores.npy").read_bytes() == good
    assert cli(capsys, "verify", out)[0] == 0

    # labels of the wrong shape, recorded as if they were right: the counts catch them
    m = json.loads((out / "manifest.json").read_text())
    from modernbert_embed.corpus import files

    data = files.npy_bytes(np.zeros(4, dtype=np.int32))
    (out / "shard-00000.labels.npy").write_bytes(data)
    m["shards"][0]["files"]["labels"] = files.file_record("shard-00000.labels.npy", data)
    (out / "manifest.json").write_text(json.dumps(m))
    rc, _, err = cli(capsys, "verify", out)
    assert rc == 1 and "shard 0: labels int32 [4], but the manifest says int32 [5]" in err


# ------------------------------------------------------------------------------- refusals
def test_options_of_the_other_kind_are_refused_by_name(tmp_path, run, tagger, tagger_dir, reranker, reranker_dir,
                                                       tmp_path_factory):
    inp = write_jsonl(tmp_path / "c.jsonl", make_texts(3, seed=47))
    for extra, flags in [(["--truncate-dim", "8"], "--truncate-dim applies"),
                         (["--precision", "int8"], "--precision applies"),
                         (["--no-normalize"], "--normalize/--no-normalize applies"),
                         (["--normalize"], "--normalize/--no-normalize applies"),
                         (["--prompt-name", "search_document"], "--prompt-name applies"),
                         (["--prompt", "x: "], "--prompt applies"),
                         (["--long", "chunk", "--overlap", "4"], "--long, --overlap apply"),
                         (["--calibration-size", "5"], "--calibration-size applies")]:
        rc, _, err = run(tagger, tagger_dir, [inp], tmp_path / "out", *extra)
        assert rc == 2 and f"{flags} to embedding models; {tagger_dir} is a classifier " \
                           "(ModernBertForSequenceClassification, 3 labels)" in err, (extra, err)
    rc, _, err = run(reranker, reranker_dir, [inp], tmp_path / "out", "--scores", "softmax")
    assert rc == 2 and "--scores softmax needs two labels or more" in err
    ckpt = shared_checkpoint(tmp_path_factory)
    model = shared_embedder(ckpt)
    pairs = write_pairs(tmp_path / "p.jsonl", make_pairs(3, seed=48))
    for extra, flags in [(["--text-field", "query", "--text-pair-field", "document"], "--text-pair-field applies"),
                         (["--scores", "logits"], "--scores applies")]:
        rc, _, err = run(model, ckpt, [pairs], tmp_path / "out", *extra)
        assert rc == 2 and f"{flags} to classifiers (cross-encoders); {ckpt} is an embedder" in err, err
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_ambiguous_or_impossible_pair_options_are_refused(tmp_path, run, reranker, reranker_dir, capsys):
    pairs = write_pairs(tmp_path / "p.jsonl", make_pairs(3, seed=49))
    txt = write_text(tmp_path / "c.txt", ["a", "b"])
    for inputs, extra, message in [
            ([pairs], ["--text-field", "query", "--text-pair-field", "query"],
             "--text-pair-field and --text-field both name 'query'"),
            ([pairs], ["--text-pair-field", "id"], "--text-pair-field and --id-field both name 'id'"),
            ([txt], ["--text-pair-field", "document"], "--text-pair-field needs JSON Lines or Parquet input")]:
        rc, _, err = run(reranker, reranker_dir, inputs, tmp_path / "out", *extra)
        assert rc == 2 and message in err, err
    with pytest.raises(SystemExit, match="^2$"):
        run(reranker, reranker_dir, [pairs], tmp_path / "out", "--scores", "sigmoid")
    assert "argument --scores: invalid choice: 'sigmoid'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_row_without_its_pair_is_named_or_skipped(tmp_path, run, reranker, reranker_dir):
    pairs = make_pairs(6, seed=50)
    inp = write_pairs(tmp_path / "p.jsonl", pairs)
    lines = inp.read_text().splitlines()
    lines[2] = json.dumps({"id": "p2", "query": pairs[2][0]})  # no document
    lines[4] = json.dumps({"id": "p4", "query": pairs[4][0], "document": 7})
    inp.write_text("\n".join(lines) + "\n")
    rc, _, err = run(reranker, reranker_dir, [inp], tmp_path / "out", *PAIR_FLAGS)
    assert rc == 1 and f"{inp}, line 3: no field 'document' (fields: id, query); choose one with " \
                       "--text-pair-field" in err
    rc, out, err = run(reranker, reranker_dir, [inp], tmp_path / "skip", *PAIR_FLAGS, "--on-error", "skip")
    assert rc == 0 and "scored 4 documents (2 rows skipped)" in out, err
    res = read_output(tmp_path / "skip")
    keep = [0, 1, 3, 5]
    assert res.meta["row"] == keep and [s["row"] for s in res.manifest["shards"][0]["skipped"]] == [2, 4]
    np.testing.assert_allclose(res.scores, predict(reranker, [pairs[i] for i in keep]), atol=1e-5)


# ------------------------------------------------------------------------------- an embedder's folder decides
@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory):
    """An embedder without a Normalize module, with prompts of its own and a default prompt."""
    folder = write_random_checkpoint(tmp_path_factory.mktemp("plain"), REAL_VOCAB, seed=33,
                                     tokenizer_json=fixture_file("tokenizer.json"), max_seq_length=MSL,
                                     normalize=False)
    st = folder / "config_sentence_transformers.json"
    cfg = json.loads(st.read_text()) if st.exists() else {}
    cfg.update(prompts={"passage": "passage: ", "question": "question: "}, default_prompt_name="passage")
    st.write_text(json.dumps(cfg))
    return folder


def test_an_embedder_without_normalize_is_written_unnormalised_by_default(tmp_path, run, plain_dir):
    model = Embedder.from_pretrained(plain_dir, device=TEST_DEVICE, dtype="float32")
    assert model.normalize_embeddings is False
    texts = make_texts(10, seed=51)
    inp = write_text(tmp_path / "c.txt", texts)
    assert run(model, plain_dir, [inp], tmp_path / "out", "--shard-size", 4)[0] == 0
    res = read_output(tmp_path / "out")
    norms = np.linalg.norm(res.embeddings, axis=1)
    assert np.abs(norms - 1).min() > 1e-2  # not unit length
    np.testing.assert_allclose(res.embeddings, model.encode(texts), atol=1e-5)  # encode follows the folder too
    assert res.manifest["embeddings"]["normalized"] is False and res.manifest["options"]["normalize"] is False
    # forced either way
    assert run(model, plain_dir, [inp], tmp_path / "unit", "--normalize")[0] == 0
    unit = read_output(tmp_path / "unit")
    np.testing.assert_allclose(np.linalg.norm(unit.embeddings, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(unit.embeddings, model.encode(texts, normalize_embeddings=True), atol=1e-5)
    # a resume with the flag that says what the folder holds is the same job; the other one is refused
    rc, out, err = run(model, plain_dir, [inp], tmp_path / "out", "--shard-size", 4, "--no-normalize")
    assert rc == 0 and "nothing to do" in out, err
    rc, _, err = run(model, plain_dir, [inp], tmp_path / "out", "--shard-size", 4, "--normalize")
    assert rc == 2 and "options.normalize: false in the folder, true now" in err
    # a folder written normalised (the command's default before it followed the model's folder) says how to go on
    rc, _, err = run(model, plain_dir, [inp], tmp_path / "unit")
    assert rc == 2 and "options.normalize: true in the folder, false now" in err
    assert "it lists no Normalize module; pass --normalize to go on as the folder was written" in err
    rc, out, err = run(model, plain_dir, [inp], tmp_path / "unit", "--normalize")
    assert rc == 0 and "nothing to do" in out, err


def test_a_folder_with_normalize_stays_normalised_and_no_normalize_still_works(tmp_path, run, tmp_path_factory):
    ckpt = shared_checkpoint(tmp_path_factory)
    model = shared_embedder(ckpt)
    inp = write_text(tmp_path / "c.txt", make_texts(6, seed=52))
    assert run(model, ckpt, [inp], tmp_path / "a")[0] == 0
    np.testing.assert_allclose(np.linalg.norm(read_output(tmp_path / "a").embeddings, axis=1), 1, atol=1e-5)
    assert run(model, ckpt, [inp], tmp_path / "b", "--no-normalize")[0] == 0
    assert np.abs(np.linalg.norm(read_output(tmp_path / "b").embeddings, axis=1) - 1).min() > 1e-2


def test_prompt_names_and_the_default_prompt_come_from_the_folder(tmp_path, run, plain_dir):
    loaded = LoadedModel.open(plain_dir, device=TEST_DEVICE, dtype="float32")
    model = Embedder(loaded)
    texts = make_texts(7, seed=53)
    inp = write_text(tmp_path / "c.txt", texts)
    rc, _, err = run(loaded, plain_dir, [inp], tmp_path / "q", "--prompt-name", "question")
    assert rc == 0, err
    q = read_output(tmp_path / "q")
    assert q.manifest["options"]["prompt"] == "question: "
    np.testing.assert_allclose(q.embeddings, model.encode(texts, prompt="question: "), atol=1e-5)
    # no prompt given: the folder's default_prompt_name, as Embedder.encode
    assert run(loaded, plain_dir, [inp], tmp_path / "d")[0] == 0
    d = read_output(tmp_path / "d")
    assert d.manifest["options"]["prompt"] == "passage: "
    np.testing.assert_allclose(d.embeddings, model.encode(texts), atol=1e-5)
    # an explicit empty prompt: none
    assert run(loaded, plain_dir, [inp], tmp_path / "n", "--prompt", "")[0] == 0
    np.testing.assert_allclose(read_output(tmp_path / "n").embeddings, model.encode(texts, prompt=""), atol=1e-5)
    # the built-in ones still resolve; an unknown one is named with the known ones
    assert run(loaded, plain_dir, [inp], tmp_path / "s", "--prompt-name", "search_query")[0] == 0
    rc, _, err = run(loaded, plain_dir, [inp], tmp_path / "x", "--prompt-name", "shouting")
    assert rc == 2 and "unknown --prompt-name 'shouting'" in err and "'question'" in err


def test_a_folder_written_before_the_model_kind_was_recorded_resumes(tmp_path, run, monkeypatch,
                                                                      tmp_path_factory):
    """A manifest without `model.kind` (an older version's) holds embeddings: it resumes."""
    ckpt = shared_checkpoint(tmp_path_factory)
    model = shared_embedder(ckpt)
    inp = write_jsonl(tmp_path / "c.jsonl", make_texts(9, seed=54))
    full_disk_after(monkeypatch, shard_files=2)
    assert run(model, ckpt, [inp], tmp_path / "out", "--shard-size", 3)[0] == 1
    monkeypatch.undo()
    path = tmp_path / "out" / "manifest.json"
    m = json.loads(path.read_text())
    del m["model"]["kind"]
    path.write_text(json.dumps(m))
    assert read_output(tmp_path / "out", allow_incomplete=True).kind == "embedder"
    rc, out, err = run(model, ckpt, [inp], tmp_path / "out", "--shard-size", 3)
    assert rc == 0 and "embedded 6 documents" in out, err
    assert run(model, ckpt, [inp], tmp_path / "fresh", "--shard-size", 3)[0] == 0
    x, y = read_output(tmp_path / "out"), read_output(tmp_path / "fresh")
    np.testing.assert_array_equal(x.embeddings, y.embeddings)
    with pytest.raises(CorpusError, match=r"holds embeddings \(written by an embedder\): read .embeddings"):
        x.scores
