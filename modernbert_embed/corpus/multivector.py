"""What a multi-vector (ColBERT) model writes per shard: every document's token vectors in one
flat array, and the offsets that cut it into documents.

```
OUT/shard-00000.tokens.npy    [total_tokens, dim] token vectors (float16 by default, float32 on request)
OUT/shard-00000.offsets.npy   int64 [n + 1]: document i is tokens[offsets[i]:offsets[i + 1]]
```

The vectors are `MultiVectorEncoder.encode_document`'s (or, with `--multivector-mode query`,
`encode_query`'s): the text tokenised as PyLate does (the prefix token after [CLS], truncated to
the folder's document_length / query_length), the projection, per-token L2 normalisation, and for
documents the skiplist's tokens left out. float16 holds them to its rounding (unit vectors: no
overflow); float32 is exactly what the encoder returns. This flat layout is what ColBERT indexes
(PLAID, fast-plaid, Voyager) are built from; `output.CorpusOutput.document` reads one document's
vectors from a memory-mapped shard.

Query mode exists for precomputing the vectors of a fixed query set (an evaluation's queries,
scored against an index later): with query expansion every query has query_length vectors.
"""

from __future__ import annotations

import numpy as np

from ..multivector import MultiVectorEncoder
from .errors import RefusedError

MODES = ("document", "query")
PRECISIONS = ("float16", "float32")
DEFAULT_PRECISION = "float16"
OFFSETS_DTYPE = "int64"


class TokenVectors:
    """How a multi-vector model's texts become a shard's token vectors. `model`: the
    `LoadedModel` (kind MULTIVECTOR); `mode`: one of MODES; `precision`: one of PRECISIONS;
    `truncate_dim`: the first features of each vector, normalised again (None: the folder's
    truncate_dim, else all)."""

    def __init__(self, model, mode: str, precision: str, truncate_dim: int | None):
        if mode not in MODES:
            raise RefusedError(f"--multivector-mode must be one of {MODES}, got {mode!r}")
        if precision not in PRECISIONS:
            raise RefusedError(f"--precision {precision} is not for multi-vector output: {model.name} is a "
                               f"multi-vector (ColBERT) model, whose token vectors are written as "
                               f"{' or '.join(PRECISIONS)} (default {DEFAULT_PRECISION})")
        self.encoder = MultiVectorEncoder(model)
        spec = self.encoder.spec
        dim = spec.truncate_dim if truncate_dim is None else truncate_dim
        if dim is not None and not 1 <= dim <= spec.out_features:
            raise RefusedError(f"--truncate-dim must be in 1..{spec.out_features} (the width of {model.name}'s "
                               f"token vectors), got {dim}")
        self.mode, self.precision = mode, precision
        self.is_query = mode == "query"
        self.truncate_dim = dim
        self.dim = spec.out_features if dim is None else int(dim)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.precision)

    def settings(self) -> dict:
        """The folder's ColBERT settings that decide the vectors (the model record's `colbert`)."""
        s = self.encoder.spec
        return {"out_features": s.out_features, "query_prefix": s.query_prefix,
                "document_prefix": s.document_prefix, "query_length": s.query_length,
                "document_length": s.document_length, "do_query_expansion": s.do_query_expansion,
                "attend_to_expansion_tokens": s.attend_to_expansion_tokens,
                "skiplist": list(s.skiplist_words), "truncate_dim": s.truncate_dim}

    def record(self) -> dict:
        """What the manifest records of the shards' arrays (`vectors`)."""
        s = self.encoder.spec
        prefix = s.query_prefix if self.is_query else s.document_prefix
        return {"mode": self.mode, "precision": self.precision, "dtype": self.precision, "dim": self.dim,
                "normalized": True, "prefix": prefix,
                "length": s.query_length if self.is_query else s.document_length,
                "skiplist": [] if self.is_query else list(s.skiplist_words),
                "query_expansion": self.is_query and s.do_query_expansion,
                "offsets": {"dtype": OFFSETS_DTYPE, "rule": "document i is tokens[offsets[i]:offsets[i + 1]]"}}

    def tokenize(self, texts: list[str]):
        """(ids, truncated, keep, key_lengths) as `MultiVectorEncoder.tokenize` gives them."""
        return self.encoder.tokenize(texts, is_query=self.is_query)

    def empty(self) -> tuple[np.ndarray, np.ndarray]:
        return np.empty((0, self.dim), dtype=self.dtype), np.zeros(1, dtype=np.int64)


def drop_documents(vectors: np.ndarray, offsets: np.ndarray, bad: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """`vectors`/`offsets` less the documents `bad` (positions)."""
    gone = set(bad)
    keep = [d for d in range(len(offsets) - 1) if d not in gone]
    counts = np.diff(offsets)[keep]
    rows = np.concatenate([np.arange(offsets[d], offsets[d + 1]) for d in keep]) if keep else np.empty(0, np.int64)
    new = np.zeros(len(keep) + 1, dtype=np.int64)
    np.cumsum(counts, out=new[1:])
    return vectors[rows.astype(np.int64)], new


__all__ = ["TokenVectors", "drop_documents", "MODES", "PRECISIONS", "DEFAULT_PRECISION", "OFFSETS_DTYPE"]
