"""Long documents: window planning, the weighted combination, and chunked encode against a hand
computation with the real tokenizer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modernbert_embed.chunking import combine, default_overlap, plan_windows, split_long

from conftest import TEST_DEVICE, fixture_file
from helpers import REAL_VOCAB

CLS, SEP = 50281, 50282
PROMPT = "search_document: "
PROMPT_IDS = [8716, 64, 3306, 27]  # "search", "_", "document", ":" (the space joins the next word)
MSL = 24


def test_plan_windows_by_hand():
    assert plan_windows(4, 4, 1) == [(0, 4)]
    assert plan_windows(0, 4, 1) == [(0, 0)]
    assert plan_windows(10, 4, 1) == [(0, 4), (3, 7), (6, 10)]
    assert plan_windows(11, 4, 1) == [(0, 4), (3, 7), (6, 10), (9, 11)]
    assert plan_windows(9, 4, 0) == [(0, 4), (4, 8), (8, 9)]
    assert plan_windows(5, 4, 3) == [(0, 4), (1, 5)]
    with pytest.raises(ValueError, match="smaller than the 4 content tokens"):
        plan_windows(10, 4, 4)
    with pytest.raises(ValueError, match=r"overlap \(-1 tokens\) must be in 0..3"):
        plan_windows(10, 4, -1)
    assert default_overlap(8000) == 128 and default_overlap(18) == 4


def test_windows_cover_every_token_once_outside_overlaps():
    for n, budget, lap in [(1000, 100, 10), (257, 64, 0), (99, 10, 9), (8190, 8173, 128)]:
        spans = plan_windows(n, budget, lap)
        assert spans[0][0] == 0 and spans[-1][1] == n
        assert all(b - a <= budget for a, b in spans)
        assert all(spans[i + 1][0] == spans[i][1] - lap for i in range(len(spans) - 1))
        covered = np.zeros(n, int)
        for a, b in spans:
            covered[a:b] += 1
        assert (covered >= 1).all()


def test_combine_by_hand():
    e = np.array([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0], [0.6, 0.8]], np.float32)
    out = combine(e, owner=[0, 0, 1, 1], content_tokens=[3, 1, 1, 0], num_docs=2, normalize=True)
    v0 = (3 * e[0] + 1 * e[1]) / 4  # (2.5, 3.0)
    v1 = (1 * e[2] + 1 * e[3]) / 2  # a window of no content tokens counts with weight 1
    np.testing.assert_allclose(out[0], v0 / np.linalg.norm(v0), rtol=1e-6)
    np.testing.assert_allclose(out[1], v1 / np.linalg.norm(v1), rtol=1e-6)
    raw = combine(e, [0, 0, 1, 1], [3, 1, 1, 0], 2, normalize=False)
    np.testing.assert_allclose(raw[0], v0, rtol=1e-6)
    # a one-window document keeps its vector bit for bit, even unnormalised
    single = combine(e, [0, 1, 1, 2], [5, 1, 1, 7], 3, normalize=True)
    assert np.array_equal(single[0], e[0]) and np.array_equal(single[2], e[3])
    t = combine(torch.from_numpy(e), [0, 0, 1, 1], [3, 1, 1, 0], 2)
    assert isinstance(t, torch.Tensor)
    np.testing.assert_allclose(t.numpy(), out, rtol=1e-6)
    with pytest.raises(ValueError, match="at least one window"):
        combine(e, [0, 0, 2, 2], [1, 1, 1, 1], 3)


# ------------------------------------------------------------------------------- with a model
@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from modernbert_embed import Embedder
    from modernbert_embed.weights import write_random_checkpoint

    tok = fixture_file("tokenizer.json")
    folder = write_random_checkpoint(tmp_path_factory.mktemp("chunk"), REAL_VOCAB, seed=5, tokenizer_json=tok,
                                     max_seq_length=MSL)
    return Embedder.from_pretrained(folder, device=TEST_DEVICE, dtype="float32")


LONG = ("ModernBERT reads long documents in one pass, but every model has a limit; beyond it the "
        "text is cut, or split into windows that overlap a little and are embedded one by one. "
        "The vectors of the windows are then averaged, each weighted by its number of tokens, "
        "and the mean is normalised again, so one document still gives exactly one vector.")


def test_chunked_document_against_hand_computation(model):
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(fixture_file("tokenizer.json")))
    full = raw.encode(PROMPT + LONG, add_special_tokens=False).ids
    assert full[:4] == PROMPT_IDS
    content = full[4:]
    assert raw.decode([content[0]]) == " Modern"  # the prompt's space joins the first word
    budget = MSL - 2 - len(PROMPT_IDS)  # 18 content tokens a window
    overlap = 5
    n = len(content)
    assert n > 3 * budget, "the text must need several windows"
    # windows by hand: start every 13 tokens, 18 tokens long, the last one ends at n
    starts = list(range(0, n, budget - overlap))
    starts = [s for i, s in enumerate(starts) if i == 0 or starts[i - 1] + budget < n]
    hand_windows = [[CLS, *PROMPT_IDS, *content[s:s + budget], SEP] for s in starts]
    weights = [len(content[s:s + budget]) for s in starts]
    assert all(len(w) <= MSL for w in hand_windows)

    per_window = model.encode_tokens(hand_windows)
    v = (per_window * np.array(weights, np.float32)[:, None]).sum(0) / sum(weights)
    v = v / np.linalg.norm(v)

    got = model.encode([LONG, "a short one"], prompt=PROMPT, long="chunk", overlap=overlap)
    np.testing.assert_allclose(got[0], v, atol=2e-6)
    # and the windows the library planned are these windows
    w = split_long(model.tokenizer, [LONG], PROMPT, MSL, overlap)
    assert w.ids == hand_windows and w.content_tokens == weights
    assert w.doc_tokens == [len(full) + 2] and w.doc_windows == [len(hand_windows)]
    # truncating gives the first window only, flagged
    ids, truncated = model.tokenize([LONG], PROMPT)
    assert truncated == [True] and ids[0] == [CLS, *full[:MSL - 2], SEP]
    trunc = model.encode([LONG], prompt=PROMPT)[0]
    assert not np.allclose(trunc, got[0], atol=1e-3)


def test_short_documents_are_the_same_in_both_modes(model):
    texts = ["", "Hello World!", "a few more words than that, still short", "x " * 8]
    a = model.encode(texts, prompt_name="search_document")
    b = model.encode(texts, prompt_name="search_document", long="chunk")
    np.testing.assert_array_equal(a, b)
    ids, truncated = model.tokenize(texts, PROMPT)
    w = split_long(model.tokenizer, texts, PROMPT, MSL)
    assert w.ids == ids and not any(truncated) and w.doc_windows == [1] * len(texts)


def test_chunk_options_work_with_precision_and_truncate_dim(model):
    from modernbert_embed import quantize as Q

    texts = [LONG, LONG[:40], LONG * 2]
    f = model.encode(texts, long="chunk", truncate_dim=32)
    assert f.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(f, axis=1), 1, rtol=1e-5)
    b = model.encode(texts, long="chunk", truncate_dim=32, precision="ubinary")
    np.testing.assert_array_equal(b, Q.quantize_embeddings(f, "ubinary"))
    single = model.encode(LONG, long="chunk", convert_to_tensor=True)
    assert isinstance(single, torch.Tensor) and single.shape == (128,)


def test_chunk_errors(model):
    with pytest.raises(ValueError, match="long 'split'"):
        model.encode(["x"], long="split")
    with pytest.raises(ValueError, match="overlap applies to long='chunk'"):
        model.encode(["x"], overlap=3)
    with pytest.raises(ValueError, match="smaller than the 18 content tokens"):
        model.encode([LONG], prompt=PROMPT, long="chunk", overlap=18)
    with pytest.raises(ValueError, match="leaving no room"):
        model.encode(["x"], prompt="word " * 30, long="chunk")
