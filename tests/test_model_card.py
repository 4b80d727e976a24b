"""The model card's numbers, with the real weights.

Runs only where the real checkpoint is present: a folder named by MODERNBERT_EMBED_WEIGHTS, or
nomic-ai/modernbert-embed-base in the Hugging Face cache. Skipped (with that reason) otherwise;
a skip here is not evidence of anything.
"""

import numpy as np
import pytest

import helpers
from modernbert_embed import Embedder

QUERIES = ["What is TSNE?", "Who is Laurens van der Maaten?"]
DOCUMENT = ["TSNE is a dimensionality reduction algorithm created by Laurens van Der Maaten"]


def real_weights():
    return helpers.real_weights("nomic-ai/modernbert-embed-base", "MODERNBERT_EMBED_WEIGHTS")


@pytest.fixture(scope="module")
def model():
    return Embedder.from_pretrained(real_weights(), device="cpu")


def test_model_card_similarities(model):
    q = model.encode_query(QUERIES)
    d = model.encode_document(DOCUMENT)
    sim = model.similarity(q, d).numpy()[:, 0]
    assert np.allclose(sim, [0.721383, 0.325996], atol=5e-5), sim
    q256 = model.encode_query(QUERIES, truncate_dim=256)
    d256 = model.encode_document(DOCUMENT, truncate_dim=256)
    sim256 = model.similarity(q256, d256).numpy()[:, 0]
    assert np.allclose(sim256, [0.7759, 0.3419], atol=5e-5), sim256


def test_same_as_sentence_transformers(model):
    st = pytest.importorskip("sentence_transformers")
    ref = st.SentenceTransformer(str(real_weights()), device="cpu")
    texts = ["search_query: " + QUERIES[0], "search_document: " + DOCUMENT[0], "word " * 400]
    ours = model.encode(texts)
    theirs = ref.encode(texts, normalize_embeddings=True)
    cos = (ours * theirs).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(theirs, axis=1)
    assert cos.min() >= 0.99999, cos
