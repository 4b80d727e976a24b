"""The rotary tables: the one computation of RoPE's angles, shared by the model, the dispatch's
load-time check, the tests and the benchmarks."""

from __future__ import annotations

import torch


def rope_tables(theta: float, head_dim: int, max_positions: int, device=None):
    """`cos, sin` of shape [max_positions, head_dim // 2], fp32.

    `inv_freq` is computed in fp32 exactly as torch/transformers do (a float64 computation rounded
    to fp32 differs in about a third of the entries), and the angle is `position * inv_freq` in fp32.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    pos = torch.arange(max_positions, dtype=torch.float32)
    angles = pos[:, None] * inv_freq[None, :]
    return angles.cos().to(device), angles.sin().to(device)

