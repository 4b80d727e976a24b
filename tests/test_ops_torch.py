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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [16, 64])
def test_rotary_pairs_is_rotary_on_reordered_features(dtype, head_dim):
    """The CPU's rotary (features as (x_j, x_{j + d/2}) pairs, one complex multiplication) gives,
    feature for feature, what the halves' form gives: the same products and sums."""
    from modernbert_embed.rope import rope_tables

    lengths = [1, 7, 130, 64]
    g = torch.Generator().manual_seed(1)
    qkv = (torch.randn(sum(lengths), 3, 3, head_dim, generator=g) * 3).to(dtype)
    positions = batch_of(lengths, "cpu").positions
    cos, sin = rope_tables(10000.0, head_dim, 256)
    half = head_dim // 2
    pairs = torch.stack([torch.arange(half), torch.arange(half) + half], dim=-1).flatten()
    as_pairs = qkv.clone()
    as_pairs[:, :2] = qkv[:, :2][..., pairs]
    got = ops_torch.rotary_pairs(as_pairs, positions, cos, sin)
    want = ops_torch.rotary(qkv.clone(), positions, cos, sin)
    assert torch.equal(got[:, 2], qkv[:, 2]), "v must not change"
    back = torch.empty_like(got)
    back[..., pairs] = got
    diff = (back[:, :2].float() - want[:, :2].float()).abs().max().item()
    assert diff <= (1e-6 if dtype == torch.float32 else 0.0), diff
