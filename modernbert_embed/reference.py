"""The plain torch version of every op: the oracle.

Each op is written the obvious way, as its definition reads, and nothing here is tuned: the
load-time self-check (`load_check`) and the tests compare the Triton kernels and the tuned torch
path (`ops_torch`) against these. A change made for speed goes into `ops_torch` or `kernels/`,
never here, so that it cannot move the thing it is checked against.

Tensors are packed: `[T, ...]` holds all tokens of all sequences of a batch, and
`batch.cu_seqlens` (device) / `batch.lengths` (host) say where each sequence starts. The
signatures are the ones the model calls (`ops.Ops`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .matryoshka import slice_normalize


def layer_norm(x, weight, eps, residual=None):
    """Weight-only LayerNorm of `x + residual`.

    Returns `(LN(x + residual), x + residual)`: the sum is the residual stream for the next
    sublayer (with `residual=None` the second item is `x` itself). Statistics in fp32.
    """
    if residual is not None:
        x = x + residual
    y = F.layer_norm(x, (x.shape[-1],), weight, None, eps)
    return y, x


def rotary(qkv, positions, cos, sin):
    """Rotate q and k of the packed `qkv` [T, 3, heads, head_dim] in the rotate-half form, in fp32:
    each head's (x1, x2) halves become (x1 cos - x2 sin, x2 cos + x1 sin) at the token's position.

    `positions` [T] restart at 0 for every sequence; `cos`/`sin` [max_positions, head_dim / 2] fp32
    come from `rope.rope_tables`. Returns a new tensor in qkv's dtype (v as it was); `qkv` is left
    unchanged.
    """
    half = qkv.shape[-1] // 2
    c = cos[positions][:, None, None, :]  # [T, 1, 1, half]
    s = sin[positions][:, None, None, :]
    qk = qkv[:, :2].float()  # [T, 2, heads, head_dim]
    x1, x2 = qk[..., :half], qk[..., half:]
    rotated = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
    return torch.cat([rotated.to(qkv.dtype), qkv[:, 2:]], dim=1)


def attention(qkv, batch, window, scale):
    """Bidirectional attention within each packed sequence.

    qkv: [T, 3, heads, head_dim] (rotary applied). window: None for full attention, or the half
    window w: query i sees the keys j with |i - j| <= w (inclusive). Returns [T, heads * head_dim]
    in qkv's dtype. One SDPA call per sequence over all its keys, with a boolean mask for the
    window: O(L^2) work per sequence, exactly as the definition reads.
    """
    T, _, heads, d = qkv.shape
    out = []
    for seq in qkv.split(list(batch.lengths)):  # [n, 3, heads, d]
        n = seq.shape[0]
        q, k, v = seq.permute(1, 2, 0, 3)  # each [heads, n, d]
        mask = None
        if window is not None:
            i = torch.arange(n, device=qkv.device)
            mask = (i[:, None] - i[None, :]).abs() <= window  # [n, n], True: visible
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)  # [heads, n, d]
        out.append(o.transpose(0, 1).reshape(n, heads * d))
    return torch.cat(out) if out else qkv.new_empty(0, heads * d)


def geglu(u):
    """`gelu_erf(u[:, :I]) * u[:, I:]` for the `Wi` output u: [T, 2I] -> [T, I]."""
    x, gate = u.chunk(2, dim=-1)
    return F.gelu(x) * gate


def pool(hidden, batch, mode="mean", dim=None, normalize=True):
    """Sentence embeddings from packed hidden states [T, H] -> [B, dim] fp32.

    mode "mean": average over every token of the sequence ([CLS], [SEP] and prompt included);
    "cls": the first token. Then the Matryoshka slice and the L2 normalisation
    (`matryoshka.slice_normalize`: the first `dim` features, divided by max(||x||, 1e-12)). Sums
    accumulate in fp32.
    """
    B, H = len(batch.lengths), hidden.shape[-1]
    if mode == "mean":
        lengths = torch.tensor(batch.lengths, device=hidden.device)
        seg = torch.repeat_interleave(torch.arange(B, device=hidden.device), lengths)  # [T]: each token's sequence
        sums = torch.zeros(B, H, dtype=torch.float32, device=hidden.device).index_add_(0, seg, hidden.float())
        pooled = sums / lengths[:, None].float()
    elif mode == "cls":
        pooled = hidden[batch.cu_seqlens[:-1].long()].float()
    else:
        raise ValueError(f"unknown pooling mode {mode!r}")
    return slice_normalize(pooled, dim, normalize)


__all__ = ["layer_norm", "rotary", "attention", "geglu", "pool"]
