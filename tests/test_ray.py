"""The Ray Data adapter on a local Ray cluster on CPU, with a small random checkpoint. The tests
that start a cluster are marked slow (left out of `make test-fast`)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from conftest import ROOT, fixture_file
from helpers import REAL_VOCAB
TEXTS = [f"document number {i}: " + "some words about corpora and shards " * (i % 7) for i in range(37)]


def test_adapter_module_imports_the_real_ray_lazily():
    import importlib

    mod = importlib.import_module("modernbert_embed.ray")
    assert mod.__name__ == "modernbert_embed.ray"
    try:
        real = mod._import("ray")
    except ImportError:
        pytest.skip("ray is not installed (the ray extra)")
    assert real is not mod and hasattr(real, "init") and real.__name__ == "ray"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from modernbert_embed.weights import write_random_checkpoint

    tok = fixture_file("tokenizer.json")
    return write_random_checkpoint(tmp_path_factory.mktemp("ray-ckpt"), REAL_VOCAB, seed=21, tokenizer_json=tok,
                                   max_seq_length=64)


def test_callable_class_without_a_cluster(ckpt):
    pa = pytest.importorskip("pyarrow", reason="pyarrow is not installed (the ray extra)")
    from modernbert_embed import Embedder
    from modernbert_embed.ray import RayEmbedder

    ref = Embedder.from_pretrained(ckpt, device="cpu").encode(TEXTS[:5], prompt_name="search_document")
    f = RayEmbedder(str(ckpt), prompt_name="search_document", device="cpu")
    table = f(pa.table({"text": TEXTS[:5], "n": list(range(5))}))
    assert table.column_names == ["text", "n", "embedding"]
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 128)
    np.testing.assert_allclose(np.array(table.column("embedding").to_pylist()), ref, atol=1e-5)
    d = f({"text": np.array(TEXTS[:5], dtype=object)})
    np.testing.assert_allclose(d["embedding"], ref, atol=1e-5)
    pd = pytest.importorskip("pandas")
    df = f(pd.DataFrame({"text": TEXTS[:5]}))
    np.testing.assert_allclose(np.stack(df["embedding"]), ref, atol=1e-5)
    with pytest.raises(TypeError, match="column 'text', row 1 of this batch is null"):
        f(pa.table({"text": ["a", None]}))
    with pytest.raises(KeyError, match="no column 'text'"):
        f(pa.table({"body": ["a"]}))
    with pytest.raises(ValueError, match="needs fixed ranges"):
        RayEmbedder(str(ckpt), precision="int8", device="cpu")
    from modernbert_embed import quantize as Q
    from modernbert_embed.ray import embed_dataset

    with pytest.raises(ValueError, match="needs fixed ranges"):
        embed_dataset(None, str(ckpt), precision="uint8")
    r = Q.calibration_ranges(ref[:3])  # the last rows fall partly outside: clipped, the same everywhere
    q = RayEmbedder(str(ckpt), prompt_name="search_document", precision="int8", ranges=r.tolist(), device="cpu")
    codes = q(pa.table({"text": TEXTS[:5]}))
    assert codes.schema.field("embedding").type == pa.list_(pa.int8(), 128)
    np.testing.assert_array_equal(np.array(codes.column("embedding").to_pylist()),
                                  Q.quantize_embeddings(ref, "int8", ranges=r))
    b = RayEmbedder(str(ckpt), precision="ubinary", device="cpu", keep_columns=False)(pa.table({"text": TEXTS[:3]}))
    assert b.column_names == ["embedding"] and b.schema.field("embedding").type == pa.list_(pa.uint8(), 16)


@pytest.fixture(scope="module")
def reranker_dir(tmp_path_factory):
    from modernbert_embed.weights import classifier_config

    return write_random_checkpoint_with(tmp_path_factory.mktemp("ray-reranker"),
                                        classifier_config(REAL_VOCAB, num_labels=1, pooling="mean"), seed=22)


@pytest.fixture(scope="module")
def tagger_dir(tmp_path_factory):
    from modernbert_embed.weights import classifier_config

    return write_random_checkpoint_with(tmp_path_factory.mktemp("ray-tagger"),
                                        classifier_config(REAL_VOCAB, num_labels=3, pooling="cls"), seed=32)


def write_random_checkpoint_with(folder, config, seed, **kw):
    from modernbert_embed.weights import write_random_checkpoint

    return write_random_checkpoint(folder, config, seed=seed, tokenizer_json=fixture_file("tokenizer.json"),
                                   max_seq_length=64, **kw)


PAIRS = [(f"query {i % 5}", t) for i, t in enumerate(TEXTS)]


def quiet_predict(ce, inputs, **kw):
    import warnings

    from modernbert_embed import TruncationWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TruncationWarning)
        return ce.predict(inputs, **kw)


def test_scorer_without_a_cluster(reranker_dir, tagger_dir, ckpt):
    pa = pytest.importorskip("pyarrow", reason="pyarrow is not installed (the ray extra)")
    import torch

    from modernbert_embed import CheckpointError, CrossEncoder
    from modernbert_embed.corpus import SCORE_VALUES
    from modernbert_embed.ray import SCORE_VALUES as RAY_SCORE_VALUES, RayEmbedder, RayScorer

    assert RAY_SCORE_VALUES == SCORE_VALUES  # one meaning of scores= and --scores

    ce = CrossEncoder.from_pretrained(reranker_dir, device="cpu")
    pairs = PAIRS[:9]
    f = RayScorer(str(reranker_dir), text_column="q", text_pair_column="d", device="cpu")
    table = f(pa.table({"q": [q for q, _ in pairs], "d": [d for _, d in pairs], "n": list(range(9))}))
    assert table.column_names == ["q", "d", "n", "scores", "label"]
    assert table.schema.field("scores").type == pa.float32() and table.schema.field("label").type == pa.int32()
    np.testing.assert_allclose(table.column("scores").to_numpy(), quiet_predict(ce, pairs), atol=1e-5)
    logits = quiet_predict(ce, pairs, activation_fn=torch.nn.Identity())
    np.testing.assert_array_equal(table.column("label").to_numpy(), (logits >= 0).astype(np.int32))
    d = f({"q": np.array([q for q, _ in pairs], dtype=object), "d": np.array([d for _, d in pairs], dtype=object)})
    np.testing.assert_allclose(d["scores"], quiet_predict(ce, pairs), atol=1e-5)
    with pytest.raises(KeyError, match="no column 'd'"):
        f(pa.table({"q": ["a"]}))
    with pytest.raises(TypeError, match="column 'd', row 0 of this batch is null"):
        f(pa.table({"q": ["a"], "d": pa.array([None], type=pa.string())}))

    three = CrossEncoder.from_pretrained(tagger_dir, device="cpu")
    g = RayScorer(str(tagger_dir), scores="softmax", device="cpu", keep_columns=False)
    out = g(pa.table({"text": TEXTS[:6]}))
    assert out.column_names == ["scores", "label"]
    assert out.schema.field("scores").type == pa.list_(pa.float32(), 3)
    want = quiet_predict(three, [[t] for t in TEXTS[:6]], apply_softmax=True)
    np.testing.assert_allclose(np.array(out.column("scores").to_pylist()), want, atol=1e-6)
    np.testing.assert_array_equal(out.column("label").to_numpy(), want.argmax(axis=1))
    pd = pytest.importorskip("pandas")
    df = g(pd.DataFrame({"text": TEXTS[:6]}))
    np.testing.assert_allclose(np.stack(df["scores"]), want, atol=1e-6)

    with pytest.raises(ValueError, match="scores='softmax' needs two labels or more"):
        RayScorer(str(reranker_dir), scores="softmax", device="cpu")
    with pytest.raises(ValueError, match="scores must be one of"):
        RayScorer(str(reranker_dir), scores="sigmoid", device="cpu")
    with pytest.raises(ValueError, match="text_pair_column and text_column both name 'text'"):
        RayScorer(str(reranker_dir), text_pair_column="text", device="cpu")
    with pytest.raises(CheckpointError, match=r"is a classifier \(cross-encoder\).*use modernbert_embed.ray.RayScorer"):
        RayEmbedder(str(reranker_dir), device="cpu")
    with pytest.raises(CheckpointError, match=r"is an embedder.*use modernbert_embed.ray.RayEmbedder"):
        RayScorer(str(ckpt), device="cpu")


def test_embedder_follows_the_folder_normalize_and_prompts(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="pyarrow is not installed (the ray extra)")
    from modernbert_embed import Embedder
    from modernbert_embed.ray import RayEmbedder

    folder = write_random_checkpoint_with(tmp_path / "plain", REAL_VOCAB, seed=23, normalize=False)
    st = folder / "config_sentence_transformers.json"
    cfg = json.loads(st.read_text()) if st.exists() else {}
    cfg.update(prompts={"passage": "passage: ", "question": "question: "}, default_prompt_name="passage")
    st.write_text(json.dumps(cfg))
    ref = Embedder.from_pretrained(folder, device="cpu")
    table = pa.table({"text": TEXTS[:5]})
    got = np.array(RayEmbedder(str(folder), device="cpu")(table).column("embedding").to_pylist())
    assert np.abs(np.linalg.norm(got, axis=1) - 1).min() > 1e-2  # the folder has no Normalize module
    np.testing.assert_allclose(got, ref.encode(TEXTS[:5], prompt="passage: ", normalize_embeddings=False),
                               atol=1e-5)
    unit = np.array(RayEmbedder(str(folder), normalize_embeddings=True, device="cpu")(table)
                    .column("embedding").to_pylist())
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1, atol=1e-5)
    q = np.array(RayEmbedder(str(folder), prompt_name="question", device="cpu")(table).column("embedding").to_pylist())
    np.testing.assert_allclose(q, ref.encode(TEXTS[:5], prompt="question: "), atol=1e-5)
    with pytest.raises(ValueError, match="unknown prompt_name 'shouting'"):
        RayEmbedder(str(folder), prompt_name="shouting", device="cpu")


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="ray is not installed (the ray extra: pip install 'ray[data]')")
    pytest.importorskip("pyarrow", reason="pyarrow is not installed (the ray extra)")
    # Logical CPUs: two actors hold one each, and reading and writing need some left.
    ray.init(num_cpus=4, num_gpus=0, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_embed_dataset_on_a_local_cpu_cluster(ckpt, ray_cluster, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from modernbert_embed import Embedder
    from modernbert_embed.ray import embed_dataset

    ray = ray_cluster
    ids = list(range(len(TEXTS)))
    whole = pa.table({"id": ids, "text": TEXTS})
    ds = ray.data.from_arrow([whole.slice(0, 12), whole.slice(12, 12), whole.slice(24)])  # three blocks
    out = embed_dataset(ds, str(ckpt), num_actors=2, batch_size=8, prompt_name="search_document")
    out.write_parquet(str(tmp_path / "out"))

    table = pq.read_table(tmp_path / "out")
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 128)
    assert sorted(table.column("id").to_pylist()) == ids  # every row once
    got = dict(zip(table.column("id").to_pylist(), table.column("embedding").to_pylist()))
    ref = Embedder.from_pretrained(ckpt, device="cpu").encode(TEXTS, prompt_name="search_document")
    np.testing.assert_allclose(np.array([got[i] for i in ids]), ref, atol=1e-5)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_example_script_writes_fixed_size_float32_lists(ckpt, ray_cluster, tmp_path):
    import importlib.util

    import pyarrow.parquet as pq

    from modernbert_embed import Embedder

    spec = importlib.util.spec_from_file_location("ray_embed_example", ROOT / "examples" / "ray_embed.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"doc": f"d{i}", "body": t}) + "\n" for i, t in enumerate(TEXTS)))
    rc = example.main([str(src), "-o", str(tmp_path / "out"), "--model", str(ckpt), "--text-field", "body",
                       "--truncate-dim", "64", "--num-actors", "1", "--batch-size", "16"])
    assert rc == 0
    table = pq.read_table(tmp_path / "out")
    import pyarrow as pa

    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 64)
    assert set(table.column_names) == {"doc", "body", "embedding"}
    got = dict(zip(table.column("doc").to_pylist(), table.column("embedding").to_pylist()))
    ref = Embedder.from_pretrained(ckpt, device="cpu").encode(TEXTS, truncate_dim=64)
    np.testing.assert_allclose(np.array([got[f"d{i}"] for i in range(len(TEXTS))]), ref, atol=1e-5)
    assert sys.modules.get("ray") is ray_cluster  # the real package, not the adapter module


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_score_dataset_on_a_local_cpu_cluster(reranker_dir, ray_cluster, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from modernbert_embed import CrossEncoder
    from modernbert_embed.ray import score_dataset

    ray = ray_cluster
    ids = list(range(len(PAIRS)))
    whole = pa.table({"id": ids, "q": [q for q, _ in PAIRS], "d": [d for _, d in PAIRS]})
    ds = ray.data.from_arrow([whole.slice(0, 20), whole.slice(20)])
    out = score_dataset(ds, str(reranker_dir), num_actors=1, batch_size=8, text_column="q", text_pair_column="d")
    out.write_parquet(str(tmp_path / "out"))
    table = pq.read_table(tmp_path / "out")
    assert table.schema.field("scores").type == pa.float32() and table.schema.field("label").type == pa.int32()
    got = dict(zip(table.column("id").to_pylist(), table.column("scores").to_pylist()))
    assert sorted(got) == ids
    ref = quiet_predict(CrossEncoder.from_pretrained(reranker_dir, device="cpu"), PAIRS)
    np.testing.assert_allclose(np.array([got[i] for i in ids]), ref, atol=1e-5)


# ------------------------------------------------------------------------------- multi-vector (ColBERT)
@pytest.fixture(scope="module")
def colbert_dir(tmp_path_factory):
    from modernbert_embed.weights import colbert_st_config, write_random_checkpoint
    from multivector_data import COLBERT_CONFIG, VARIANTS

    return write_random_checkpoint(tmp_path_factory.mktemp("ray-colbert") / "expand", COLBERT_CONFIG, seed=7,
                                   tokenizer_json=fixture_file("tokenizer.json"),
                                   colbert=colbert_st_config(**VARIANTS["expand"]), dense_dim=128)


def test_multivector_encoder_without_a_cluster(colbert_dir, ckpt):
    pa = pytest.importorskip("pyarrow", reason="pyarrow is not installed (the ray extra)")
    from multivector_data import DOCUMENTS, QUERIES

    from modernbert_embed import CheckpointError, MultiVectorEncoder
    from modernbert_embed.ray import RayEmbedder, RayMultiVectorEncoder, RayScorer

    enc = MultiVectorEncoder.from_pretrained(colbert_dir, device="cpu")
    want = enc.encode_document(DOCUMENTS)
    f = RayMultiVectorEncoder(str(colbert_dir), device="cpu")
    table = f(pa.table({"text": DOCUMENTS, "n": list(range(len(DOCUMENTS)))}))
    assert table.column_names == ["text", "n", "token_vectors"]
    assert table.schema.field("token_vectors").type == pa.list_(pa.list_(pa.float16(), 128))
    rows = table.column("token_vectors").to_pylist()
    for got, w in zip(rows, want):
        np.testing.assert_array_equal(np.array(got, dtype=np.float16), w.astype(np.float16))

    g = RayMultiVectorEncoder(str(colbert_dir), mode="query", precision="float32", truncate_dim=64, device="cpu",
                              keep_columns=False)
    out = g(pa.table({"text": QUERIES}))
    assert out.column_names == ["token_vectors"]
    assert out.schema.field("token_vectors").type == pa.list_(pa.list_(pa.float32(), 64))
    for got, w in zip(out.column("token_vectors").to_pylist(), enc.encode_query(QUERIES, truncate_dim=64)):
        np.testing.assert_array_equal(np.array(got, dtype=np.float32), w)
    d = g({"text": np.array(QUERIES, dtype=object)})
    assert len(d["token_vectors"]) == len(QUERIES) and d["token_vectors"][0].shape == (32, 64)
    pd = pytest.importorskip("pandas")
    df = f(pd.DataFrame({"text": DOCUMENTS[:2]}))
    np.testing.assert_array_equal(df["token_vectors"][1], want[1].astype(np.float16))
    assert f(pa.table({"text": pa.array([], type=pa.string())})).num_rows == 0
    with pytest.raises(TypeError, match="column 'text', row 1 of this batch is null"):
        f(pa.table({"text": ["a", None]}))

    with pytest.raises(ValueError, match="precision must be one of .'float16', 'float32'. for token vectors"):
        RayMultiVectorEncoder(str(colbert_dir), precision="int8", device="cpu")
    with pytest.raises(ValueError, match="mode must be one of"):
        RayMultiVectorEncoder(str(colbert_dir), mode="passage", device="cpu")
    with pytest.raises(ValueError, match="truncate_dim must be an int in 1..128"):
        RayMultiVectorEncoder(str(colbert_dir), truncate_dim=129, device="cpu")
    for cls in (RayEmbedder, RayScorer):
        with pytest.raises(CheckpointError, match="multi-vector .ColBERT. model.*use modernbert_embed.ray."
                                                  "RayMultiVectorEncoder"):
            cls(str(colbert_dir), device="cpu")
    with pytest.raises(CheckpointError, match=r"is an embedder.*use modernbert_embed.ray.RayEmbedder"):
        RayMultiVectorEncoder(str(ckpt), device="cpu")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_multivector_dataset_on_a_local_cpu_cluster(colbert_dir, ray_cluster, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from multivector_data import DOCUMENTS

    from modernbert_embed import MultiVectorEncoder
    from modernbert_embed.ray import multivector_dataset

    ray = ray_cluster
    texts = DOCUMENTS * 3
    ids = list(range(len(texts)))
    whole = pa.table({"id": ids, "text": texts})
    ds = ray.data.from_arrow([whole.slice(0, 9), whole.slice(9)])
    out = multivector_dataset(ds, str(colbert_dir), num_actors=1, batch_size=4)
    out.write_parquet(str(tmp_path / "out"))
    table = pq.read_table(tmp_path / "out")
    assert table.schema.field("token_vectors").type == pa.list_(pa.list_(pa.float16(), 128))
    got = dict(zip(table.column("id").to_pylist(), table.column("token_vectors").to_pylist()))
    assert sorted(got) == ids
    want = MultiVectorEncoder.from_pretrained(colbert_dir, device="cpu").encode_document(texts)
    for i in ids:
        np.testing.assert_array_equal(np.array(got[i], dtype=np.float16), want[i].astype(np.float16))
