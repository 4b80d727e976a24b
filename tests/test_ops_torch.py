"""The CPU attention's three paths (full, band mask, window blocks) against a dense float64
reference with an explicit |i - j| <= w mask."""

import pytest
import torch

from modernbert_embed import ops_torch

from helpers import batch_of, dense_attention


@pytest.mark.parametrize("w", [None, 8, 16])
def test_attention_paths_match_dense(w):
    # w + 1, 3w and beyond: every path of ops_torch.attention, in one packed batch
    lengths = [1, 2, 8, 9, 10, 17, 24, 25, 48, 49, 50, 97, 130]
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(sum(lengths), 3, 2, 16, generator=g) * 2
    got = ops_torch.attention(qkv, batch_of(lengths, "cpu"), w, 0.25)
    want = dense_attention(qkv, lengths, w, 0.25)
    diff = (got.double() - want).abs()
    assert diff.max() <= 1e-5, f"max diff {diff.max():.3g} at token {int(diff.max(1).values.argmax())}"
