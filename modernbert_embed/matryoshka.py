"""Matryoshka slice, then L2 normalise: the one place that says how an embedding row is cut to its
dimensions and scaled to unit length.

The torch pooling op, the server's per-request rows, chunking's per-document means and
`Embedder.similarity` all go through `slice_normalize`. The fused Triton pooling kernel does the
same in its epilogue and is tested against the torch pooling op, which calls this.
"""

from __future__ import annotations

import numpy as np
import torch

# The smallest norm divided by: an all-zero row stays zeros, never NaN (F.normalize's eps).
EPS = 1e-12


def slice_normalize(x, dim: int | None = None, normalize: bool = True):
    """The first `dim` features of every row of `x` [..., H] (all of them for None), divided, when
    `normalize`, by the row's L2 norm (at least `EPS`).

    A torch tensor gives a torch tensor of the same dtype on the same device (a view of `x` when
    nothing is normalised). A numpy array gives a new array of the same dtype that the caller owns,
    never a view of `x`.
    """
    if isinstance(x, torch.Tensor):
        x = x[..., :dim]
        return x / x.norm(dim=-1, keepdim=True).clamp_min(EPS) if normalize else x
    out = np.array(x[..., :dim])  # a copy: the caller may keep it while `x` is reused
    if normalize:
        out /= np.maximum(np.linalg.norm(out, axis=-1, keepdims=True), EPS)
    return out


__all__ = ["slice_normalize", "EPS"]
