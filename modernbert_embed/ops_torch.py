"""The torch version of every op the model calls.

Each function here is three things at once: the CPU path, the oracle the Triton kernels are tested
against, and the baseline they are benchmarked against. The GPU kernels in `kernels/` have the
same signatures. Tensors are packed: `[T, ...]` holds all tokens of all sequences of a batch, and
`batch.cu_seqlens` (device) / `batch.lengths` (host) say where each sequence starts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------- layer norm
def layer_norm(x, weight, eps, residual=None):
    """Weight-only LayerNorm of `x + residual`.

    Returns `(LN(x + residual), x + residual)`: the sum is the residual stream for the next
    sublayer (with `residual=None` the second item is `x` itself). Statistics in fp32.
    """
    if residual is not None:
        x = x + residual
    y = F.layer_norm(x, (x.shape[-1],), weight, None, eps)
    return y, x


# ----------------------------------------------------------------------------- rotary
def rope_tables(theta: float, head_dim: int, max_positions: int, device=None):
    """`cos, sin` of shape [max_positions, head_dim // 2], fp32.

    `inv_freq` is computed in fp32 exactly as torch/transformers do (a float64 computation rounded
    to fp32 differs in about a third of the entries), and the angle is `position * inv_freq` in fp32.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    pos = torch.arange(max_positions, dtype=torch.float32)
    angles = pos[:, None] * inv_freq[None, :]
    return angles.cos().to(device), angles.sin().to(device)


def rotary(qkv, positions, cos, sin):
    """Rotate q and k of the packed `qkv` [T, 3, heads, head_dim] (rotate-half form), in fp32.

    `positions` [T] restart at 0 for every sequence; `cos`/`sin` come from `rope_tables`.
    Returns a tensor of the same shape and dtype (v untouched).
    """
    half = qkv.shape[-1] // 2
    c = cos[positions][:, None, None, :]  # [T, 1, 1, half]
    s = sin[positions][:, None, None, :]
    qk = qkv[:, :2].float()  # [T, 2, heads, head_dim]
    x1, x2 = qk[..., :half], qk[..., half:]
    rotated = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(qkv.dtype)
    return torch.cat((rotated, qkv[:, 2:]), dim=1)


# ----------------------------------------------------------------------------- attention
def attention(qkv, batch, window, scale):
    """Bidirectional attention within each packed sequence.

    qkv: [T, 3, heads, head_dim] (rotary applied). window: None for full attention, or the half
    window w (keys with |i - j| <= w, inclusive). Returns [T, heads * head_dim].
    """
    if window is None:
        return _attention_full(qkv, batch.lengths, scale)
    return _attention_banded(qkv, batch.lengths, window, scale)


def _attention_full(qkv, lengths, scale):
    # One exact SDPA call per sequence: no padding, cost sum(L_i^2).
    T, _, heads, d = qkv.shape
    out = torch.empty(T, heads, d, dtype=qkv.dtype, device=qkv.device)
    q, k, v = qkv.permute(1, 2, 0, 3).unbind(0)  # each [heads, T, d]
    start = 0
    for n in lengths:
        end = start + n
        out[start:end] = F.scaled_dot_product_attention(
            q[None, :, start:end], k[None, :, start:end], v[None, :, start:end], scale=scale
        )[0].transpose(0, 1)
        start = end
    return out.view(T, heads * d)


def _attention_banded(qkv, lengths, w, scale):
    """Sliding-window attention over the whole packed stream, block by block.

    Queries are cut into blocks of `w`; block b sees the keys [b*w - w, b*w + 2w), so work is
    proportional to T * 3w, not to any sequence length squared. A mask keeps |i - j| <= w and
    same-sequence pairs only, so neighbours in the pack never see each other.
    """
    T, _, heads, d = qkv.shape
    dev = qkv.device
    blk = w
    nb = -(-T // blk)
    span = blk + 2 * w  # keys visible to one query block
    pad_right = nb * blk - T + w

    seq_id = torch.repeat_interleave(
        torch.arange(len(lengths), device=dev), torch.tensor(lengths, device=dev)
    )
    # Padding gets its own id (-1): a padded query then always sees itself and stays finite.
    seq_pad = F.pad(seq_id, (w, pad_right), value=-1)  # [T + w + pad_right]
    q_seq = F.pad(seq_id, (0, nb * blk - T), value=-1).view(nb, blk)
    k_seq = seq_pad.unfold(0, span, blk)  # [nb, span]
    qi = torch.arange(blk, device=dev)[:, None]
    kj = torch.arange(span, device=dev)[None, :] - w  # key offset relative to block start
    in_window = (qi - kj).abs() <= w  # [blk, span]
    mask = in_window[None] & (q_seq[:, :, None] == k_seq[:, None, :])  # [nb, blk, span]

    q, k, v = qkv.unbind(1)  # [T, heads, d]
    qb = F.pad(q, (0, 0, 0, 0, 0, nb * blk - T)).view(nb, blk, heads, d).transpose(1, 2)
    kp = F.pad(k, (0, 0, 0, 0, w, pad_right)).unfold(0, span, blk)  # [nb, heads, d, span]
    vp = F.pad(v, (0, 0, 0, 0, w, pad_right)).unfold(0, span, blk)
    kb = kp.permute(0, 1, 3, 2)  # [nb, heads, span, d]
    vb = vp.permute(0, 1, 3, 2)
    ob = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask[:, None], scale=scale)
    out = ob.transpose(1, 2).reshape(nb * blk, heads * d)[:T]
    return out


# ----------------------------------------------------------------------------- GeGLU
def geglu(u):
    """`gelu_erf(u[:, :I]) * u[:, I:]` for the `Wi` output u: [T, 2I] -> [T, I]."""
    x, gate = u.chunk(2, dim=-1)
    return F.gelu(x) * gate


# ----------------------------------------------------------------------------- pooling
def pool(hidden, batch, mode="mean", dim=None, normalize=True):
    """Sentence embeddings from packed hidden states [T, H] -> [B, dim] fp32.

    mode "mean": average over every token of the sequence ([CLS], [SEP] and prompt included);
    "cls": the first token. Matryoshka: keep the first `dim` features, then L2-normalise
    (`x / max(||x||, 1e-12)`). Sums accumulate in fp32.
    """
    B = len(batch.lengths)
    H = hidden.shape[-1]
    dim = H if dim is None else dim
    if mode == "mean":
        lengths = torch.tensor(batch.lengths, device=hidden.device)
        seg = torch.repeat_interleave(torch.arange(B, device=hidden.device), lengths)
        sums = torch.zeros(B, H, dtype=torch.float32, device=hidden.device)
        sums.index_add_(0, seg, hidden.float())
        pooled = sums / lengths[:, None].float()
    elif mode == "cls":
        pooled = hidden[batch.cu_seqlens[:-1].long()].float()
    else:
        raise ValueError(f"unknown pooling mode {mode!r}")
    pooled = pooled[:, :dim]
    if normalize:
        pooled = pooled / pooled.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return pooled

