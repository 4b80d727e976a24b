"""The CPU's int8-weight experiment (`select_ops(..., int8_weights=True)`), not offered as a dtype:
its cosine to float32 missed the 0.995 bar (benchmarks/RESULTS.md).

Every Linear weight is quantised to int8 per output feature at load (`int8_pack`, the ops'
`pack_linear`) and each input per call (`int8_linear`, the ops' `linear`); the rest of the model
runs in float32.
"""

from __future__ import annotations

import warnings

import torch

# Activations are quantised to 8 bits, not fbgemm's 7-bit "reduce_range" (which exists for CPUs
# without VNNI, whose int8 products are added in saturating int16 pairs): on the random base-size
# checkpoint 7 bits gave a worst cosine of 0.984 against float32 on 48 mixed documents, 8 bits 0.995.
INT8_REDUCE_RANGE = False


def int8_available() -> bool:
    """Whether this torch build has a quantized CPU engine to run int8 GEMMs with."""
    return torch.backends.quantized.engine not in ("none", None) and bool(torch.backends.quantized.supported_engines)


def int8_pack(weight: torch.Tensor, geglu: bool = False):
    """A Linear weight [out, in] quantised to int8, one symmetric scale per output feature
    (max |w| / 127), and packed for torch's quantized CPU engine (fbgemm / oneDNN on x86). Wi is
    packed whole (`geglu` is ignored): the GeGLU runs after its GEMM."""
    w = weight.detach().float().contiguous()
    scale = (w.abs().amax(dim=1) / 127).clamp_min(1e-12).double()
    with warnings.catch_warnings():  # torch marks its quantized tensor types deprecated (still there in 2.13)
        warnings.simplefilter("ignore", UserWarning)
        q = torch.quantize_per_channel(w, scale, torch.zeros(w.shape[0], dtype=torch.long), 0, torch.qint8)
        return torch.ops.quantized.linear_prepack(q, None)


def int8_linear(x, packed):
    """`x @ W^T` for an `int8_pack`ed W and float32 x [T, in] -> float32 [T, out]: x is quantised
    per call (one scale and zero point from the range of the whole of x), the product runs in
    int8 with int32 sums, and is scaled back to float32."""
    return torch.ops.quantized.linear_dynamic(x, packed, INT8_REDUCE_RANGE)


__all__ = ["int8_available", "int8_pack", "int8_linear", "INT8_REDUCE_RANGE"]
