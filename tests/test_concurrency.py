"""The concurrency contract: `encode`, `encode_tokens` and `hidden_states` may be called from many
threads at once, and each call's result equals the same call made alone (max abs diff <= 1e-6).

Eight threads mix the three calls for a bounded number of rounds; one of them changes
`max_seq_length` between its calls and encodes texts long enough for the change to matter, so a
tokenizer reconfigured in place under another thread would show (as "Already borrowed" or as a
wrong truncation)."""

from __future__ import annotations

import random
import threading

import numpy as np
import pytest
import torch

from conftest import fixture_file, random_ids
from helpers import REAL_VOCAB

THREADS = 8
ROUNDS = 6
TOL = 1e-6
WORDS = "the a of embedding model window vector search document query token über café naïve".split()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from modernbert_embed import Embedder
    from modernbert_embed.weights import write_random_checkpoint

    folder = write_random_checkpoint(tmp_path_factory.mktemp("threads"), REAL_VOCAB, seed=31,
                                     tokenizer_json=fixture_file("tokenizer.json"))
    return Embedder.from_pretrained(folder, device="cpu")


def _texts(rng: random.Random, n: int, words: int) -> list[str]:
    return [" ".join(rng.choices(WORDS, k=rng.randint(1, words))) for _ in range(n)]


def test_threads_mixing_calls_get_what_they_would_get_alone(model):
    rng = random.Random(5)
    # short texts (under 32 tokens with the prompt) are the same at every max_seq_length the
    # changing thread sets; long ones are not
    short = [_texts(rng, 5, 8) for _ in range(THREADS)]
    long = _texts(rng, 4, 120)
    ids = [random_ids([rng.randint(3, 300) for _ in range(4)], vocab=50000, seed=k) for k in range(THREADS)]
    lengths = (32, 8192, 64)

    # every call made alone first
    alone = {}
    for k in range(THREADS):
        alone["encode", k] = model.encode(short[k], prompt_name="search_query", truncate_dim=64)
        alone["tokens", k] = model.encode_tokens(ids[k])
        alone["hidden", k] = model.hidden_states(ids[k])
    for msl in lengths:
        model.max_seq_length = msl
        alone["long", msl] = model.encode(long, prompt_name="search_document")
    model.max_seq_length = 8192
    assert not np.allclose(alone["long", 32], alone["long", 8192], atol=1e-3), \
        "the long texts must be long enough for max_seq_length to matter"

    start = threading.Barrier(THREADS)
    failures: list[str] = []
    calls = [0] * THREADS

    def worker(k: int) -> None:
        try:
            start.wait(timeout=30)
            for r in range(ROUNDS):
                if k == 0:  # the thread that changes max_seq_length between its calls
                    msl = lengths[r % len(lengths)]
                    model.max_seq_length = msl
                    got, want, what = model.encode(long, prompt_name="search_document"), alone["long", msl], f"long@{msl}"
                elif (k + r) % 3 == 0:
                    got, want, what = model.encode(short[k], prompt_name="search_query", truncate_dim=64), \
                        alone["encode", k], "encode"
                elif (k + r) % 3 == 1:
                    got, want, what = model.encode_tokens(ids[k]), alone["tokens", k], "encode_tokens"
                else:
                    got = torch.cat(model.hidden_states(ids[k])).numpy()
                    want, what = torch.cat(alone["hidden", k]).numpy(), "hidden_states"
                calls[k] += 1
                diff = float(np.abs(np.asarray(got) - np.asarray(want)).max())
                if got.shape != want.shape or not diff <= TOL:
                    failures.append(f"thread {k} round {r} {what}: shape {got.shape} vs {want.shape}, "
                                    f"max abs diff {diff:.3g}")
        except Exception as e:  # noqa: BLE001 - any failure in a thread is reported below
            failures.append(f"thread {k}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=worker, args=(k,), name=f"caller-{k}") for k in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    model.max_seq_length = 8192
    assert not any(t.is_alive() for t in threads), "a caller thread did not finish in time"
    assert not failures, "\n".join(failures)
    assert calls == [ROUNDS] * THREADS


def test_a_call_reads_max_seq_length_once(model, monkeypatch):
    # A call tokenising beside the model (chunk by chunk, as on a GPU) while another thread
    # changes max_seq_length: every chunk of the call keeps the length the call started with.
    rng = random.Random(6)
    texts = _texts(rng, 12, 120)
    want = model.encode(texts)  # at 8192: nothing truncated
    monkeypatch.setattr(model, "tokenize_beside_model", True)
    monkeypatch.setattr(model, "tokenize_chunk", 3)
    encode = model.tokenizer.encode
    lengths_seen = []

    def encode_then_change(texts, prompt="", max_length=None):
        lengths_seen.append(max_length)
        out = encode(texts, prompt, max_length)
        model.max_seq_length = 32  # "another thread" changes the setting mid-call
        return out

    monkeypatch.setattr(model.tokenizer, "encode", encode_then_change)
    try:
        got = model.encode(texts)
    finally:
        model.max_seq_length = 8192
    assert lengths_seen == [8192] * 4
    assert np.abs(got - want).max() <= TOL


def test_max_seq_length_is_checked_when_set(model):
    with pytest.raises(ValueError, match=r"max_seq_length must be an int in 2..8192, got 1"):
        model.max_seq_length = 1
    with pytest.raises(ValueError, match=r"got 9000"):
        model.max_seq_length = 9000
    assert model.max_seq_length == 8192  # a refused value leaves the setting as it was


def test_tokenizer_is_never_reconfigured(model):
    # one Rust tokenizer per truncation length, each made once: the objects a thread may be
    # inside are never changed under it
    tok = model.tokenizer
    model.max_seq_length = 40
    model.tokenize(["x"])
    first = tok._for_length(40)
    model.max_seq_length = 8192
    model.tokenize(["x"])
    assert tok._for_length(40) is first and first.truncation["max_length"] == 40
    assert tok._for_length(8192).truncation["max_length"] == 8192


def test_a_cpu_model_is_built_on_a_thread_that_has_ended(small_checkpoint, monkeypatch):
    """`Engine.load` builds a CPU model on a passing thread (the comment there says why: the thread
    that later runs the model then holds torch's only OpenMP team); the model works from any
    thread, and an error of the load still reaches the caller as itself."""
    from modernbert_embed import Embedder
    from modernbert_embed import engine as engine_mod

    seen = []
    real = engine_mod.load_state_dict

    def recording(*args, **kwargs):
        seen.append(threading.current_thread())
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_mod, "load_state_dict", recording)
    m = Embedder.from_pretrained(small_checkpoint, device="cpu")
    assert len(seen) == 1 and seen[0] is not threading.current_thread() and not seen[0].is_alive()
    ids = random_ids([5, 70])
    want = m.encode_tokens(ids)
    got = []
    worker = threading.Thread(target=lambda: got.append(m.encode_tokens(ids)))
    worker.start()
    worker.join()
    np.testing.assert_array_equal(got[0], want)

    def broken(*args, **kwargs):
        raise ValueError("the weights are broken")

    monkeypatch.setattr(engine_mod, "load_state_dict", broken)
    with pytest.raises(ValueError, match="the weights are broken"):
        Embedder.from_pretrained(small_checkpoint, device="cpu")
