"""The CPU attention's three paths (full, band mask, window blocks) against a dense float64
reference with an explicit |i - j| <= w mask."""

import pytest
import torch

from modernbert_embed import ops_torch
from modernbert_embed.batching import pack


def dense(qkv, lengths, w, scale):
    out, start = [], 0
    for n in lengths:
        q, k, v = qkv[start:start + n].double().unbind(1)  # [n, heads, d]
        s = torch.einsum("ihd,jhd->hij", q, k) * scale
        if w is not None:
            i = torch.arange(n)
            s = s.masked_fill((i[:, None] - i[None, :]).abs() > w, float("-inf"))
        out.append(torch.einsum("hij,jhd->ihd", s.softmax(-1), v).reshape(n, -1))
        start += n
    return torch.cat(out)


@pytest.mark.parametrize("w", [None, 8, 16])
def test_attention_paths_match_dense(w):
    # w + 1, 3w and beyond: every path of ops_torch.attention, in one packed batch
    lengths = [1, 2, 8, 9, 10, 17, 24, 25, 48, 49, 50, 97, 130]
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(sum(lengths), 3, 2, 16, generator=g) * 2
    batch = pack([[0] * n for n in lengths], range(len(lengths)))
    got = ops_torch.attention(qkv, batch, w, 0.25)
    want = dense(qkv, lengths, w, 0.25)
    diff = (got.double() - want).abs()
    assert diff.max() <= 1e-5, f"max diff {diff.max():.3g} at token {int(diff.max(1).values.argmax())}"
