"""Late-interaction (ColBERT) models: PyLate folders, `MultiVectorEncoder`, the per-token head, query
expansion, MaxSim; parity with sentence-transformers 6's `MultiVectorEncoder` on the same random
folders (PyLate itself: test_multivector_pylate.py)."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import torch

from modernbert_embed import Checkpoint, CheckpointError, CrossEncoder, Embedder, MultiVectorEncoder
from modernbert_embed.multivector import maxsim, maxsim_pairwise
from modernbert_embed.weights import (MULTIVECTOR, classifier_config, colbert_st_config, write_colbert_tokenizer,
                                     write_random_checkpoint)

from conftest import fixture_file, requires_cuda
from helpers import REAL_VOCAB
from multivector_data import DOCUMENTS, QUERIES, write_variants

PARITY_VARIANTS = ["expand", "expand-attend", "no-expansion", "expand-long"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return write_variants(tmp_path_factory.mktemp("colbert"))


@pytest.fixture(scope="module")
def encoders(folders):
    return {name: MultiVectorEncoder.from_pretrained(folder, device="cpu") for name, folder in folders.items()}


def _st(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from sentence_transformers import MultiVectorEncoder as STMultiVectorEncoder

        return STMultiVectorEncoder(str(folder), device="cpu")


@pytest.fixture(scope="module")
def st_outputs(folders):
    """sentence-transformers 6's vectors and scores on each folder (float32, CPU). It does not strip
    texts as PyLate does (sentence-transformers 5's Transformer did): it is given them stripped."""
    out = {}
    for name in PARITY_VARIANTS:
        st = _st(folders[name])
        q = st.encode_query([t.strip() for t in QUERIES], convert_to_numpy=True, batch_size=3)
        d = st.encode_document([t.strip() for t in DOCUMENTS], convert_to_numpy=True, batch_size=4)
        out[name] = (q, d, st.similarity(q, d).numpy())
    return out


def _max_abs(a, b) -> float:
    assert len(a) == len(b)
    worst = 0.0
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.shape == y.shape, f"input {i}: {x.shape} vs the reference's {y.shape}"
        worst = max(worst, float(np.abs(np.asarray(x) - np.asarray(y)).max()))
    return worst


# ----------------------------------------------------------------------------- the folder
def test_pylate_folder_is_read(folders):
    ck = Checkpoint(folders["expand"])
    assert ck.kind == MULTIVECTOR and ck.config.vocab_size == 50370
    spec = ck.multivector
    assert (spec.dense, spec.in_features, spec.out_features, spec.bias) == ("1_Dense", 768, 128, False)
    assert (spec.query_prefix, spec.document_prefix, spec.query_length, spec.document_length) == ("[Q] ", "[D] ", 32, 300)
    assert spec.do_query_expansion and not spec.attend_to_expansion_tokens
    assert "," in spec.skiplist_words and "a" not in spec.skiplist_words
    assert json.loads((folders["expand"] / "modules.json").read_text())[1]["type"] == "pylate.models.Dense.Dense"
    m = MultiVectorEncoder.from_pretrained(folders["expand"], device="cpu")
    assert (m.query_prefix_id, m.document_prefix_id, m.mask_token_id) == (50368, 50369, 50284)
    assert "1_Dense/model.safetensors" in [f.relative_to(ck.folder).as_posix() for f in ck.decisive_files()]


def test_prefix_tokens_are_added_as_pylate_adds_them(tmp_path):
    ids = write_colbert_tokenizer(fixture_file("tokenizer.json"), tmp_path / "tokenizer.json")
    assert ids == [50368, 50369]
    added = {t["content"]: t for t in json.loads((tmp_path / "tokenizer.json").read_text())["added_tokens"]}
    assert added["[Q] "]["id"] == 50368 and added["[Q] "]["normalized"] and not added["[Q] "]["special"]


def test_pylate_defaults_fill_missing_fields(folders, tmp_path):
    folder = tmp_path / "defaults"
    shutil.copytree(folders["expand"], folder)
    (folder / "config_sentence_transformers.json").write_text(json.dumps({"model_type": "ColBERT"}))
    spec = Checkpoint(folder).multivector
    assert (spec.query_length, spec.document_length, spec.do_query_expansion, spec.attend_to_expansion_tokens) == \
        (32, 180, True, False)


def test_wrong_front_end_is_refused_naming_the_class(folders, tmp_path):
    with pytest.raises(CheckpointError, match="late-interaction .* not an embedder; load it with "
                                              "modernbert_embed.MultiVectorEncoder"):
        Embedder.from_pretrained(folders["expand"], device="cpu")
    with pytest.raises(CheckpointError, match="not a cross-encoder; load it with modernbert_embed.MultiVectorEncoder"):
        CrossEncoder.from_pretrained(folders["expand"], device="cpu")
    emb = write_random_checkpoint(tmp_path / "emb", REAL_VOCAB, tokenizer_json=fixture_file("tokenizer.json"))
    with pytest.raises(CheckpointError, match="not a multi-vector encoder; load it with modernbert_embed.Embedder"):
        MultiVectorEncoder.from_pretrained(emb, device="cpu")
    cls = write_random_checkpoint(tmp_path / "cls", classifier_config(REAL_VOCAB))
    with pytest.raises(CheckpointError, match="not a multi-vector encoder; load it with modernbert_embed.CrossEncoder"):
        MultiVectorEncoder.from_pretrained(cls, device="cpu")


@pytest.mark.parametrize("edit, message", [
    (lambda f: _json(f / "1_Dense/config.json", activation_function="torch.nn.modules.activation.Tanh"),
     "activation_function .*Tanh.* not supported"),
    (lambda f: _json(f / "1_Dense/config.json", in_features=512), "in_features 512 is not the backbone's hidden size"),
    (lambda f: _json(f / "config_sentence_transformers.json", query_length="32"), "query_length must be an int"),
    (lambda f: _json(f / "config_sentence_transformers.json", do_query_expansion="yes"),
     "do_query_expansion must be true or false"),
    (lambda f: (f / "modules.json").write_text(json.dumps(
        json.loads((f / "modules.json").read_text()) + [{"idx": 2, "name": "2", "path": "2_Pooling",
                                                          "type": "sentence_transformers.models.Pooling"}])),
     "Dense.* is not supported beside a Pooling module"),
    (lambda f: _add_mask(f, skiplist_tasks=["query", "document"]), "only a skiplist for documents is supported"),
])
def test_folders_it_cannot_run_exactly_are_refused(folders, tmp_path, edit, message):
    folder = tmp_path / "f"
    shutil.copytree(folders["expand"], folder)
    edit(folder)
    with pytest.raises(CheckpointError, match=message):
        Checkpoint(folder)


def test_a_prefix_the_tokenizer_lacks_is_refused(folders, tmp_path):
    folder = tmp_path / "f"
    shutil.copytree(folders["expand"], folder)
    _json(folder / "config_sentence_transformers.json", query_prefix="[QUERY] ")
    with pytest.raises(CheckpointError, match=r"prefix '\[QUERY\] ' is not a token"):
        MultiVectorEncoder.from_pretrained(folder, device="cpu")


@pytest.mark.slow
def test_dense_bias_is_applied(tmp_path):
    small = {**REAL_VOCAB, "vocab_size": 50370}
    kw = dict(seed=3, tokenizer_json=fixture_file("tokenizer.json"), colbert=colbert_st_config(), dense_dim=32)
    folder = write_random_checkpoint(tmp_path / "b", small, dense_bias=True, **kw)
    assert Checkpoint(folder).multivector.bias
    ours = MultiVectorEncoder.from_pretrained(folder, device="cpu").encode_document(DOCUMENTS[:2])
    ref = _st(folder).encode_document([t.strip() for t in DOCUMENTS[:2]], convert_to_numpy=True)
    assert _max_abs(ours, ref) <= 1e-4
    plain = write_random_checkpoint(tmp_path / "p", small, **kw)  # the same weights without the bias
    unbiased = MultiVectorEncoder.from_pretrained(plain, device="cpu").encode_document(DOCUMENTS[:2])
    assert _max_abs(ours, unbiased) > 1e-2


def _add_mask(folder, **config):
    """A sentence-transformers 6 MultiVectorMask module after the Dense, with `config`."""
    modules = json.loads((folder / "modules.json").read_text())
    modules.append({"idx": 2, "name": "2", "path": "2_MultiVectorMask",
                    "type": "sentence_transformers.multi_vector_encoder.modules.multi_vector_mask.MultiVectorMask"})
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "2_MultiVectorMask").mkdir()
    (folder / "2_MultiVectorMask" / "config.json").write_text(json.dumps(config))


def _json(path, **changes):
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))


# ----------------------------------------------------------------------------- tokenisation
def test_tokenisation_is_pylates(encoders):
    m = encoders["expand"]
    ids, truncated, keep, keys = m.tokenize(["  hello world  ", QUERIES[4]], is_query=True)
    plain, _ = m.tokenizer.encode(["hello world"], "", 31)
    assert ids[0][:2] == [50281, 50368] and ids[0][2:len(plain[0]) + 1] == plain[0][1:]
    assert len(ids[0]) == len(ids[1]) == 32 and ids[0][len(plain[0]) + 1:] == [50284] * (32 - len(plain[0]) - 1)
    assert keys == [len(plain[0]) + 1, 32] and truncated == [False, True] and keep is None
    assert ids[1][-1] == 50282  # a truncated query still ends with [SEP], then no [MASK]
    ids, truncated, keep, keys = m.tokenize([DOCUMENTS[2], DOCUMENTS[0]], is_query=False)
    assert len(ids[0]) == 300 and truncated == [True, False] and keys is None
    assert ids[1][1] == 50369 and ids[1][0] == 50281 and ids[1][-1] == 50282
    assert keep[1].tolist() == [t not in m.skiplist_ids for t in ids[1]] and not keep[1][-2]  # the final "."
    ids, _, _, keys = encoders["expand-attend"].tokenize(["hello"], is_query=True)
    assert len(ids[0]) == 32 and keys is None
    ids, _, _, keys = encoders["no-expansion"].tokenize(["hello"], is_query=True)
    assert len(ids[0]) == 4 and keys is None


# ----------------------------------------------------------------------------- parity
@pytest.mark.slow
@pytest.mark.parametrize("variant", PARITY_VARIANTS)
def test_matches_sentence_transformers_multivector_encoder(encoders, st_outputs, variant):
    m = encoders[variant]
    q_ref, d_ref, s_ref = st_outputs[variant]
    q = m.encode_query(QUERIES, batch_size=3)
    d = m.encode_document(DOCUMENTS, max_batch_tokens=512)  # several packed batches, mixed lengths
    assert all(a.dtype == np.float32 for a in q + d)
    assert _max_abs(q, q_ref) <= 1e-4
    assert _max_abs(d, d_ref) <= 1e-4
    if m.do_query_expansion:
        assert all(len(a) == m.query_length for a in q)
    s = m.similarity(q, d).numpy()
    np.testing.assert_allclose(s, s_ref, atol=1e-4, rtol=0)
    for i in range(len(QUERIES)):
        assert np.argsort(-s[i], kind="stable").tolist() == np.argsort(-s_ref[i], kind="stable").tolist()


@pytest.mark.slow
def test_mixing_up_query_and_document_prefixes_fails_parity(folders, st_outputs):
    m = MultiVectorEncoder.from_pretrained(folders["expand"], device="cpu")
    m.query_prefix_id, m.document_prefix_id = m.document_prefix_id, m.query_prefix_id
    q_ref, d_ref, _ = st_outputs["expand"]
    assert _max_abs(m.encode_query(QUERIES), q_ref) > 1e-2
    assert _max_abs(m.encode_document(DOCUMENTS), d_ref) > 1e-2


def test_unattended_expansion_is_not_plain_attention(encoders):
    """With attend_to_expansion_tokens false the [MASK]s see the real tokens and no one sees them:
    the real tokens are as without expansion, the [MASK] rows are not what ordinary attention over
    all 32 tokens gives (that is attend_to_expansion_tokens true)."""
    expand, attend, plain = encoders["expand"], encoders["expand-attend"], encoders["no-expansion"]
    texts = QUERIES[:3]
    e, a, p = expand.encode_query(texts), attend.encode_query(texts), plain.encode_query(texts)
    for x, y, z in zip(e, a, p):
        n = len(z)
        np.testing.assert_allclose(x[:n], z, atol=1e-5, rtol=0)  # real tokens: as if alone
        assert np.abs(x[:n] - y[:n]).max() > 1e-2  # attending to the [MASK]s changes them
        assert np.abs(x[n:] - y[n:]).max() > 1e-2
    ids, _, _, keys = expand.tokenize(texts, is_query=True)
    out, offsets = expand.engine.tokens(ids)  # every token a key: plain varlen attention
    np.testing.assert_allclose(out[offsets[0]:offsets[1]].numpy(), a[0], atol=1e-5, rtol=0)


def test_packing_and_batching_do_not_change_vectors(encoders):
    m = encoders["expand"]
    docs = [DOCUMENTS[i] for i in (0, 1, 3, 5)]
    one = m.encode_document(docs, max_batch_tokens=100000)
    many = m.encode_document(docs, max_batch_tokens=150, batch_size=2)
    alone = [m.encode_document(t) for t in docs]
    assert _max_abs(one, many) <= 1e-5 and _max_abs(one, alone) <= 1e-5
    q = m.encode_query(QUERIES, batch_size=1)
    assert _max_abs(q, m.encode_query(QUERIES)) <= 1e-5


def test_skiplist_tokens_leave_documents_only(encoders):
    m = encoders["expand"]
    d = m.encode_document(["a, b; c!"])
    ids, _, _, _ = m.tokenize(["a, b; c!"], is_query=False)
    kept = [t for t in ids[0] if t not in m.skiplist_ids]
    assert len(d[0]) == len(kept) < len(ids[0])
    q = encoders["no-expansion"].encode_query(["a, b; c!"])
    assert len(q[0]) == len(ids[0])  # queries keep every position


def test_output_forms_and_truncate_dim(encoders):
    m = encoders["expand"]
    single = m.encode_document(DOCUMENTS[0])
    assert isinstance(single, np.ndarray) and single.shape[1] == 128
    t = m.encode_document(DOCUMENTS[:2], convert_to_tensor=True)
    assert isinstance(t[0], torch.Tensor) and t[0].dtype == torch.float32
    np.testing.assert_allclose(t[0].numpy(), single, atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(single, axis=1), 1.0, atol=1e-5)
    short = m.encode_document(DOCUMENTS[0], truncate_dim=64)
    ref = single[:, :64] / np.linalg.norm(single[:, :64], axis=1, keepdims=True)
    np.testing.assert_allclose(short, ref, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="truncate_dim must be an int in 1..128"):
        m.encode_document("x", truncate_dim=129)
    with pytest.raises(TypeError, match="input 1 is None"):
        m.encode_query(["a", None])


# ----------------------------------------------------------------------------- MaxSim
def test_maxsim_is_the_sum_of_best_matches():
    g = np.random.default_rng(0)
    unit = lambda n: (lambda x: x / np.linalg.norm(x, axis=1, keepdims=True))(g.standard_normal((n, 8)))  # noqa: E731
    qs, ds = [unit(3), unit(5)], [unit(4), unit(1), unit(7)]
    ref = np.array([[(q @ d.T).max(axis=1).sum() for d in ds] for q in qs])
    np.testing.assert_allclose(maxsim(qs, ds).numpy(), ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(maxsim_pairwise(qs, ds[:2]).numpy(), ref[[0, 1], [0, 1]], atol=1e-5, rtol=0)
    neg = [-np.ones((1, 8)) / np.sqrt(8)]  # all similarities negative: no padding may count as 0
    assert maxsim([np.ones((1, 8)) / np.sqrt(8)], neg + [np.ones((2, 8)) / np.sqrt(8)]).numpy()[0, 0] == pytest.approx(-1)


def test_rank_orders_by_maxsim(encoders):
    m = encoders["expand"]
    hits = m.rank(QUERIES[0], DOCUMENTS, top_k=3, return_documents=True)
    scores = m.similarity(m.encode_query([QUERIES[0]]), m.encode_document(DOCUMENTS)).numpy()[0]
    order = np.argsort(-scores, kind="stable")[:3].tolist()
    assert [h["corpus_id"] for h in hits] == order
    assert [h["text"] for h in hits] == [DOCUMENTS[i] for i in order]
    assert hits[0]["score"] == pytest.approx(float(scores[order[0]]), abs=1e-5)
    with pytest.raises(ValueError, match="top_k"):
        m.rank("q", ["d"], top_k=0)


def test_bfloat16_stays_close_to_float32(folders, encoders):
    m = MultiVectorEncoder.from_pretrained(folders["expand"], device="cpu", dtype=torch.bfloat16)
    for got, ref in ((m.encode_query(QUERIES), encoders["expand"].encode_query(QUERIES)),
                     (m.encode_document(DOCUMENTS), encoders["expand"].encode_document(DOCUMENTS))):
        for a, b in zip(got, ref):
            assert a.shape == b.shape and a.dtype == np.float32
            assert (a * b).sum(axis=1).min() >= 0.999  # unit vectors: the dot product is the cosine


@pytest.mark.gpu  # run by the device check's GPU-marked tests
@requires_cuda
def test_gpu_keeps_the_head_on_the_device_and_matches_the_cpu(folders, encoders):
    """On a GPU the projection and the per-token normalisation run on the device (tensors come back
    there); float32 matches the CPU, bfloat16 within cosine 0.999, expansion included."""
    cpu = encoders["expand"]
    ref_q, ref_d = cpu.encode_query(QUERIES), cpu.encode_document(DOCUMENTS)
    for dtype, check in ((torch.float32, lambda a, b: np.abs(a - b).max() <= 1e-3),
                         (torch.bfloat16, lambda a, b: (a * b).sum(axis=1).min() >= 0.999)):
        m = MultiVectorEncoder.from_pretrained(folders["expand"], device="cuda", dtype=dtype)
        t = m.encode_query(QUERIES, convert_to_tensor=True)
        assert t[0].device.type == "cuda" and t[0].dtype == torch.float32
        for got, ref in ((m.encode_query(QUERIES), ref_q), (m.encode_document(DOCUMENTS), ref_d)):
            for a, b in zip(got, ref, strict=True):
                assert a.shape == b.shape and check(a, b), dtype


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["expand", "expand-attend", "no-expansion"])
def test_sentence_transformers_6_saves_load_alike(folders, encoders, tmp_path, variant):
    """A folder saved by sentence-transformers 6's MultiVectorEncoder (its own module names, the
    prefixes as prompts, the lengths and expansion in the Transformer config, a MultiVectorMask
    holding the skiplist) reads into the same spec and gives the same vectors."""
    _st(folders[variant]).save(str(tmp_path / "st6"))
    assert json.loads((tmp_path / "st6" / "config_sentence_transformers.json").read_text())["model_type"] == \
        "MultiVectorEncoder"
    assert Checkpoint(tmp_path / "st6").multivector == Checkpoint(folders[variant]).multivector
    m = MultiVectorEncoder.from_pretrained(tmp_path / "st6", device="cpu")
    ref = encoders[variant]
    assert _max_abs(m.encode_query(QUERIES), ref.encode_query(QUERIES)) == 0
    assert _max_abs(m.encode_document(DOCUMENTS), ref.encode_document(DOCUMENTS)) == 0
