"""The published numbers of the family's checkpoints, with the real weights.

Runs only where the real checkpoint is present: a folder named by an environment variable
(MODERNBERT_EMBED_RERANKER_WEIGHTS for Alibaba-NLP/gte-reranker-modernbert-base,
MODERNBERT_EMBED_GTE_WEIGHTS for Alibaba-NLP/gte-modernbert-base), or the model in the Hugging
Face cache. Skipped (with that reason) otherwise; a skip here is not evidence of anything.
Values: the models' cards (see the family reference in the design notes).
"""

import numpy as np

from modernbert_embed import CrossEncoder, Embedder

from helpers import real_weights

RERANK_PAIRS = [
    ("what is the capital of China?", "Beijing"),
    ("how to implement quick sort in python?", "Introduction of quick sort"),
    ("how to implement quick sort in python?", "The weather is nice today"),
]
RERANK_LOGITS = [2.1383, 2.4610, -1.6775]  # fp32 (the card's transformers.js run: 2.138258, 2.460963, -1.677545)
RERANK_SIGMOID = [0.8945664, 0.9213594, 0.15742092]  # sentence-transformers' CrossEncoder.predict
GTE_TEXTS = ["what is the capital of China?", "how to implement quick sort in python?", "Beijing", "sorting algorithms"]
GTE_COSINE_X100 = [42.8907, 71.3091, 33.6646]  # query 0 against the other three (transformers, fp32)


def test_gte_reranker_published_scores():
    folder = real_weights("Alibaba-NLP/gte-reranker-modernbert-base", "MODERNBERT_EMBED_RERANKER_WEIGHTS")
    ce = CrossEncoder.from_pretrained(folder, device="cpu", dtype="float32")
    assert ce.num_labels == 1 and ce.classifier_pooling == "mean"
    logits = ce.logits(RERANK_PAIRS).squeeze(-1).cpu().numpy()
    assert np.allclose(logits, RERANK_LOGITS, atol=1e-4), logits
    scores = ce.predict(RERANK_PAIRS)
    assert np.allclose(scores, RERANK_SIGMOID, atol=2e-6), scores
    ranked = ce.rank(RERANK_PAIRS[1][0], [d for _, d in RERANK_PAIRS])
    assert [r["corpus_id"] for r in ranked] == [1, 0, 2]


def test_gte_modernbert_base_published_similarities():
    folder = real_weights("Alibaba-NLP/gte-modernbert-base", "MODERNBERT_EMBED_GTE_WEIGHTS")
    m = Embedder.from_pretrained(folder, device="cpu", dtype="float32")
    assert m.pooling == "cls"
    emb = m.encode(GTE_TEXTS, prompt="")
    sim = (m.similarity(emb[:1], emb[1:]).numpy()[0] * 100)
    assert np.allclose(sim, GTE_COSINE_X100, atol=1e-3), sim
