"""The public API for rerankers and classifiers: `CrossEncoder`, shaped like sentence-transformers'
so that code moves over by changing an import.

A thin front on one loaded model with a classifier head (`loaded.LoadedModel`, a
`ModernBertForSequenceClassification` folder): pairs are encoded `[CLS] a [SEP] b [SEP]` and
truncated longest first to `max_seq_length` (single texts `[CLS] t [SEP]`), packed unpadded under
the token budget like embeddings (a rerank of one query and 200 documents of mixed lengths is one
stream of packed forwards), pooled and scored by the head exactly as transformers does, in
float32. The score activation is the folder's (sentence-transformers' `activation_fn` in
config.json), else sigmoid for one label and identity for more. Truncation is reported with a
`TruncationWarning`, never silent. An embedder folder is refused with the name of the class that
runs it (`Embedder`).

Thread safety: as `Embedder`, `predict` and `rank` may be called from many threads at once.
"""

from __future__ import annotations

import warnings
from typing import Callable, Sequence

import numpy as np
import torch

from .api import progress_bar
from .loaded import FrontEnd, LoadedModel, check_top_k, ranked
from .options import EncodeOptions
from .weights import CLASSIFIER


class TruncationWarning(UserWarning):
    """Some inputs were longer than `max_seq_length` tokens and were truncated."""


def split_inputs(inputs) -> tuple[list, bool]:
    """(list of inputs, whether one input was given), in sentence-transformers' reading: a string
    or a pair (a list or tuple of strings) is one input; a list of them is many."""
    if isinstance(inputs, str):
        return [inputs], True
    if isinstance(inputs, np.ndarray):
        inputs = inputs.tolist()
    if not isinstance(inputs, (list, tuple)):
        inputs = list(inputs)
    if inputs and isinstance(inputs[0], str):
        return [inputs], True
    return list(inputs), False


def _is_pair(x) -> bool:
    return isinstance(x, (list, tuple)) and len(x) == 2 and all(isinstance(t, str) for t in x)


def _is_single(x) -> bool:
    return isinstance(x, str) or (isinstance(x, (list, tuple)) and len(x) == 1 and isinstance(x[0], str))


class CrossEncoder(FrontEnd):
    """Scores of text pairs (rerankers) or of single texts (classifiers) with ModernBERT.

    `from_pretrained(name_or_path, device=None, dtype=None, revision=None, local_files_only=None)`
    (see `FrontEnd`) loads a `ModernBertForSequenceClassification` folder (e.g.
    Alibaba-NLP/gte-reranker-modernbert-base); an embedder folder is refused, `Embedder` runs it."""

    KIND = CLASSIFIER

    def __init__(self, loaded: LoadedModel):
        super().__init__(loaded)
        self.activation_fn = loaded.activation_fn  # as sentence-transformers: an attribute one may replace

    @property
    def num_labels(self) -> int:
        return self.engine.head.spec.num_labels

    @property
    def id2label(self) -> dict[int, str]:
        return dict(self.engine.head.spec.id2label)

    @property
    def classifier_pooling(self) -> str:
        return self.engine.head.pooling

    # --------------------------------------------------------------------------- text in
    def tokenize(self, inputs: Sequence) -> tuple[list[list[int]], list[bool]]:
        """Token ids of a list of inputs (pairs `(a, b)` -> `[CLS] a [SEP] b [SEP]`, single texts
        -> `[CLS] t [SEP]`, truncated to max_seq_length) and whether each was truncated."""
        inputs = list(inputs)
        msl = self.max_seq_length  # read once
        pair_idx, single_idx, texts = [], [], []
        for i, x in enumerate(inputs):
            if _is_single(x):
                single_idx.append(i)
                texts.append(x if isinstance(x, str) else x[0])
            elif _is_pair(x):
                pair_idx.append(i)
            else:
                raise TypeError(f"input {i} is neither a text nor a pair of two texts: {x!r:.80}")
        ids: list = [None] * len(inputs)
        truncated: list = [False] * len(inputs)
        for idx, items, encode in ((pair_idx, [inputs[i] for i in pair_idx], self.loaded.tokenize_pairs),
                                   (single_idx, texts, self.loaded.tokenize)):
            if idx:
                got, tr = encode(items, max_length=msl)
                for i, seq, t in zip(idx, got, tr):
                    ids[i], truncated[i] = seq, t
        return ids, truncated

    # --------------------------------------------------------------------------- scores
    def logits(self, inputs: Sequence, batch_size: int | None = None, max_batch_tokens: int | None = None,
               show_progress_bar: bool | None = None) -> torch.Tensor:
        """Raw float32 logits [n, num_labels] on the device for a list of inputs (see `tokenize`),
        in input order. Truncated inputs are reported with a `TruncationWarning`."""
        inputs = list(inputs)
        opts = EncodeOptions(max_batch_tokens=max_batch_tokens, batch_size=batch_size)
        bar, on_batch = progress_bar(len(inputs), show_progress_bar)

        def compute(ids, out, check_finite):
            self.engine.score(ids, max_batch_tokens=opts.max_batch_tokens, batch_size=opts.batch_size,
                              on_batch=on_batch, out=out, check_finite=check_finite)

        try:
            logits, truncated = self.loaded.through_model(
                len(inputs), lambda a, b: self.tokenize(inputs[a:b]), compute, self.num_labels, what="logits")
        finally:
            if bar is not None:
                bar.close()
        if any(truncated):
            rows = [i for i, t in enumerate(truncated) if t]
            shown = f"{rows[:10]}{' ...' if len(rows) > 10 else ''}"
            warnings.warn(f"{len(rows)} of {len(inputs)} input(s) were longer than max_seq_length="
                          f"{self.max_seq_length} tokens and were truncated (longest first): {shown}",
                          TruncationWarning, stacklevel=3)
        return logits

    def predict(self, inputs, batch_size: int | None = None, show_progress_bar: bool | None = None,
                activation_fn: Callable | None = None, apply_softmax: bool = False, convert_to_numpy: bool = True,
                convert_to_tensor: bool = False, max_batch_tokens: int | None = None):
        """Scores of `inputs`: a pair `(a, b)`, a single text (for a single-sequence classifier),
        or a list of them. Returns [n] for one label, [n, num_labels] otherwise (one input: [] or
        [num_labels]); float32 numpy, or a torch tensor on the device with convert_to_tensor, or a
        list of tensors with both conversions off.

        activation_fn: applied to the float32 logits (default: the model's `activation_fn`, the
        folder's or sigmoid for one label, identity for more); apply_softmax: a softmax over the
        labels after it, when num_labels > 1. Inputs are packed under `max_batch_tokens` tokens
        per forward (default by device); `batch_size` caps the sequences in one such batch (in
        sentence-transformers it is the pairs per padded forward: here the token budget decides)."""
        items, single = split_inputs(inputs)
        scores = self.logits(items, batch_size=batch_size, max_batch_tokens=max_batch_tokens,
                             show_progress_bar=show_progress_bar)
        fn = self.activation_fn if activation_fn is None else activation_fn
        if fn is not None:
            scores = fn(scores)
        if self.num_labels == 1:
            scores = scores.squeeze(-1)
        elif apply_softmax:
            scores = torch.softmax(scores, dim=-1)
        if single:
            scores = scores[0]
        if convert_to_tensor:
            return scores
        if convert_to_numpy:
            return scores.float().cpu().numpy()
        return list(scores) if scores.ndim else scores

    def rank(self, query: str, documents: Sequence[str], top_k: int | None = None, return_documents: bool = False,
             batch_size: int | None = None, show_progress_bar: bool | None = None,
             activation_fn: Callable | None = None, max_batch_tokens: int | None = None) -> list[dict]:
        """The documents scored against `query`, best first: `[{"corpus_id", "score", "text"?}]`,
        cut to `top_k`. Refused (ValueError) for a model with num_labels != 1."""
        if self.num_labels != 1:
            raise ValueError(f"rank needs a model with one label; this one has {self.num_labels} "
                             f"({list(self.id2label.values())}): use predict with pairs")
        if not isinstance(query, str):
            raise TypeError(f"query must be a string, got {type(query).__name__}")
        if isinstance(documents, str):
            raise TypeError("documents must be a list of strings, not one string")
        documents = list(documents)
        for i, d in enumerate(documents):
            if not isinstance(d, str):
                raise TypeError(f"document {i} is {'None' if d is None else 'a ' + type(d).__name__}, not a string")
        check_top_k(top_k)
        scores = self.predict([(query, d) for d in documents], batch_size=batch_size,
                              show_progress_bar=show_progress_bar, activation_fn=activation_fn,
                              convert_to_tensor=True, max_batch_tokens=max_batch_tokens).tolist()
        return ranked(scores, documents, top_k, return_documents)

    def __repr__(self) -> str:
        return (f"CrossEncoder({self.loaded.name!r}, num_labels={self.num_labels}, pooling={self.classifier_pooling!r}, "
                f"device={str(self.device)!r}, dtype={self.dtype_name}, max_seq_length={self.max_seq_length})")


__all__ = ["CrossEncoder", "TruncationWarning", "split_inputs"]
