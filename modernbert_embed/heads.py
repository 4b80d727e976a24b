"""The heads after the encoder: the classifier of `ModernBertForSequenceClassification`, and the
per-token projection of a late-interaction (ColBERT) model.

What it computes is transformers' head in eval mode (dropout is inert):
```
pooled = h[first token]                     classifier_pooling "cls"
       = mean of h over the sequence        classifier_pooling "mean"
logits = classifier( LayerNorm_{norm_eps, bias iff norm_bias}( act( dense(pooled) ) ) )
```
with `dense` biased iff `classifier_bias` and `act` = ACT2FN[classifier_activation] (exact erf GELU
by default). Pooling is the ops' segment reduction over the packed batch (fp32 sums); the head runs
in float32 on float32 weights whatever the model's dtype, so that logits are float32 (bf16 scores
collapse into ties after a sigmoid).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .model import Linear
from .weights import ClassifierSpec, MultiVectorSpec

# transformers' ACT2FN, by name (`weights.folder.HEAD_ACTIVATIONS` are the names a folder may use)
ACTIVATIONS = {
    "gelu": F.gelu,  # exact (erf)
    "gelu_python": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "linear": lambda x: x,
}


def _weight(*shape) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, device="meta"), requires_grad=False)


class _Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.weight = _weight(out_features, in_features)
        self.bias = _weight(out_features) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class _LayerNorm(nn.Module):
    def __init__(self, hidden: int, eps: float, bias: bool):
        super().__init__()
        self.weight = _weight(hidden)
        self.bias = _weight(hidden) if bias else None
        self.eps = eps

    def forward(self, x):
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)


class _PredictionHead(nn.Module):  # transformers' ModernBertPredictionHead: names `head.dense`, `head.norm`
    def __init__(self, hidden: int, spec: ClassifierSpec):
        super().__init__()
        self.dense = _Linear(hidden, hidden, spec.bias)
        self.norm = _LayerNorm(hidden, spec.norm_eps, spec.norm_bias)
        self.act = ACTIVATIONS[spec.activation]

    def forward(self, x):
        return self.norm(self.act(self.dense(x)))


class ClassifierHead(nn.Module):
    """Pooled final-norm states [B, H] float32 -> logits [B, num_labels] float32. Its parameters
    are the checkpoint's `head.*` and `classifier.*` tensors, under those names."""

    def __init__(self, hidden: int, spec: ClassifierSpec):
        super().__init__()
        self.spec = spec
        self.pooling = spec.pooling
        self.head = _PredictionHead(hidden, spec)
        self.classifier = _Linear(hidden, spec.num_labels, bias=True)

    def load(self, state_dict: dict) -> None:
        """Take the checkpoint's head tensors (names and shapes already checked), float32."""
        self.load_state_dict(state_dict, strict=True, assign=True)
        self.eval()

    @torch.inference_mode()
    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.head(pooled.float()))  # [B, H] -> [B, num_labels]


class ProjectionHead(nn.Module):
    """A ColBERT model's Dense projection and per-token L2 normalisation, as PyLate computes them:
    final-norm states [T, H] -> `F.normalize(dense(h)[:, :dim])` [T, dim] float32, for every token
    (PyLate's Dense: `linear.weight` [out, H], `linear.bias` iff the folder has one, identity
    activation). `dim` below `out_features` is sentence-transformers' `truncate_dim`: the first
    `dim` features, normalised again.

    The projection runs in the model's dtype by the ops' GEMM, as every Linear of the backbone: on
    a GPU cuBLAS on the device (bf16/fp16 inputs, float32 accumulation), on the CPU oneDNN's packed
    weights; its output is upcast to float32 before the bias and the norm, so that the sum of
    squares is taken in float32."""

    def __init__(self, spec: MultiVectorSpec, ops):
        super().__init__()
        self.spec = spec
        self.linear = Linear(spec.in_features, spec.out_features, ops)
        self.bias = nn.Parameter(torch.empty(spec.out_features, device="meta"), requires_grad=False) \
            if spec.bias else None

    def load(self, state_dict: dict) -> None:
        """Take the Dense module's tensors (`linear.weight`, `linear.bias`: names and shapes
        already checked), the weight in the model's dtype, in the ops' layout; the bias float32."""
        bias = state_dict.pop("linear.bias", None)
        self.linear.load_state_dict({"weight": state_dict.pop("linear.weight")}, strict=True, assign=True)
        self.linear.pack()
        if self.bias is not None:
            self.bias = nn.Parameter(bias.float(), requires_grad=False)
        self.eval()

    @torch.inference_mode()
    def forward(self, hidden: torch.Tensor, dim: int | None = None) -> torch.Tensor:
        x = self.linear(hidden).float()  # [T, out]
        if self.bias is not None:
            x = x + self.bias
        if dim is not None and dim < x.shape[1]:
            x = x[:, :dim]
        return F.normalize(x, p=2, dim=1)  # as torch.nn.functional.normalize in PyLate: eps 1e-12


__all__ = ["ACTIVATIONS", "ClassifierHead", "ProjectionHead"]
