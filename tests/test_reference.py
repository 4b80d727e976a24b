"""The plain torch reference (the oracle of the kernels, the tuned torch path and the load-time
self-check) against definitions that share no code with it, and the one slice-then-normalise
that the pooling op, the server, chunking and `Embedder.similarity` all go through."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from modernbert_embed import api, chunking, matryoshka, ops_torch, reference
from modernbert_embed.matryoshka import slice_normalize
from modernbert_embed.server import batcher as batcher_mod

from helpers import batch_of, dense_attention


# ----------------------------------------------------------------------------- the reference ops
@pytest.mark.parametrize("w", [None, 0, 1, 5, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_attention_is_the_dense_definition(w, dtype):
    lengths = [1, 2, 9, 70, 140]
    g = torch.Generator().manual_seed(0)
    qkv = (torch.randn(sum(lengths), 3, 2, 16, generator=g) * 2).to(dtype)
    got = reference.attention(qkv, batch_of(lengths, "cpu"), w, 0.25)
    assert got.dtype == dtype and got.shape == (sum(lengths), 32)
    diff = (got.double() - dense_attention(qkv, lengths, w, 0.25)).abs()
    assert diff.max() <= (1e-5 if dtype == torch.float32 else 1e-12), f"max diff {diff.max():.3g}"


def test_reference_rotary_leaves_its_input_and_v_alone():
    from modernbert_embed.rope import rope_tables

    qkv = torch.randn(5, 3, 2, 8)
    before = qkv.clone()
    cos, sin = rope_tables(10000.0, 8, 16)
    out = reference.rotary(qkv, torch.arange(5), cos, sin)
    assert torch.equal(qkv, before) and torch.equal(out[:, 2], before[:, 2])
    assert torch.equal(out[0], before[0])  # position 0: angle 0
    # a rotation keeps each (x_j, x_{j + d/2}) pair's length
    pair_len = lambda t: t[:, :2, :, :4] ** 2 + t[:, :2, :, 4:] ** 2  # noqa: E731
    assert torch.allclose(pair_len(out), pair_len(before), atol=1e-5)
    assert not torch.allclose(out[1:, :2], before[1:, :2])


def test_reference_pool_means_then_slices_then_normalises():
    hidden = torch.tensor([[3.0, 4.0, 1.0], [3.0, 4.0, 5.0], [0.0, 2.0, 9.0]])
    batch = batch_of([2, 1], "cpu")
    mean = reference.pool(hidden, batch, "mean", 2, True)
    assert torch.allclose(mean, torch.tensor([[0.6, 0.8], [0.0, 1.0]]))  # [3, 4] / 5; [0, 2] / 2
    assert torch.equal(reference.pool(hidden, batch, "cls", None, False), hidden[[0, 2]])
    with pytest.raises(ValueError, match="unknown pooling mode 'max'"):
        reference.pool(hidden, batch, "max")


# ----------------------------------------------------------------------------- slice, then normalise
def test_slice_normalize_torch_and_numpy():
    x = np.array([[3.0, 4.0, 12.0], [0.0, 0.0, 5.0]], dtype=np.float32)
    t = torch.from_numpy(x.copy())
    for got in (slice_normalize(x, 2), slice_normalize(t, 2).numpy()):
        # the slice first: [3, 4] / 5, and an all-zero row stays zeros (not NaN)
        np.testing.assert_allclose(got, [[0.6, 0.8], [0.0, 0.0]], rtol=1e-6)
        assert got.dtype == np.float32
    np.testing.assert_allclose(slice_normalize(x), x / np.array([[13.0], [5.0]]), rtol=1e-6)
    raw = slice_normalize(x, 1, normalize=False)
    np.testing.assert_array_equal(raw, x[:, :1])
    raw[0, 0] = 99.0  # numpy: the caller's own copy, never a view of x
    assert x[0, 0] == 3.0
    assert slice_normalize(t.half(), 2).dtype == torch.float16


@pytest.fixture
def spied(monkeypatch):
    """Replace `slice_normalize` where `module` imported it by a spy recording each call's
    (kind of input, dim, normalize): `spied(module)` returns the calls list."""

    def install(module):
        calls = []

        def spy(x, dim=None, normalize=True):
            calls.append(("numpy" if isinstance(x, np.ndarray) else "torch", dim, normalize))
            return matryoshka.slice_normalize(x, dim, normalize)

        monkeypatch.setattr(module, "slice_normalize", spy)
        return calls

    return install


def test_pooling_chunking_and_similarity_go_through_slice_normalize(spied):
    pool_calls, chunk_calls, sim_calls = spied(reference), spied(chunking), spied(api)
    assert ops_torch.pool is reference.pool  # the torch path pools with the reference itself
    hidden = torch.randn(7, 6)
    pooled = reference.pool(hidden, batch_of([3, 4], "cpu"), "mean", 4, True)
    assert pool_calls == [("torch", 4, True)] and pooled.shape == (2, 4)

    windows = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 4.0]])
    docs = chunking.combine(windows, owner=[0, 0, 1], content_tokens=[1, 3, 5], num_docs=2, normalize=True)
    assert chunk_calls == [("torch", None, True)]
    assert torch.allclose(docs, torch.tensor([[0.25, 0.75], [3.0, 4.0]]) / torch.tensor([[0.625 ** 0.5], [1.0]]))

    sim = api.Embedder.similarity(np.array([[3.0, 4.0]]), torch.tensor([[4.0, 3.0], [0.0, 2.0]]))
    assert sim_calls == [("torch", None, True)] * 2
    assert torch.allclose(sim, torch.tensor([[0.96, 0.8]]))


class _Engine:
    """What the batcher reads of an engine: raw pooled rows, float32, all features."""

    dtype_name = "float32"

    def __init__(self, rows):
        self.rows = rows

    def embed(self, ids, **kwargs):
        assert kwargs["dim"] is None and kwargs["normalize"] is False
        return self.rows[: len(ids)]


def test_the_servers_rows_go_through_slice_normalize(spied):
    calls = spied(batcher_mod)
    rows = torch.tensor([[3.0, 4.0, 12.0], [6.0, 8.0, 1.0], [0.0, 2.0, 1.0]])
    worker = batcher_mod.Batcher(_Engine(rows), max_batch_tokens=64, max_queued_tokens=64)
    loop = asyncio.new_event_loop()
    try:
        jobs = [batcher_mod.Job(ids=[[1, 2], [3]], dim=2, normalize=True, future=loop.create_future(), loop=loop),
                batcher_mod.Job(ids=[[4]], dim=3, normalize=False, future=loop.create_future(), loop=loop)]
        worker._process(jobs)
        first, second = (loop.run_until_complete(job.future) for job in jobs)
    finally:
        loop.close()
    assert calls == [("numpy", 2, True), ("numpy", 3, False)]  # per request, in numpy
    np.testing.assert_allclose(first, [[0.6, 0.8], [0.6, 0.8]], rtol=1e-6)
    np.testing.assert_array_equal(second, [[0.0, 2.0, 1.0]])
    assert first.dtype == second.dtype == np.float32
