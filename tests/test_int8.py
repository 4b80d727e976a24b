"""The CPU's int8-weight experiment (`select_ops(..., int8_weights=True)`): int8 Linear weights,
activations quantised per call. Not offered as a dtype (its cosine to float32 missed the bar)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import random_ids
from modernbert_embed import Checkpoint, Embedder, int8, ops
from modernbert_embed.model import Linear

pytestmark = pytest.mark.skipif(not int8.int8_available(), reason="this torch has no quantized CPU engine")


def test_int8_linear_is_close_to_the_float_product():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 64, generator=g) * 0.05
    x = torch.randn(37, 64, generator=g)
    got = int8.int8_linear(x, int8.int8_pack(w))
    want = F.linear(x, w)
    assert got.dtype == torch.float32 and got.shape == want.shape
    # 8-bit weights and activations: about 1% of the output's scale, never more than a few
    err = (got - want).abs().max() / want.abs().max()
    assert 0 < err < 0.03, err
    assert F.cosine_similarity(got, want, dim=1).min() > 0.999


def test_an_int8_model_keeps_only_int8_weights_and_stays_close_to_float32(small_checkpoint):
    m32 = Embedder.from_pretrained(small_checkpoint, device="cpu", dtype="float32")
    m8 = Embedder.from_checkpoint(Checkpoint(small_checkpoint), device="cpu",
                                  ops=ops.select_ops("cpu", int8_weights=True))
    assert m8.dtype_name == "int8" and m8.dtype == torch.float32 and m32.dtype_name == "float32"
    assert "dtype=int8" in repr(m8) and m8.ops.int8_weights and not m32.ops.int8_weights
    linears = [m for m in m8.model.modules() if isinstance(m, Linear)]
    assert linears and all(m.packed is not None and m.weight.is_meta for m in linears)
    ids = random_ids([1, 5, 64, 65, 130, 300], seed=3)
    a = m32.encode_tokens(ids, convert_to_tensor=True)
    b = m8.encode_tokens(ids, convert_to_tensor=True)
    cos = (a * b).sum(1)
    assert torch.isfinite(b).all() and cos.min() > 0.99, cos
    assert (a - b).abs().max() > 0  # the int8 products did run
    h = m8.hidden_states(ids[:2])
    assert [tuple(t.shape) for t in h] == [(1, m8.config.hidden_size), (5, m8.config.hidden_size)]


def test_int8_is_refused_where_it_cannot_run(monkeypatch):
    with pytest.raises(ValueError, match="int8 weights run on the CPU only"):
        ops.select_ops(torch.device("cuda"), backend="torch", int8_weights=True)
    with pytest.raises(ValueError, match=r"dtype 'int8' is not supported \(float32, bfloat16, float16\)"):
        ops.resolve_dtype("int8", torch.device("cpu"))  # an experiment, not a dtype
    monkeypatch.setattr(int8, "int8_available", lambda: False)
    with pytest.raises(ValueError, match="need a torch build with a quantized CPU engine"):
        ops.select_ops("cpu", int8_weights=True)
