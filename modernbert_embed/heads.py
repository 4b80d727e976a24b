"""The classifier head of `ModernBertForSequenceClassification`, after the encoder.

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

from .weights import ClassifierSpec

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


__all__ = ["ACTIVATIONS", "ClassifierHead"]
