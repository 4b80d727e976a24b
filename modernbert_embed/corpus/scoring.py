"""What a classifier (cross-encoder) writes per document: float32 scores and an int32 label id.

Scores are the head's float32 logits turned into what `--scores` asks for:

- "activated" (the default): the folder's score activation applied to the logits, as
  `CrossEncoder.predict` does by default (sentence-transformers' `activation_fn`: the folder's, else
  sigmoid for one label and identity for more);
- "logits": the raw logits;
- "softmax": the activation, then a softmax over the labels (predict's `apply_softmax=True`; two
  labels or more).

One label gives scores [n], more give [n, num_labels] (the shapes of `CrossEncoder.predict`).

The label id per document is decided on the logits, so that it is the same whatever scores are
written: for two labels or more the argmax (the first on a tie, as numpy and torch), for one label
1 when the logit is >= 0 (a sigmoid score >= 0.5, the usual threshold of a binary classifier or
a relevance filter) and 0 below. The manifest records both rules (`scores`).
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import RefusedError

LABEL_DTYPE = "int32"
SCORE_DTYPE = "float32"


def activation_name(fn) -> str:
    """sentence-transformers' spelling of an activation: its class's dotted path."""
    t = type(fn)
    return f"{t.__module__}.{t.__name__}"


class Scoring:
    """How a classifier's logits become the scores and labels of a shard. `model`: the
    `LoadedModel` (with its head); `values`: one of `options.SCORE_VALUES`."""

    def __init__(self, model, values: str):
        spec = model.engine.head.spec
        self.num_labels = spec.num_labels
        self.id2label = {int(k): str(v) for k, v in dict(spec.id2label).items()}
        self.values = values
        if values == "softmax" and self.num_labels == 1:
            raise RefusedError(f"--scores softmax needs two labels or more; {model.name} has one (a softmax over "
                               "one label is always 1): use --scores activated or logits")
        self.activation = None if values == "logits" else model.activation_fn

    @property
    def score_shape(self) -> str:
        return "[n]" if self.num_labels == 1 else f"[n, {self.num_labels}]"

    def record(self) -> dict:
        """What the manifest records of the scores and labels (`scores`)."""
        activation = None if self.activation is None else activation_name(self.activation)
        label_rule = ("1 when the logit >= 0 (sigmoid >= 0.5), else 0" if self.num_labels == 1
                      else "argmax of the logits (the first on a tie)")
        return {"dtype": SCORE_DTYPE, "shape": self.score_shape, "num_labels": self.num_labels,
                "values": self.values, "activation": activation, "softmax": self.values == "softmax",
                "id2label": {str(k): v for k, v in sorted(self.id2label.items())},
                "labels": {"dtype": LABEL_DTYPE, "rule": label_rule}}

    def scores(self, logits: torch.Tensor) -> np.ndarray:
        """float32 scores [n] (one label) or [n, num_labels] of float32 logits [n, num_labels]."""
        out = logits if self.activation is None else self.activation(logits)
        if self.values == "softmax":
            out = torch.softmax(out, dim=-1)
        if self.num_labels == 1:
            out = out.squeeze(-1)
        return np.ascontiguousarray(out.float().cpu().numpy())

    def labels(self, logits: torch.Tensor) -> np.ndarray:
        """int32 label ids [n] of float32 logits [n, num_labels] (see the module docstring)."""
        lg = logits.float().cpu().numpy()
        if self.num_labels == 1:
            return (lg[:, 0] >= 0).astype(np.int32)
        return np.argmax(lg, axis=1).astype(np.int32) if lg.shape[0] else np.empty(0, dtype=np.int32)

    def empty(self) -> tuple[np.ndarray, np.ndarray]:
        shape = (0,) if self.num_labels == 1 else (0, self.num_labels)
        return np.empty(shape, dtype=np.float32), np.empty(0, dtype=np.int32)


__all__ = ["Scoring", "activation_name", "LABEL_DTYPE", "SCORE_DTYPE"]
