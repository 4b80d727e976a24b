"""The Embedder's promises: order kept, one output per input, batch-mates don't matter, no NaN,
and bad input gets an error that names the problem."""

import numpy as np
import pytest
import torch

from modernbert_embed import CheckpointError, Embedder
from modernbert_embed.batching import plan_batches
from modernbert_embed.weights import write_random_checkpoint

from conftest import SMALL_CONFIG, TEST_DEVICE, fixture_file, random_ids
from helpers import REAL_VOCAB


@pytest.fixture(scope="module")
def model(small_checkpoint):
    return Embedder.from_pretrained(small_checkpoint, device=TEST_DEVICE, dtype="float32")


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("text")
    write_random_checkpoint(folder, REAL_VOCAB, seed=11, tokenizer_json=fixture_file("tokenizer.json"))
    return Embedder.from_pretrained(folder, device=TEST_DEVICE, dtype="float32")


def test_batch_mates_do_not_matter(model):
    ids = random_ids([3, 65, 130, 300, 1, 64, 129, 500, 2, 77], seed=21)
    together = model.encode_tokens(ids, max_batch_tokens=4096)
    alone = np.stack([model.encode_tokens([s])[0] for s in ids])
    assert np.abs(together - alone).max() <= 1e-5
    # and with a tiny budget every sequence sits in a different batch
    split = model.encode_tokens(ids, max_batch_tokens=1, batch_size=1)
    assert np.abs(together - split).max() <= 1e-5


def test_order_and_count_are_kept(model):
    ids = random_ids([50, 3, 200, 3, 120, 9], seed=22)
    ids[3] = list(ids[1])  # a duplicate
    emb = model.encode_tokens(ids, max_batch_tokens=128, batch_size=2)
    assert emb.shape == (6, 128)
    for i, s in enumerate(ids):
        assert np.allclose(emb[i], model.encode_tokens([s])[0], atol=1e-5)
    assert np.allclose(emb[1], emb[3], atol=1e-6)
    reversed_emb = model.encode_tokens(ids[::-1], max_batch_tokens=128)
    assert np.allclose(reversed_emb[::-1], emb, atol=1e-5)


def test_no_nan_beside_8k(model):
    # a NaN anywhere in an input's hidden states would reach its mean: the pooled rows show it
    ids = random_ids([8192, 3, 1, 2, 4000], seed=23)
    emb = model.encode_tokens(ids)
    assert emb.shape == (5, 128) and np.isfinite(emb).all()
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_max_batch_tokens_none_means_the_default(model):
    # None is what the corpus command and the Ray adapter pass when the user gave no budget
    ids = random_ids([40, 7, 300], seed=27)
    np.testing.assert_array_equal(model.encode_tokens(ids, max_batch_tokens=None), model.encode_tokens(ids))


def test_the_default_budget_follows_the_device(model, monkeypatch):
    from modernbert_embed import batching
    from modernbert_embed.ops import default_max_batch_tokens

    assert default_max_batch_tokens("cpu") == 4096 and default_max_batch_tokens("cuda") == 16384
    assert model.engine.max_batch_tokens == default_max_batch_tokens(model.device)
    # a call without a budget plans under the engine's
    seen = []
    monkeypatch.setattr(model.engine, "max_batch_tokens", 300)
    real = batching.plan_batches
    monkeypatch.setattr("modernbert_embed.engine.plan_batches", lambda lengths, budget, *a: seen.append(budget)
                        or real(lengths, budget, *a))
    model.encode_tokens(random_ids([200, 200, 7], seed=28))
    assert seen == [300]


def test_the_engine_refuses_a_zero_budget_instead_of_defaulting(model):
    assert model.engine.budget(None) == model.engine.max_batch_tokens and model.engine.budget(64) == 64
    with pytest.raises(ValueError, match="max_batch_tokens must be >= 1, got 0"):
        model.engine.embed(random_ids([5], seed=1), max_batch_tokens=0)


def test_matryoshka_and_normalisation(model):
    ids = random_ids([10, 80], seed=24)
    full = model.encode_tokens(ids, normalize_embeddings=False)
    cut = model.encode_tokens(ids, truncate_dim=32)
    expect = full[:, :32] / np.linalg.norm(full[:, :32], axis=1, keepdims=True)
    assert np.allclose(cut, expect, atol=1e-6)
    assert not np.allclose(np.linalg.norm(full, axis=1), 1.0)
    half = model.encode_tokens(ids, precision="float16")
    assert half.dtype == np.float16 and np.allclose(half, model.encode_tokens(ids), atol=1e-3)
    t = model.encode_tokens(ids, convert_to_tensor=True)
    assert isinstance(t, torch.Tensor) and t.shape == (2, 128)


def test_cls_pooling(tmp_path):
    folder = write_random_checkpoint(tmp_path, SMALL_CONFIG, seed=12, pooling="cls")
    m = Embedder.from_pretrained(folder, device=TEST_DEVICE, dtype="float32")
    ids = random_ids([5, 70], seed=25)
    hidden = m.hidden_states(ids)
    emb = m.encode_tokens(ids)
    for h, e in zip(hidden, emb):
        assert np.allclose(e, torch.nn.functional.normalize(h[0], dim=0).numpy(), atol=1e-6)


def test_plan_batches_budget_and_cover():
    lengths = [5, 300, 1, 9000, 64, 64, 200, 7]
    plan = plan_batches(lengths, max_batch_tokens=400, batch_size=3)
    assert sorted(i for b in plan for i in b) == list(range(len(lengths)))
    for b in plan:
        assert len(b) <= 3
        assert len(b) == 1 or sum(lengths[i] for i in b) <= 400
    assert plan[0] == [3]  # longest first, alone over budget


# ------------------------------------------------------------------ text input
def test_pack_layout():
    from modernbert_embed.batching import pack

    seqs = [[5, 6, 7], [8], [9, 10], list(range(11, 80))]
    b = pack(seqs, [3, 0, 2, 1])
    assert b.input_ids.tolist() == seqs[3] + seqs[0] + seqs[2] + seqs[1]
    assert b.positions.tolist() == list(range(69)) + [0, 1, 2] + [0, 1] + [0]
    assert b.cu_seqlens.dtype == torch.int32 and b.cu_seqlens.tolist() == [0, 69, 72, 74, 75]
    assert (b.max_seqlen, b.lengths, b.order) == (69, (69, 3, 2, 1), (3, 0, 2, 1))
    assert b.input_ids.dtype == b.positions.dtype == torch.int64


def test_engine_reports_every_batch_in_order(model):
    # the batch loop behind every front end: rows land in input order whatever the plan, and
    # on_batch hears of every batch once, with its documents and tokens
    ids = random_ids([5, 300, 1, 77, 129, 64, 2, 400, 33], seed=7)
    plan = plan_batches([len(s) for s in ids], max_batch_tokens=450)
    assert len(plan) > 2
    seen = []
    out = model.engine.embed(ids, dim=64, max_batch_tokens=450, on_batch=lambda n, t: seen.append((n, t)))
    assert seen == [(len(b), sum(len(ids[i]) for i in b)) for b in plan]
    ref = model.encode_tokens(ids, truncate_dim=64, convert_to_tensor=True, max_batch_tokens=10**6)
    assert out.shape == (len(ids), 64)
    assert torch.allclose(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dim, error, message", [
    (0, ValueError, r"dim must be in 1\.\.128 \(this model's hidden size\), got 0"),
    (129, ValueError, r"dim must be in 1\.\.128 \(this model's hidden size\), got 129"),
    (-3, ValueError, r"dim must be in 1\.\.128 .*got -3"),
    (2.0, TypeError, "dim must be an int or None, got float"),
    (True, TypeError, "dim must be an int or None, got bool"),
])
def test_engine_refuses_a_dim_outside_the_model(model, dim, error, message):
    # 0 is not "the default" (None is) and a width past the model's is not cut down to it
    ids = random_ids([5, 9], seed=3)
    with pytest.raises(error, match=message):
        model.engine.embed(ids, dim=dim)


def test_engine_dim_none_is_the_hidden_size(model):
    ids = random_ids([5, 9], seed=3)
    full = model.engine.embed(ids)
    assert full.shape == (2, model.config.hidden_size)
    assert torch.equal(model.engine.embed(ids, dim=None), full)
    assert torch.equal(model.engine.embed(ids, dim=model.config.hidden_size), full)


def test_prompts_and_texts(text_model):
    tok = text_model.tokenizer
    q = text_model.encode_query(["What is TSNE?"])
    p = text_model.encode(["What is TSNE?"], prompt="search_query: ")
    assert np.allclose(q, p)
    ids, _ = tok.encode(["What is TSNE?"], "search_query: ")
    assert ids[0] == [50281, 8716, 64, 7267, 27, 1737, 310, 22465, 6603, 32, 50282]
    assert np.allclose(text_model.encode_tokens(ids), q, atol=1e-6)
    d = text_model.encode_document(["x"])
    did, _ = tok.encode(["x"], "search_document: ")
    assert np.allclose(text_model.encode_tokens(did), d, atol=1e-6)
    single = text_model.encode("Hello World!")
    assert single.shape == (128,)
    assert text_model.tokenizer.encode(["Hello World!"])[0][0] == [50281, 12092, 3645, 2, 50282]
    empty = text_model.encode([""])
    assert empty.shape == (1, 128) and np.isfinite(empty).all()
    assert text_model.encode([]).shape == (0, 128)
    assert text_model.encode([], truncate_dim=16).shape == (0, 16)
    # similarity is the cosine: scaling either side changes nothing
    sim = text_model.similarity(3 * q, 0.5 * d)
    assert sim.shape == (1, 1) and float(sim) == pytest.approx(float(q[0] @ d[0]), abs=1e-6)


def test_text_path_tokenised_beside_the_model(text_model, monkeypatch):
    # On a GPU, encode tokenises chunk k + 1 in a thread while chunk k runs. Forced here on the
    # CPU with chunks of 7 texts: same rows, in input order, as tokenising everything first.
    rng = np.random.default_rng(3)
    words = ["tsne", "embedding", "of", "the", "a", "vector", "graph", "model", "search", "ünïcode", "中文"]
    texts = [" ".join(rng.choice(words, size=int(n))) for n in rng.integers(0, 90, size=30)]
    ref = text_model.encode(texts, prompt_name="search_document", truncate_dim=128)
    monkeypatch.setattr(text_model, "tokenize_chunk", 7)
    monkeypatch.setattr(text_model, "tokenize_beside_model", True)
    calls = []
    encode = text_model.tokenizer.encode
    monkeypatch.setattr(text_model.tokenizer, "encode", lambda t, *a: calls.append(len(t)) or encode(t, *a))
    out = text_model.encode(texts, prompt_name="search_document", truncate_dim=128, batch_size=3,
                            show_progress_bar=True)
    assert calls == [7, 7, 7, 7, 2]  # chunk by chunk
    assert out.shape == ref.shape and np.allclose(out, ref, atol=1e-5), np.abs(out - ref).max()
    single = text_model.encode(texts[11], prompt_name="search_document", truncate_dim=128)
    assert np.allclose(out[11], single, atol=1e-5)


def test_truncation_at_max_seq_length(text_model):
    text = "word " * 9000
    ids, truncated = text_model.tokenize([text, "short"])
    assert len(ids[0]) == 8192 and ids[0][0] == 50281 and ids[0][-1] == 50282
    assert truncated == [True, False]
    text_model.max_seq_length = 100
    try:
        ids, _ = text_model.tokenize([text])
        assert len(ids[0]) == 100 and ids[0][-1] == 50282
    finally:
        text_model.max_seq_length = 8192


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "texts, kwargs, error, message",
    [
        (["ok", 3], {}, TypeError, "input 1 is a int"),
        (["ok", "ok", None], {}, TypeError, "input 2 is None"),
        (["ok"], {"truncate_dim": 0}, ValueError, "truncate_dim must be >= 1, got 0"),
        (["ok"], {"truncate_dim": 129}, ValueError, "truncate_dim must be in 1..128, got 129"),
        (["ok"], {"truncate_dim": "8"}, TypeError, "truncate_dim must be an int, got str"),
        (["ok"], {"max_batch_tokens": 0}, ValueError, "max_batch_tokens must be >= 1, got 0"),
        (["ok"], {"overlap": 4}, ValueError, "overlap applies to long='chunk' only"),
        (["ok"], {"long": "cut"}, ValueError, "long 'cut' is not supported"),
        (["ok"], {"ranges": [[0.0], [1.0]]}, ValueError, "ranges applies to precision int8 and uint8, not 'float32'"),
        (["ok"], {"prompt": "x", "prompt_name": "clustering"}, ValueError, "either prompt or prompt_name"),
        (["ok"], {"prompt_name": "query"}, ValueError, "unknown prompt_name 'query'"),
        (["ok"], {"precision": "int4"}, ValueError, "precision 'int4'"),
    ],
)
def test_bad_text_input(text_model, texts, kwargs, error, message):
    with pytest.raises(error, match=message):
        text_model.encode(texts, **kwargs)


@pytest.mark.parametrize(
    "ids, message",
    [
        ([[1, 5, 2], [1, 1024, 2]], "input 1: token id 1024 at position 1 is outside the vocabulary"),
        ([[1, 2], [1, -1]], "input 1: token id -1"),
        ([[1, 2], []], "input 1 is an empty token list"),
        ([[1, 2], None], "input 1 is None"),
        ([[1, 2], [[1, 2]]], "flat sequence"),
        ([[1.5, 2.0]], "integers"),
        ([[1, 2], [1, 2.5, 2]], "input 1: token ids must be integers"),  # not only the first element
        ([[True, False]], "integers"),
        ([(1, 2), (1, 1024)], "input 1: token id 1024 at position 1"),  # tuples take the same checks
        ([[1] * 8193], "input 0 has 8193 tokens"),
    ],
)
def test_bad_token_input(model, ids, message):
    with pytest.raises((ValueError, TypeError), match=message):
        model.encode_tokens(ids)


def test_id_lists_checked_in_one_pass_same_as_per_input(model):
    # lists and tuples of ints (numpy ints too) take the one-pass check; mixed containers fall
    # back to the per-input one; both give the same embeddings
    ids = random_ids([5, 77, 1, 300], seed=9)
    as_tuples = [tuple(s) for s in ids]
    as_np_ints = [[np.int64(t) for t in s] for s in ids]
    mixed = [np.asarray(ids[0]), ids[1], torch.tensor(ids[2]), tuple(ids[3])]
    ref = model.encode_tokens(ids)
    for variant in (as_tuples, as_np_ints, mixed):
        assert np.array_equal(model.encode_tokens(variant), ref)
    assert model.engine.check_ids(ids) == ids and not model.engine._ids_fast_check(mixed)


def test_tensor_and_numpy_ids_accepted(model):
    ids = random_ids([5, 9], seed=26)
    a = model.encode_tokens(ids)
    b = model.encode_tokens([np.array(ids[0]), torch.tensor(ids[1])])
    assert np.allclose(a, b)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised when no GPU is present")
def test_cuda_without_gpu(small_checkpoint):
    with pytest.raises(ValueError, match="no CUDA GPU"):
        Embedder.from_pretrained(small_checkpoint, device="cuda")


def test_checkpoint_errors(tmp_path, small_checkpoint):
    with pytest.raises(CheckpointError, match="checkpoint folder not found"):
        Embedder.from_pretrained(tmp_path / "nothing-here")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((small_checkpoint / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        Embedder.from_pretrained(empty)
    corrupt = write_random_checkpoint(tmp_path / "corrupt", SMALL_CONFIG, seed=0)
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read"):
        Embedder.from_pretrained(corrupt)


def test_strict_loading_names_the_tensors(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = write_random_checkpoint(tmp_path, SMALL_CONFIG, seed=0)
    sd = load_file(folder / "model.safetensors")
    del sd["layers.2.mlp_norm.weight"]
    sd["layers.0.attn_norm.weight"] = torch.ones(128)  # layer 0 has no attention norm
    sd["layers.1.mlp.Wo.weight"] = torch.zeros(128, 100)
    save_file(sd, folder / "model.safetensors")
    with pytest.raises(CheckpointError) as err:
        Embedder.from_pretrained(folder)
    text = str(err.value)
    assert "missing tensors: ['layers.2.mlp_norm.weight']" in text
    assert "unexpected tensors: ['layers.0.attn_norm.weight']" in text
    assert "layers.1.mlp.Wo.weight: checkpoint [128, 100], model [128, 192]" in text


def test_offline_hub_id_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")
    with pytest.raises(CheckpointError, match="not in the Hugging Face cache and offline mode is on"):
        Embedder.from_pretrained("someone/not-a-cached-model")


@pytest.mark.slow
def test_same_as_sentence_transformers_on_text(tmp_path):
    """The whole text path (prompt, tokeniser, truncation, pooling, normalise) against
    sentence-transformers on the same random checkpoint with the real tokenizer."""
    import json

    st = pytest.importorskip("sentence_transformers", reason="needs sentence-transformers (bench extra)")
    folder = write_random_checkpoint(tmp_path, REAL_VOCAB, seed=13, tokenizer_json=fixture_file("tokenizer.json"),
                                     max_seq_length=300)
    # transformers' tokenizer loader needs the special tokens named; the engine does not read this file.
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "cls_token": "[CLS]", "sep_token": "[SEP]",
        "pad_token": "[PAD]", "unk_token": "[UNK]", "mask_token": "[MASK]", "model_max_length": 8192}))
    texts = ["What is TSNE?", "", "Hello World!", "word " * 500, "a  b   c\n\td", "naïve café 東京"]
    ref = st.SentenceTransformer(str(folder), device="cpu").encode(
        ["search_query: " + t for t in texts], normalize_embeddings=True)
    ours = Embedder.from_pretrained(folder, device=TEST_DEVICE, dtype="float32").encode_query(texts)
    cos = (ours * ref).sum(1)
    assert cos.min() >= 0.99999, cos


def test_non_finite_never_reaches_the_output(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = write_random_checkpoint(tmp_path, SMALL_CONFIG, seed=14)
    sd = load_file(folder / "model.safetensors")
    sd["embeddings.tok_embeddings.weight"][7] = float("nan")  # one poisoned token
    save_file(sd, folder / "model.safetensors")
    m = Embedder.from_pretrained(folder, device=TEST_DEVICE, dtype="float32")
    assert np.isfinite(m.encode_tokens([[1, 5, 2]])).all()
    with pytest.raises(FloatingPointError, match=r"input\(s\) \[1\]"):
        m.encode_tokens([[1, 5, 2], [1, 7, 2], [1, 9, 2]])
