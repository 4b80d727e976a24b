"""Helpers shared by the tests: loading with forced ops, the real vocabulary's config."""

from __future__ import annotations

from modernbert_embed import Checkpoint, Embedder
from modernbert_embed.ops import select_ops

from conftest import SMALL_CONFIG

# The small config with the real tokenizer's vocabulary and special tokens.
REAL_VOCAB = {**SMALL_CONFIG, "vocab_size": 50368, "pad_token_id": 50283, "cls_token_id": 50281,
              "sep_token_id": 50282, "bos_token_id": 50281, "eos_token_id": 50282}


def load_with_ops(folder, device="cpu", dtype=None, backend="auto", attention="auto") -> Embedder:
    """An Embedder whose ops are forced (the documented way for experiments: `from_checkpoint`
    with `ops=select_ops(...)`); with both "auto", the library's own choice."""
    ops = None if (backend, attention) == ("auto", "auto") else select_ops(device, backend, attention)
    return Embedder.from_checkpoint(Checkpoint(folder), device=device, dtype=dtype, ops=ops)
