"""The embedder layouts of the ModernBERT family against sentence-transformers' SentenceTransformer,
on random weights in each real layout with the real tokenizer: CLS pooling (gte-modernbert-base),
no Normalize module (joe32140/ModernBERT-base-msmarco), the large shape (1024 wide, 16 heads,
intermediate 2624; fewer layers), the Ettin config (vocab 50370, both thetas 160000, 7999
positions) and a masked-LM checkpoint (ModernBERT-base: no sentence-transformers files). Texts
cross the 128-token window. And what a folder says is what the defaults are."""

import json
import warnings

import numpy as np
import pytest

from modernbert_embed import CheckpointError, Embedder
from modernbert_embed.weights import Checkpoint, ettin_config, small_config, write_random_checkpoint

from conftest import fixture_file
from helpers import REAL_VOCAB

st = pytest.importorskip("sentence_transformers", reason="parity tests need sentence-transformers")

TEXTS = ["what is the capital of China?", "Beijing", "", "sorting algorithms " * 60, "naïve café 東京",
         "how to implement quick sort in python? " * 40]
LARGE = {**REAL_VOCAB, "hidden_size": 1024, "intermediate_size": 2624, "num_attention_heads": 16,
         "num_hidden_layers": 3}  # lightonai/modernbert-embed-large's width, 3 of its 28 layers


def sentence_transformers_encode(folder, texts):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = st.SentenceTransformer(str(folder), device="cpu")
    return model, model.encode(texts, convert_to_numpy=True)


LAYOUTS = [  # (name, config, writer keywords, normalised, pooling)
    ("cls", REAL_VOCAB, dict(pooling="cls"), True, "cls"),
    ("no-normalize", REAL_VOCAB, dict(normalize=False), False, "mean"),
    ("large", LARGE, dict(), True, "mean"),
    ("ettin", ettin_config(), dict(), True, "mean"),
    ("masked-lm", {**REAL_VOCAB, "architectures": ["ModernBertForMaskedLM"]}, dict(), False, "mean"),
]


@pytest.mark.parametrize("name,config,kw,normalized,pooling", LAYOUTS, ids=[x[0] for x in LAYOUTS])
def test_embedder_layouts_equal_sentence_transformers(tmp_path, name, config, kw, normalized, pooling):
    folder = write_random_checkpoint(tmp_path, config, seed=31, tokenizer_json=fixture_file("tokenizer.json"), **kw)
    ours = Embedder.from_pretrained(folder, device="cpu")
    assert (ours.pooling, ours.normalize_embeddings) == (pooling, normalized)
    ref_model, ref = sentence_transformers_encode(folder, TEXTS)
    assert ours.max_seq_length == ref_model.max_seq_length
    got = ours.encode(TEXTS, prompt="")  # the folder's defaults, as sentence-transformers
    norms = np.linalg.norm(got, axis=1)
    assert np.allclose(norms, 1.0, atol=1e-5) == normalized, norms
    scale = np.abs(ref).max()
    worst = np.abs(got - ref).max()
    assert worst <= 1e-5 * max(scale, 1.0), f"{name}: max |ours - sentence-transformers| {worst:.3g} (scale {scale:.3g})"


def test_ettin_config_is_read_as_given(tmp_path):
    folder = write_random_checkpoint(tmp_path, ettin_config(), tokenizer_json=fixture_file("tokenizer.json"))
    cfg = Checkpoint(folder).config
    assert (cfg.vocab_size, cfg.global_rope_theta, cfg.local_rope_theta, cfg.max_position_embeddings) == \
        (50370, 160000.0, 160000.0, 7999)
    m = Embedder.from_pretrained(folder)
    assert m.max_seq_length == 7999
    ids, truncated = m.tokenize(["word " * 9000])
    assert len(ids[0]) == 7999 and truncated == [True]


def test_a_folder_without_modules_json_is_mean_pooled_and_not_normalised(tmp_path):
    """sentence-transformers' reading of a bare transformers folder."""
    folder = write_random_checkpoint(tmp_path, REAL_VOCAB, seed=32, tokenizer_json=fixture_file("tokenizer.json"),
                                     st_files=False)
    ckpt = Checkpoint(folder)
    assert (ckpt.kind, ckpt.pooling, ckpt.normalize) == ("embedder", "mean", False)
    m = Embedder.from_pretrained(folder)
    got = m.encode(TEXTS[:3], prompt="")
    assert not np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-3)
    # normalize_embeddings=True still normalises on request
    assert np.allclose(np.linalg.norm(m.encode(TEXTS[:3], prompt="", normalize_embeddings=True), axis=1), 1.0,
                       atol=1e-5)


def test_nomic_layout_still_normalises_by_default(tmp_path):
    folder = write_random_checkpoint(tmp_path, REAL_VOCAB, seed=33, tokenizer_json=fixture_file("tokenizer.json"))
    m = Embedder.from_pretrained(folder)
    assert m.normalize_embeddings
    assert np.allclose(np.linalg.norm(m.encode_query(TEXTS[:2]), axis=1), 1.0, atol=1e-5)
    raw = m.encode_query(TEXTS[:2], normalize_embeddings=False)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0, atol=1e-3)


def test_prompts_and_default_prompt_name_come_from_the_folder(tmp_path):
    folder = write_random_checkpoint(tmp_path, REAL_VOCAB, seed=34, tokenizer_json=fixture_file("tokenizer.json"))
    (folder / "config_sentence_transformers.json").write_text(json.dumps({
        "prompts": {"query": "Represent this query: ", "document": ""}, "default_prompt_name": "query",
        "similarity_fn_name": "cosine"}))
    m = Embedder.from_pretrained(folder)
    assert m.prompts["query"] == "Represent this query: " and m.default_prompt_name == "query"
    explicit = m.encode(["hello"], prompt="Represent this query: ")
    np.testing.assert_array_equal(m.encode(["hello"]), explicit)  # the default prompt
    np.testing.assert_array_equal(m.encode_query(["hello"]), explicit)  # the folder's "query"
    np.testing.assert_array_equal(m.encode_document(["hello"]), m.encode(["hello"], prompt=""))
    np.testing.assert_array_equal(m.encode(["hello"], prompt_name="search_query"),
                                  m.encode(["hello"], prompt="search_query: "))  # modernbert-embed's stay
    _, ref = sentence_transformers_encode(folder, ["hello"])  # sentence-transformers applies the default too
    assert np.abs(m.encode(["hello"]) - ref).max() <= 1e-5


def test_folders_this_engine_does_not_run_are_refused(tmp_path):
    folder = write_random_checkpoint(tmp_path, {**small_config(), "architectures": ["ModernBertForTokenClassification"]})
    with pytest.raises(CheckpointError, match="architecture 'ModernBertForTokenClassification' is not supported"):
        Embedder.from_pretrained(folder)
    folder = write_random_checkpoint(tmp_path / "p", small_config())
    (folder / "config_sentence_transformers.json").write_text(json.dumps({"prompts": {}, "default_prompt_name": "q"}))
    with pytest.raises(CheckpointError, match="default_prompt_name 'q' is not one of the prompts"):
        Embedder.from_pretrained(folder)


def test_a_folder_saved_by_sentence_transformers_loads(tmp_path):
    """sentence-transformers 6 names its modules by their new paths in modules.json."""
    folder = write_random_checkpoint(tmp_path / "orig", REAL_VOCAB, seed=35, pooling="cls",
                                     tokenizer_json=fixture_file("tokenizer.json"))
    ref_model, ref = sentence_transformers_encode(folder, TEXTS[:3])
    ref_model.save(str(tmp_path / "saved"))
    types = [m["type"] for m in json.loads((tmp_path / "saved" / "modules.json").read_text())]
    m = Embedder.from_pretrained(tmp_path / "saved")
    assert (m.pooling, m.normalize_embeddings) == ("cls", True), types
    assert np.abs(m.encode(TEXTS[:3], prompt="") - ref).max() <= 1e-5


@pytest.mark.parametrize("pooling_config,expected", [
    ({"pooling_mode": "cls"}, "cls"),
    ({"pooling_mode": ["mean"]}, "mean"),
    ({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}, "cls"),
    ({"word_embedding_dimension": 128}, "mean"),  # no mode set: sentence-transformers' mean
    ({"pooling_mode": ["mean", "max"]}, "pooling ['mean', 'max'] is not supported"),
    ({"pooling_mode": "lasttoken"}, "pooling ['lasttoken'] is not supported"),
    ({"pooling_mode": "cls", "include_prompt": False}, "include_prompt=false is not supported"),
])
def test_pooling_configs_old_and_new(tmp_path, pooling_config, expected):
    folder = write_random_checkpoint(tmp_path, small_config())
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling_config))
    if expected in ("cls", "mean"):
        assert Checkpoint(folder).pooling == expected
    else:
        with pytest.raises(CheckpointError, match=expected.replace("[", r"\[").replace("]", r"\]")):
            Checkpoint(folder)


def test_a_module_this_engine_does_not_run_is_refused(tmp_path):
    folder = write_random_checkpoint(tmp_path, small_config())
    modules = json.loads((folder / "modules.json").read_text())
    for kind in ("sentence_transformers.models.Dense", "sentence_transformers.base.modules.dense.Dense"):
        (folder / "modules.json").write_text(json.dumps(modules + [{"idx": 3, "path": "3_Dense", "type": kind}]))
        with pytest.raises(CheckpointError, match="module .*Dense' is not supported"):
            Checkpoint(folder)
