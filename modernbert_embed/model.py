"""ModernBERT, unpadded, top to bottom.

What this computes is transformers' `ModernBertModel`; how it departs from the textbook BERT:
  - pre-norm residual blocks; LayerNorms have a weight and no bias; layer 0 has no attention norm
    (its input is the normalised embedding);
  - no position embeddings: RoPE on q and k, theta 160k in global layers and 10k in local ones;
  - every third layer (0, 3, 6, ...) attends globally; the others see keys with |i - j| <= 64;
  - GeGLU MLP: `Wi` makes [input | gate], output `Wo(gelu_erf(input) * gate)`;
  - no biases anywhere.
All tensors are packed: `[T, ...]` holds the tokens of every sequence of a `Batch` back to back.
The ops (`layer_norm`, `rotary`, `attention`, `geglu`, and the Linear layers' GEMM) are chosen
once, at load, by `ops.py`: this file has no device branches.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from .batching import Batch
from .config import ModernBertConfig
from .rope import rope_tables

if TYPE_CHECKING:
    from .ops import Ops


def _weight(*shape) -> nn.Parameter:
    # Built on the meta device: the real tensors arrive with load_state_dict(assign=True).
    return nn.Parameter(torch.empty(*shape, device="meta"), requires_grad=False)


class Linear(nn.Module):
    """`x @ W^T` by the ops' GEMM, on the weight in the form that GEMM takes (`Ops.pack_linear`:
    the checkpoint's tensor on a GPU, oneDNN's blocked layout on the CPU), made once by `pack`."""

    geglu = False  # Wi, whose GEMM the ops may fuse with the GeGLU after it (`GegluLinear`)

    def __init__(self, in_features: int, out_features: int, ops: Ops):
        super().__init__()
        self.weight = _weight(out_features, in_features)
        self.ops = ops
        self.packed = None

    def forward(self, x):
        return self.ops.linear(x, self.packed)

    def pack(self) -> None:
        """At load. Where the packed form is a copy, the checkpoint's tensor is freed (only its
        shape stays, on the meta device)."""
        fused = self.geglu and self.ops.geglu_linear is not None  # packed for `geglu_linear`
        self.packed = self.ops.pack_linear(self.weight, fused)
        if self.packed is not self.weight:
            self.weight = _weight(*self.weight.shape)


class GegluLinear(Linear):
    """Wi and the GeGLU after it: `gelu_erf(x W_in^T) * (x W_gate^T)` for W = [W_in; W_gate],
    [T, H] -> [T, I]. Ops with a `geglu_linear` apply the GeGLU inside the GEMM; the others run the
    GEMM, then their `geglu` op on its [T, 2I] output."""

    geglu = True

    def forward(self, x):
        if self.ops.geglu_linear is not None:
            return self.ops.geglu_linear(x, self.packed)
        return self.ops.geglu(self.ops.linear(x, self.packed))


class LayerNorm(nn.Module):
    def __init__(self, hidden: int, eps: float, ops: Ops):
        super().__init__()
        self.weight = _weight(hidden)
        self.eps = eps
        self.ops = ops

    def forward(self, x, residual=None):
        """`(LN(x + residual), x + residual)`; the sum is the updated residual stream."""
        return self.ops.layer_norm(x, self.weight, self.eps, residual)


class RotaryTables(nn.Module):
    """The rotary tables of one theta, shared by every layer that uses it: non-persistent buffers,
    so they move with the model and never enter a checkpoint."""

    def __init__(self, theta: float, head_dim: int, max_positions: int, device=None):
        super().__init__()
        cos, sin = rope_tables(theta, head_dim, max_positions, device)
        self.register_buffer("cos", cos, persistent=False)  # [max_positions, head_dim / 2] fp32
        self.register_buffer("sin", sin, persistent=False)


class Embedding(nn.Module):
    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.weight = _weight(vocab, hidden)

    def forward(self, ids):
        return F.embedding(ids, self.weight)


class Embeddings(nn.Module):
    def __init__(self, cfg: ModernBertConfig, ops: Ops):
        super().__init__()
        self.tok_embeddings = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.norm = LayerNorm(cfg.hidden_size, cfg.norm_eps, ops)

    def forward(self, input_ids):
        return self.norm(self.tok_embeddings(input_ids))[0]  # [T, H]


class Attention(nn.Module):
    def __init__(self, cfg: ModernBertConfig, layer: int, rope: RotaryTables, ops: Ops):
        super().__init__()
        self.heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.window = cfg.window(layer)  # None: global; w: keys with |i - j| <= w
        self.scale = cfg.head_dim**-0.5
        self.rope = rope  # the tables of this layer's theta, shared with the other layers of that theta
        self.ops = ops
        self.Wqkv = Linear(cfg.hidden_size, 3 * cfg.hidden_size, ops)
        self.Wo = Linear(cfg.hidden_size, cfg.hidden_size, ops)

    def reorder_rotary_pairs(self) -> None:
        """Reorder each head's q and k rows of Wqkv from halves (x_0 .. x_{d-1}) to rotary pairs
        (x_0, x_{d/2}, x_1, x_{d/2+1}, ...), for ops whose rotary takes that layout. q and k are
        reordered alike, so every q.k, and so the attention, is unchanged."""
        h, d = self.heads, self.head_dim
        pairs = torch.stack([torch.arange(d // 2), torch.arange(d // 2) + d // 2], dim=-1).flatten()
        rows = (torch.arange(2 * h)[:, None] * d + pairs[None, :]).flatten()  # q and k rows, head by head
        w = self.Wqkv.weight
        w[: 2 * h * d] = w[rows.to(w.device)].clone()

    def forward(self, x, batch: Batch):
        qkv = self.Wqkv(x).view(-1, 3, self.heads, self.head_dim)  # [T, 3, heads, d]
        if batch.key_lengths is not None:  # ColBERT's query expansion: trailing tokens are no one's keys
            qkv = self.ops.rotary(qkv, batch.positions, self.rope.cos, self.rope.sin)
            return self.Wo(self.ops.key_limited_attention(qkv, batch, self.window, self.scale))
        if self.ops.fused_rotary:  # the attention kernel rotates q and k as it loads them
            out = self.ops.attention(qkv, batch, self.window, self.scale, rope=(self.rope.cos, self.rope.sin))
        else:
            qkv = self.ops.rotary(qkv, batch.positions, self.rope.cos, self.rope.sin)
            out = self.ops.attention(qkv, batch, self.window, self.scale)  # [T, H]
        return self.Wo(out)


class MLP(nn.Module):
    def __init__(self, cfg: ModernBertConfig, ops: Ops):
        super().__init__()
        self.Wi = GegluLinear(cfg.hidden_size, 2 * cfg.intermediate_size, ops)
        self.Wo = Linear(cfg.intermediate_size, cfg.hidden_size, ops)

    def forward(self, x):
        return self.Wo(self.Wi(x))  # [T, H] -> GeGLU [T, I] -> [T, H]


class EncoderLayer(nn.Module):
    def __init__(self, cfg: ModernBertConfig, layer: int, rope: RotaryTables, ops: Ops):
        super().__init__()
        # Layer 0 has no attention norm: its input is the (already normalised) embedding.
        self.attn_norm = LayerNorm(cfg.hidden_size, cfg.norm_eps, ops) if layer > 0 else None
        self.attn = Attention(cfg, layer, rope, ops)
        self.mlp_norm = LayerNorm(cfg.hidden_size, cfg.norm_eps, ops)
        self.mlp = MLP(cfg, ops)

    def forward(self, h, pending, batch: Batch):
        """h: the residual stream; pending: the previous layer's MLP output, not yet added to h
        (each residual add is fused into the norm that follows it). Returns (h, this MLP output)."""
        if self.attn_norm is None:
            a = h
        else:
            a, h = self.attn_norm(pending, residual=h)  # h = h + pending; a = LN(h)
        m, h = self.mlp_norm(self.attn(a, batch), residual=h)  # h = h + attn; m = LN(h)
        return h, self.mlp(m)


class ModernBert(nn.Module):
    """The encoder: packed token ids in, final-norm hidden states [T, H] out."""

    def __init__(self, cfg: ModernBertConfig, ops: Ops, device=None):
        super().__init__()
        self.config = cfg
        tables = {
            theta: RotaryTables(theta, cfg.head_dim, cfg.max_position_embeddings, device)
            for theta in {cfg.global_rope_theta, cfg.local_rope_theta}
        }
        self.embeddings = Embeddings(cfg, ops)
        self.layers = nn.ModuleList(
            EncoderLayer(cfg, i, tables[cfg.rope_theta(i)], ops) for i in range(cfg.num_hidden_layers)
        )
        self.final_norm = LayerNorm(cfg.hidden_size, cfg.norm_eps, ops)
        self.ops = ops

    def load(self, state_dict: dict) -> None:
        """Take the checkpoint's tensors (names and shapes already checked), in the ops' layout."""
        self.load_state_dict(state_dict, strict=True, assign=True)
        if self.ops.rotary_pairs:
            for layer in self.layers:
                layer.attn.reorder_rotary_pairs()
        for module in self.modules():
            if isinstance(module, Linear):
                module.pack()
        self.eval()

    @torch.inference_mode()
    def forward(self, batch: Batch) -> torch.Tensor:
        h = self.embeddings(batch.input_ids)  # [T, H]
        pending = None
        for layer in self.layers:
            h, pending = layer(h, pending, batch)
        return self.final_norm(pending, residual=h)[0]  # [T, H]
