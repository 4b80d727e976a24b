"""CrossEncoder: parity with sentence-transformers' CrossEncoder (predict, rank) and transformers'
ModernBertForSequenceClassification, on random weights in the real classifier layout (the real
tokenizer, `model.*` / `head.*` / `classifier.*`), for classifier_pooling mean and cls, one and
three labels, classifier_bias, an Identity activation_fn in config, pairs past the 128-token
window, bf16; and its promises: packed under the token budget, truncation reported, wrong folders
refused naming the class to use."""

import warnings

import numpy as np
import pytest
import torch

from modernbert_embed import CheckpointError, CrossEncoder, Embedder, TruncationWarning
from modernbert_embed.batching import plan_batches
from modernbert_embed.weights import classifier_config, write_random_checkpoint

from conftest import fixture_file
from helpers import REAL_VOCAB

transformers = pytest.importorskip("transformers", reason="parity tests need transformers (test extra)")
st = pytest.importorskip("sentence_transformers", reason="parity tests need sentence-transformers")

IDENTITY = "torch.nn.modules.linear.Identity"
LONG_A = "how to implement quick sort in python? " * 25  # ~230 tokens: past the 128-token window
LONG_B = "Quick sort picks a pivot and partitions the array around it. " * 30
PAIRS = [
    ("what is the capital of China?", "Beijing"),
    ("how to implement quick sort in python?", "Introduction of quick sort"),
    ("how to implement quick sort in python?", "The weather is nice today"),
    ("", "an empty query"),
    (LONG_A, "short"),
    ("short", LONG_B),
    (LONG_A, LONG_B),
    ("naïve café 東京", "a  b   c\n\td"),
]


def write(tmp_path, name, seed=0, **kw):
    max_seq_length = kw.pop("max_seq_length", None)
    cfg = classifier_config(REAL_VOCAB, **kw)
    return write_random_checkpoint(tmp_path / name, cfg, seed=seed, tokenizer_json=fixture_file("tokenizer.json"),
                                   max_seq_length=max_seq_length)


def quiet_st(folder, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return st.CrossEncoder(str(folder), device="cpu", **kw)


def transformers_logits(folder, pairs, max_length, dtype=torch.float32) -> torch.Tensor:
    """transformers' ModernBertForSequenceClassification (SDPA), one pair at a time (no padding),
    tokenised by transformers' own tokenizer: float32 logits [n, num_labels]."""
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    model = transformers.ModernBertForSequenceClassification.from_pretrained(
        str(folder), attn_implementation="sdpa", dtype=dtype).eval()
    out = []
    with torch.inference_mode():
        for a, b in pairs:
            enc = tok(a, b, truncation=True, max_length=max_length, return_tensors="pt")
            out.append(model(**enc).logits[0].float())
    return torch.stack(out)


CASES = [  # (name, config keywords)
    ("mean-1", dict(num_labels=1, pooling="mean")),
    ("cls-1", dict(num_labels=1, pooling="cls")),
    ("mean-3-bias", dict(num_labels=3, pooling="mean", classifier_bias=True)),
    ("cls-3", dict(num_labels=3, pooling="cls")),
    ("mean-1-identity", dict(num_labels=1, pooling="mean", activation_fn=IDENTITY)),
]


@pytest.mark.parametrize("name,kw", CASES, ids=[c[0] for c in CASES])
def test_predict_equals_sentence_transformers_and_transformers(tmp_path, name, kw):
    folder = write(tmp_path, name, seed=len(name), max_seq_length=400, **kw)
    ours = CrossEncoder.from_pretrained(folder, device="cpu")
    ref = quiet_st(folder)
    assert ours.max_seq_length == 400 == ref.max_seq_length
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TruncationWarning)
        got = ours.predict(PAIRS)
        logits = ours.predict(PAIRS, activation_fn=torch.nn.Identity())
    expected = ref.predict(PAIRS)
    assert got.shape == expected.shape == ((len(PAIRS),) if kw["num_labels"] == 1 else (len(PAIRS), 3))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-5)
    if kw.get("activation_fn") == IDENTITY:  # raw logits, from the folder's own activation
        np.testing.assert_array_equal(got, logits)
    ref_logits = transformers_logits(folder, PAIRS, 400).numpy()
    np.testing.assert_allclose(logits, ref_logits.squeeze(-1) if kw["num_labels"] == 1 else ref_logits,
                               atol=2e-5, rtol=1e-5)
    if kw["num_labels"] > 1:
        np.testing.assert_allclose(ours.predict(PAIRS[:3], apply_softmax=True),
                                   ref.predict(PAIRS[:3], apply_softmax=True), atol=1e-6)


def test_pooling_and_head_bias_matter(tmp_path):
    """The same weights with the other pooling, or without the head's dense bias, score
    differently: the parity above can see a pooling or bias mistake."""
    mean = CrossEncoder.from_pretrained(write(tmp_path, "m", seed=3, num_labels=1, pooling="mean"))
    cls = CrossEncoder.from_pretrained(write(tmp_path, "c", seed=3, num_labels=1, pooling="cls"))
    a, b = mean.predict(PAIRS[:4]), cls.predict(PAIRS[:4])
    assert np.abs(a - b).max() > 1e-2
    biased = CrossEncoder.from_pretrained(write(tmp_path, "b", seed=3, num_labels=1, pooling="mean",
                                                classifier_bias=True))
    with_bias = biased.predict(PAIRS[:4])
    biased.engine.head.head.dense.bias.zero_()
    assert np.abs(biased.predict(PAIRS[:4]) - with_bias).max() > 1e-2


def test_rank_equals_sentence_transformers(tmp_path):
    folder = write(tmp_path, "r", seed=5, num_labels=1, pooling="mean")
    ours, ref = CrossEncoder.from_pretrained(folder), quiet_st(folder)
    query = "how to implement quick sort in python?"
    docs = [d for _, d in PAIRS] + ["quick sort " * n for n in (1, 5, 50)]
    got = ours.rank(query, docs, return_documents=True)
    expected = ref.rank(query, docs, return_documents=True)
    assert [r["corpus_id"] for r in got] == [r["corpus_id"] for r in expected]
    assert [r["text"] for r in got] == [r["text"] for r in expected]
    np.testing.assert_allclose([r["score"] for r in got], [r["score"] for r in expected], atol=2e-6)
    top = ours.rank(query, docs, top_k=3)
    assert top == [{k: r[k] for k in ("corpus_id", "score")} for r in got[:3]]


def test_rank_refused_for_several_labels(tmp_path):
    ce = CrossEncoder.from_pretrained(write(tmp_path, "three", num_labels=3, pooling="cls"))
    assert ce.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}
    with pytest.raises(ValueError, match="rank needs a model with one label; this one has 3"):
        ce.rank("q", ["d"])


def test_single_texts_for_a_single_sequence_classifier(tmp_path):
    folder = write(tmp_path, "single", seed=6, num_labels=3, pooling="cls")
    ours, ref = CrossEncoder.from_pretrained(folder), quiet_st(folder)
    for text in ("hello world", LONG_A):
        np.testing.assert_allclose(ours.predict(text), ref.predict(text), atol=2e-5, rtol=1e-5)
    # a batch of single texts, beside pairs, each as it is alone
    batch = ours.predict([["hello world"], ("a", "b"), "plain"])
    np.testing.assert_allclose(batch[0], ours.predict("hello world"), atol=1e-5)
    np.testing.assert_allclose(batch[1], ours.predict(("a", "b")), atol=1e-5)
    np.testing.assert_allclose(batch[2], ours.predict("plain"), atol=1e-5)


def test_bf16_logits_against_fp32(tmp_path):
    """bf16 weights: logits (float32) close to transformers' fp32 ones by cosine and max abs."""
    folder = write(tmp_path, "bf16", seed=7, num_labels=3, pooling="mean")
    ours = CrossEncoder.from_pretrained(folder, device="cpu", dtype="bfloat16")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TruncationWarning)
        got = ours.predict(PAIRS, convert_to_tensor=True, activation_fn=torch.nn.Identity())
    assert got.dtype == torch.float32
    ref = transformers_logits(folder, PAIRS, 8192)
    cos = torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0).item()
    worst = (got - ref).abs().max().item()
    assert cos >= 0.999 and worst <= 0.05 * ref.abs().max().item(), (cos, worst)
    # one label: the sigmoid of float32 logits keeps close pairs apart (no bf16 ties)
    one = CrossEncoder.from_pretrained(write(tmp_path, "bf16-1", seed=8), dtype="bfloat16")
    scores = one.predict([("q", "quick sort " * n) for n in range(1, 30)])
    assert scores.dtype == np.float32 and len(set(scores.tolist())) == len(scores)


def test_pairs_are_packed_under_the_token_budget(tmp_path, monkeypatch):
    """A rerank of one query and 200 documents of mixed lengths is one stream of packed
    forwards (as many as the plan under the budget, far fewer than padded batches of 32), and
    each score is the one the document gets alone."""
    ce = CrossEncoder.from_pretrained(write(tmp_path, "pack", seed=9))
    rng = np.random.default_rng(0)
    docs = [" ".join(["word"] * int(n)) for n in rng.integers(1, 300, size=200)]
    forwards = []
    model = ce.engine.model
    real = model.forward
    monkeypatch.setattr(model, "forward", lambda batch: forwards.append(batch.num_tokens) or real(batch))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is truncated here
        scores = ce.predict([("the query", d) for d in docs], max_batch_tokens=8192)
    ids, _ = ce.tokenize([("the query", d) for d in docs])
    assert len(forwards) == len(plan_batches([len(s) for s in ids], 8192)) <= 5
    assert sum(forwards) == sum(len(s) for s in ids) and max(forwards) <= 8192
    monkeypatch.setattr(model, "forward", real)
    alone = np.array([ce.predict(("the query", docs[i])) for i in (0, 57, 199)])
    np.testing.assert_allclose(scores[[0, 57, 199]], alone, atol=1e-5)


def test_truncation_is_reported(tmp_path):
    folder = write(tmp_path, "trunc", seed=10, max_seq_length=64)
    ce, ref = CrossEncoder.from_pretrained(folder), quiet_st(folder)
    assert ce.max_seq_length == 64
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ce.predict(PAIRS[:3])  # all fit: no warning
    with pytest.warns(TruncationWarning, match=r"2 of 3 input\(s\) .* max_seq_length=64 .*: \[1, 2\]"):
        got = ce.predict([PAIRS[0], (LONG_A, "x"), ("x", LONG_B)])
    ids, truncated = ce.tokenize([(LONG_A, "x"), ("x", LONG_B)])
    assert truncated == [True, True] and all(len(s) == 64 for s in ids)
    # truncated longest first, as sentence-transformers does
    np.testing.assert_allclose(got, ref.predict([PAIRS[0], (LONG_A, "x"), ("x", LONG_B)]), atol=2e-5)


def test_wrong_folders_are_refused_naming_the_class(tmp_path):
    reranker = write(tmp_path, "reranker")
    with pytest.raises(CheckpointError, match="cross-encoder, not an embedder; load it with modernbert_embed.CrossEncoder"):
        Embedder.from_pretrained(reranker)
    embedder = write_random_checkpoint(tmp_path / "embedder", REAL_VOCAB, tokenizer_json=fixture_file("tokenizer.json"))
    with pytest.raises(CheckpointError, match="embedder .* not a cross-encoder; load it with modernbert_embed.Embedder"):
        CrossEncoder.from_pretrained(embedder)


def test_bad_inputs_are_named(tmp_path):
    ce = CrossEncoder.from_pretrained(write(tmp_path, "bad"))
    with pytest.raises(TypeError, match="input 1 is neither a text nor a pair"):
        ce.predict([("a", "b"), ("a", "b", "c")])
    with pytest.raises(TypeError, match="input 0 is neither a text nor a pair"):
        ce.predict([("a", None)])
    with pytest.raises(TypeError, match="document 1 is None"):
        ce.rank("q", ["a", None])
    with pytest.raises(ValueError, match="top_k"):
        ce.rank("q", ["a"], top_k=0)
    assert ce.predict([]).shape == (0,)


def test_head_config_is_read_strictly(tmp_path):
    with pytest.raises(CheckpointError, match="classifier_pooling 'max' is not supported"):
        CrossEncoder.from_pretrained(write(tmp_path, "p", pooling="max"))
    with pytest.raises(CheckpointError, match="classifier_activation 'mish' is not supported"):
        CrossEncoder.from_pretrained(write(tmp_path, "a", classifier_activation="mish"))
    with pytest.raises(CheckpointError, match="only torch.nn classes|not a torch.nn class"):
        CrossEncoder.from_pretrained(write(tmp_path, "f", activation_fn="os.system"))
    # a head tensor missing from the file is named
    from safetensors.torch import load_file, save_file

    folder = write(tmp_path, "missing", classifier_bias=True)
    sd = load_file(folder / "model.safetensors")
    del sd["head.dense.bias"]
    save_file(sd, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing tensors: \\['head.dense.bias'\\]"):
        CrossEncoder.from_pretrained(folder)


def test_a_classifier_activation_other_than_gelu(tmp_path):
    folder = write(tmp_path, "silu", seed=11, num_labels=2, classifier_activation="silu")
    ours = CrossEncoder.from_pretrained(folder)
    ref = transformers_logits(folder, PAIRS[:3], 8192).numpy()
    np.testing.assert_allclose(ours.predict(PAIRS[:3]), ref, atol=2e-5, rtol=1e-5)  # identity for 2 labels


def test_the_server_runs_a_reranker_but_not_on_its_embedding_routes(tmp_path):
    """The server wraps the loaded model; its embedding routes do not run a classifier's backbone
    (they refuse it naming its kind), its rerank routes do."""
    pytest.importorskip("starlette", reason="the server needs starlette (server extra)")
    from modernbert_embed.server import create_app
    from modernbert_embed.server.errors import ApiError

    ce = CrossEncoder.from_pretrained(write(tmp_path, "served"))
    state = create_app(ce).state
    try:
        with pytest.raises(ApiError, match="is a reranker .*: /embed needs an embedder"):
            state.pick(None, "embed", "/embed")
        assert state.pick(None, "rerank", "/rerank").loaded is ce.loaded
    finally:
        state.pool.shutdown()
        state.large_pool.shutdown()


def test_a_folder_saved_by_sentence_transformers_loads_with_its_activation(tmp_path):
    """sentence-transformers 6 saves a cross-encoder with modules.json naming
    `sentence_transformers.base.modules.transformer.Transformer` and the activation in
    config_sentence_transformers.json, which wins over config.json's."""
    import json

    ref = quiet_st(write(tmp_path, "orig", seed=12, num_labels=1), activation_fn=torch.nn.Identity())
    ref.save(str(tmp_path / "saved"))
    saved = json.loads((tmp_path / "saved" / "config_sentence_transformers.json").read_text())
    assert saved.get("activation_fn") == IDENTITY
    ours = CrossEncoder.from_pretrained(tmp_path / "saved")
    assert isinstance(ours.activation_fn, torch.nn.Identity)
    np.testing.assert_allclose(ours.predict(PAIRS[:3]), quiet_st(tmp_path / "saved").predict(PAIRS[:3]), atol=2e-5)


def test_the_fingerprint_of_a_classifier_covers_its_activation_and_length(tmp_path):
    import json

    from modernbert_embed import Checkpoint

    folder = write(tmp_path, "fp")
    before = Checkpoint(folder).fingerprint
    (folder / "config_sentence_transformers.json").write_text(json.dumps({"activation_fn": IDENTITY}))
    after_activation = Checkpoint(folder).fingerprint
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))
    assert len({before, after_activation, Checkpoint(folder).fingerprint}) == 3
