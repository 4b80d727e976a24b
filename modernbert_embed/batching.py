"""Scheduling: sort by length, pack under a token budget, and the `Batch` that flows through the model.

No padding anywhere: a batch is one flat tensor of all its tokens plus `cu_seqlens`, the offsets
where each sequence starts. `order` remembers which caller input each sequence came from, so the
caller's order is restored at the end and every input yields exactly one output.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

# Tokens per batch unless the caller says otherwise (the dispatch picks one by device,
# `ops.default_max_batch_tokens`). A GPU: large enough to keep its matmuls efficient, small enough
# that a batch's activations stay a few hundred MB. The CPU: small enough that a batch's
# activations stay in the caches between the memory-bound ops (norms, rotary, GeGLU, residuals);
# on the 2-core benchmark machine 4096 ran the mixed corpus 1.09x (fp32) and 1.14x (bf16) faster
# than 16384, with bit-identical embeddings, and 2048 no better (benchmarks/RESULTS.md).
GPU_MAX_BATCH_TOKENS = 16384
CPU_MAX_BATCH_TOKENS = 4096


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # [T] int64, all sequences back to back
    positions: torch.Tensor  # [T] int64, restarting at 0 for every sequence
    cu_seqlens: torch.Tensor  # [B + 1] int32, sequence b is tokens cu_seqlens[b] : cu_seqlens[b + 1]
    max_seqlen: int
    lengths: tuple[int, ...]  # host copy of the B lengths (CPU attention and pooling use it)
    order: tuple[int, ...]  # order[b] = index of sequence b in the caller's input
    # ColBERT's query expansion without attention to the expansion tokens: sequence b's first
    # key_lengths[b] tokens are its keys; the ones after them attend but are attended by none
    # (themselves included). None: every token is a key (the usual case).
    key_lengths: tuple[int, ...] | None = None

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


def upload(values: np.ndarray, dtype: torch.dtype, device=None) -> torch.Tensor:
    """A 1-d host array as a tensor on `device`. For a GPU the values go through pinned memory
    with a non-blocking copy, so the host never waits for the GPU's queue to drain (a copy from
    ordinary memory may): the host prepares the next batch while the GPU computes this one. The
    pinned buffer is kept until the copy has run (torch's pinned-memory allocator records it)."""
    device = torch.device("cpu") if device is None else torch.device(device)
    if device.type != "cuda":
        return torch.from_numpy(np.ascontiguousarray(values)).to(dtype=dtype, device=device)
    host = torch.empty(len(values), dtype=dtype, pin_memory=True)
    host.numpy()[:] = values
    return host.to(device, non_blocking=True)


def pack(sequences: Sequence[Sequence[int]], order: Sequence[int], device=None,
         key_lengths: Sequence[int] | None = None) -> Batch:
    """Pack the token-id lists `sequences[i] for i in order` into one `Batch` on `device`.
    `key_lengths[i]`: how many leading tokens of input i are keys (see `Batch.key_lengths`)."""
    chosen = [sequences[i] for i in order]
    lengths = tuple(len(s) for s in chosen)
    T = sum(lengths)
    ids = np.fromiter(itertools.chain.from_iterable(chosen), dtype=np.int64, count=T)
    ends = np.cumsum(lengths, dtype=np.int64)
    starts = ends - np.asarray(lengths, dtype=np.int64)
    positions = np.arange(T, dtype=np.int64) - np.repeat(starts, lengths)  # restart at 0 per sequence
    cu = np.concatenate([[0], ends])
    return Batch(
        input_ids=upload(ids, torch.int64, device),
        positions=upload(positions, torch.int64, device),
        cu_seqlens=upload(cu, torch.int32, device),
        max_seqlen=max(lengths),
        lengths=lengths,
        order=tuple(order),
        key_lengths=None if key_lengths is None else tuple(int(key_lengths[i]) for i in order),
    )
