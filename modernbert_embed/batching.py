"""Scheduling: sort by length, pack under a token budget, and the `Batch` that flows through the model.

No padding anywhere: a batch is one flat tensor of all its tokens plus `cu_seqlens`, the offsets
where each sequence starts. `order` remembers which caller input each sequence came from, so the
caller's order is restored at the end and every input yields exactly one output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # [T] int64, all sequences back to back
    positions: torch.Tensor  # [T] int64, restarting at 0 for every sequence
    cu_seqlens: torch.Tensor  # [B + 1] int32, sequence b is tokens cu_seqlens[b] : cu_seqlens[b + 1]
    max_seqlen: int
    lengths: tuple[int, ...]  # host copy of the B lengths (CPU attention and pooling use it)
    order: tuple[int, ...]  # order[b] = index of sequence b in the caller's input

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_seqs(self) -> int:
        return len(self.lengths)


def plan_batches(lengths: Sequence[int], max_batch_tokens: int, batch_size: int | None = None):
    """Group input indices into batches: longest first, each under `max_batch_tokens` tokens and
    at most `batch_size` sequences. A sequence longer than the budget gets a batch to itself.

    Longest first means the peak memory is reached by the first batch, so an out-of-memory shows
    at once, and lengths in one batch are close (local attention blocks stay full).
    """
    if max_batch_tokens < 1:
        raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    tokens = 0
    for i in order:
        n = lengths[i]
        full = tokens + n > max_batch_tokens or (batch_size is not None and len(current) >= batch_size)
        if current and full:
            batches.append(current)
            current, tokens = [], 0
        current.append(i)
        tokens += n
    if current:
        batches.append(current)
    return batches


def pack(sequences: Sequence[Sequence[int]], order: Sequence[int], device=None) -> Batch:
    """Pack the token-id lists `sequences[i] for i in order` into one `Batch` on `device`."""
    chosen = [sequences[i] for i in order]
    lengths = tuple(len(s) for s in chosen)
    flat = [t for s in chosen for t in s]
    ids = torch.tensor(flat, dtype=torch.int64)
    positions = torch.cat([torch.arange(n, dtype=torch.int64) for n in lengths])
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0).to(torch.int32)
    return Batch(
        input_ids=ids.to(device, non_blocking=True),
        positions=positions.to(device, non_blocking=True),
        cu_seqlens=cu.to(device, non_blocking=True),
        max_seqlen=max(lengths),
        lengths=lengths,
        order=tuple(order),
    )
