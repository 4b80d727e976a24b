"""The public API for late-interaction retrieval (ColBERT): `MultiVectorEncoder`, shaped like
sentence-transformers' `MultiVectorEncoder` and PyLate's `models.ColBERT`, so that code moves over
by changing an import.

A thin front on one loaded model with a per-token head (`loaded.LoadedModel` of a PyLate ColBERT
folder, e.g. lightonai/GTE-ModernColBERT-v1): one vector per token instead of one per text. What
it computes is PyLate's `ColBERT.encode`:

- text in, exactly as PyLate tokenises (`TextTokenizer.encode_prefixed`): the text stripped,
  `[CLS] text [SEP]` truncated to length - 1 tokens, the prefix token (`[Q] ` for queries, `[D] `
  for documents: added tokens of the folder's tokenizer) inserted after [CLS]; queries to
  `query_length` tokens, documents to `document_length`;
- query expansion (`do_query_expansion`): queries padded to `query_length` with [MASK], and every
  position returned. With `attend_to_expansion_tokens` false the [MASK]s are no one's keys (PyLate
  gives them attention_mask 0 on transformers' SDPA path): the real tokens compute what they would
  alone, each [MASK] attends to the real tokens within its window (`Batch.key_lengths`); with it
  true they are ordinary tokens;
- the backbone, then the Dense projection and per-token L2 normalisation (`heads.ProjectionHead`),
  packed unpadded under the token budget like every other head (`Engine.tokens`);
- documents drop the tokens of the skiplist (single punctuation characters by default) from their
  output; queries keep every position.

Scores are MaxSim: for each query token its best document token (dot products of unit vectors),
summed over the query's tokens, no length normalisation (`maxsim`).

Thread safety: as `Embedder`, the encode methods may be called from many threads at once.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .api import progress_bar
from .loaded import FrontEnd, LoadedModel, check_top_k, ranked
from .options import EncodeOptions
from .tokenizer import check_texts
from .weights import MULTIVECTOR, CheckpointError, MultiVectorSpec

# Elements of one [documents, query tokens, document tokens] score block in `maxsim` (float32:
# 64 MB), beyond which the documents are scored in chunks.
MAXSIM_CHUNK_ELEMENTS = 1 << 24


class MultiVectorEncoder(FrontEnd):
    """Per-token embeddings of queries and documents with a ModernBERT ColBERT model, and their
    MaxSim scores.

    `from_pretrained(name_or_path, device=None, dtype=None, revision=None, local_files_only=None)`
    (see `FrontEnd`) loads a PyLate / sentence-transformers multi-vector folder (modules.json:
    Transformer -> Dense); an embedder or a cross-encoder folder is refused, naming the class that
    runs it."""

    KIND = MULTIVECTOR

    def __init__(self, loaded: LoadedModel):
        super().__init__(loaded)
        spec = self.spec
        tok = loaded.text_tokenizer()
        self.query_prefix_id = self._prefix_id(spec.query_prefix)
        self.document_prefix_id = self._prefix_id(spec.document_prefix)
        self.mask_token_id = tok.token_id("[MASK]")
        if spec.do_query_expansion and self.mask_token_id is None:
            raise CheckpointError(f"{self.name}: query expansion pads with [MASK], which this tokenizer does not have")
        # PyLate: `convert_tokens_to_ids` of each word, an unknown one being [UNK]'s id
        unk = tok.token_id("[UNK]")
        ids = [tok.token_id(w) for w in spec.skiplist_words]
        self.skiplist_ids = np.array(sorted({unk if i is None else i for i in ids} - {None}), dtype=np.int64)

    def _prefix_id(self, prefix: str) -> int | None:
        if not prefix:
            return None
        token = self.loaded.text_tokenizer().token_id(prefix)
        if token is None:
            raise CheckpointError(f"{self.name}: the prefix {prefix!r} is not a token of the folder's tokenizer "
                                  "(PyLate saves it as an added token of tokenizer.json)")
        if token >= self.config.vocab_size:
            raise CheckpointError(f"{self.name}: the prefix {prefix!r} has token id {token}, outside the "
                                  f"model's vocabulary of {self.config.vocab_size}")
        return token

    # --------------------------------------------------------------------------- what it is
    @property
    def spec(self) -> MultiVectorSpec:
        """The folder's head and ColBERT fields (prefixes, lengths, expansion, skiplist)."""
        return self.engine.projection.spec

    @property
    def query_length(self) -> int:
        return self.spec.query_length

    @property
    def document_length(self) -> int:
        return self.spec.document_length

    @property
    def do_query_expansion(self) -> bool:
        return self.spec.do_query_expansion

    @property
    def attend_to_expansion_tokens(self) -> bool:
        return self.spec.attend_to_expansion_tokens

    @property
    def truncate_dim(self) -> int | None:
        """The folder's default `truncate_dim` (None: every feature)."""
        return self.spec.truncate_dim

    def get_embedding_dimension(self) -> int:
        """Features per token vector (the projection's output, or the folder's truncate_dim)."""
        return self.spec.truncate_dim or self.spec.out_features

    # --------------------------------------------------------------------------- text in
    def tokenize(self, texts: Sequence[str], is_query: bool = True
                 ) -> tuple[list[list[int]], list[bool], list[np.ndarray] | None, list[int] | None]:
        """PyLate's token ids of `texts` (see the module docstring) and, for the model: whether each
        was truncated, the tokens to return (None: all), and the key lengths (None: every token is
        attended to)."""
        spec = self.spec
        texts = check_texts(texts)
        if is_query:
            ids, truncated = self.loaded.text_tokenizer().encode_prefixed(texts, self.query_prefix_id, spec.query_length)
            keys = None
            if spec.do_query_expansion:  # padded with [MASK] to query_length
                if not spec.attend_to_expansion_tokens:
                    keys = [len(s) for s in ids]
                ids = [s + [self.mask_token_id] * (spec.query_length - len(s)) for s in ids]
            return ids, truncated, None, keys
        ids, truncated = self.loaded.text_tokenizer().encode_prefixed(texts, self.document_prefix_id, spec.document_length)
        keep = None
        if self.skiplist_ids.size:
            keep = [~np.isin(np.asarray(s, dtype=np.int64), self.skiplist_ids) for s in ids]
        return ids, truncated, keep, None

    # --------------------------------------------------------------------------- vectors
    def encode(self, texts, is_query: bool = True, batch_size: int | None = None,
               max_batch_tokens: int | None = None, show_progress_bar: bool | None = None,
               convert_to_numpy: bool = True, convert_to_tensor: bool = False, truncate_dim: int | None = None):
        """One [n_tokens_i, dim] array of L2-normalised token vectors per text (a single text: one
        array), as PyLate's `ColBERT.encode(texts, is_query=...)` returns them: float32 numpy by
        default; with `convert_to_tensor` (or `convert_to_numpy=False`) float32 tensors on the
        device. Queries: `query_length` vectors each with query expansion, else one per token;
        documents: one per token, skiplist tokens left out.

        Texts are packed under `max_batch_tokens` tokens per forward (default by device);
        `batch_size` caps the texts in one such batch. `truncate_dim`: the first `dim` features of
        each vector, normalised again (default: the folder's, else all)."""
        single = isinstance(texts, str)
        items = [texts] if single else list(texts)
        opts = EncodeOptions(max_batch_tokens=max_batch_tokens, batch_size=batch_size)
        dim = self.truncate_dim if truncate_dim is None else truncate_dim
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, (int, np.integer))
                                or not 1 <= dim <= self.spec.out_features):
            raise ValueError(f"truncate_dim must be an int in 1..{self.spec.out_features}, got {dim!r}")
        if not items:
            return []
        ids, _truncated, keep, keys = self.tokenize(items, is_query=is_query)
        bar, on_batch = progress_bar(len(items), show_progress_bar)
        try:
            out, offsets = self.engine.tokens(ids, keep=keep, key_lengths=keys, dim=dim,
                                              max_batch_tokens=opts.max_batch_tokens, batch_size=opts.batch_size,
                                              on_batch=on_batch)
        finally:
            if bar is not None:
                bar.close()
        if convert_to_tensor or not convert_to_numpy:
            result = [out[a:b] for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]
        else:
            result = np.split(out.cpu().numpy(), offsets[1:-1])
        return result[0] if single else result

    def encode_query(self, texts, **kwargs):
        """`encode(texts, is_query=True, ...)`."""
        return self.encode(texts, is_query=True, **kwargs)

    def encode_document(self, texts, **kwargs):
        """`encode(texts, is_query=False, ...)`."""
        return self.encode(texts, is_query=False, **kwargs)

    # --------------------------------------------------------------------------- scores
    def similarity(self, queries, documents) -> torch.Tensor:
        """MaxSim scores [n_queries, n_documents] (float32, see `maxsim`)."""
        return maxsim(queries, documents)

    def similarity_pairwise(self, queries, documents) -> torch.Tensor:
        """MaxSim of each query with the document beside it: [n] (float32)."""
        return maxsim_pairwise(queries, documents)

    def rank(self, query: str, documents: Sequence[str], top_k: int | None = None, return_documents: bool = False,
             batch_size: int | None = None, max_batch_tokens: int | None = None,
             show_progress_bar: bool | None = None) -> list[dict]:
        """The documents scored against `query` by MaxSim, best first:
        `[{"corpus_id", "score", "text"?}]`, cut to `top_k`."""
        if not isinstance(query, str):
            raise TypeError(f"query must be a string, got {type(query).__name__}")
        if isinstance(documents, str):
            raise TypeError("documents must be a list of strings, not one string")
        documents = check_texts(documents)
        check_top_k(top_k)
        kw = dict(batch_size=batch_size, max_batch_tokens=max_batch_tokens, convert_to_tensor=True)
        q = self.encode_query([query], **kw)
        d = self.encode_document(documents, show_progress_bar=show_progress_bar, **kw) if documents else []
        scores = maxsim(q, d)[0].tolist() if documents else []
        return ranked(scores, documents, top_k, return_documents)

    def __repr__(self) -> str:
        s = self.spec
        return (f"MultiVectorEncoder({self.loaded.name!r}, dim={s.out_features}, query_length={s.query_length}, "
                f"document_length={s.document_length}, do_query_expansion={s.do_query_expansion}, "
                f"attend_to_expansion_tokens={s.attend_to_expansion_tokens}, device={str(self.device)!r}, "
                f"dtype={self.dtype_name})")


# ------------------------------------------------------------------------------- MaxSim
def _as_list(x, what: str) -> list[torch.Tensor]:
    """A collection of [n_i, dim] token-vector matrices as float32 tensors: a list of arrays or
    tensors, a padded [n, tokens, dim] array, or one [tokens, dim] matrix (a collection of one)."""
    if isinstance(x, (np.ndarray, torch.Tensor)):
        t = torch.as_tensor(x)
        if t.ndim == 2:
            return [t.float()]
        if t.ndim == 3:
            return [m.float() for m in t]
        raise ValueError(f"{what}: expected [tokens, dim] or [n, tokens, dim], got shape {list(t.shape)}")
    out = []
    for i, m in enumerate(x):
        t = torch.as_tensor(m)
        if t.ndim != 2:
            raise ValueError(f"{what}[{i}]: expected a [tokens, dim] matrix, got shape {list(t.shape)}")
        out.append(t.float())
    return out


def _padded(mats: list[torch.Tensor], device) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, L, dim] zero-padded and the [n, L] mask of real rows."""
    L = max((m.shape[0] for m in mats), default=0)
    dim = mats[0].shape[1]
    out = torch.zeros(len(mats), L, dim, dtype=torch.float32, device=device)
    mask = torch.zeros(len(mats), L, dtype=torch.bool, device=device)
    for i, m in enumerate(mats):
        out[i, :m.shape[0]] = m.to(device)
        mask[i, :m.shape[0]] = True
    return out, mask


def maxsim(queries, documents) -> torch.Tensor:
    """ColBERT's late-interaction score of every query with every document: for each query token
    the largest dot product with a document token, summed over the query's tokens (no length
    normalisation), in float32. [n_queries, n_documents], on the documents' device."""
    qs, ds = _as_list(queries, "queries"), _as_list(documents, "documents")
    device = ds[0].device if ds else (qs[0].device if qs else torch.device("cpu"))
    scores = torch.zeros(len(qs), len(ds), dtype=torch.float32, device=device)
    if not qs or not ds:
        return scores
    if qs[0].shape[1] != ds[0].shape[1]:
        raise ValueError(f"queries have {qs[0].shape[1]} features per token, documents {ds[0].shape[1]}")
    D, dmask = _padded(ds, device)  # [n_d, Ld, dim]
    for qi, q in enumerate(qs):
        q = q.to(device)
        step = max(1, MAXSIM_CHUNK_ELEMENTS // max(1, q.shape[0] * D.shape[1]))
        for a in range(0, len(ds), step):
            sims = torch.einsum("qf,nlf->nql", q, D[a:a + step])  # [n, Lq, Ld]
            sims.masked_fill_(~dmask[a:a + step, None, :], float("-inf"))
            scores[qi, a:a + step] = sims.amax(dim=2).sum(dim=1)
    return scores


def maxsim_pairwise(queries, documents) -> torch.Tensor:
    """MaxSim of queries[i] with documents[i]: [n] float32, on the documents' device."""
    qs, ds = _as_list(queries, "queries"), _as_list(documents, "documents")
    if len(qs) != len(ds):
        raise ValueError(f"{len(qs)} queries and {len(ds)} documents: pairwise scores need as many of each")
    device = ds[0].device if ds else torch.device("cpu")
    return torch.stack([(q.to(device) @ d.T).amax(dim=1).sum() for q, d in zip(qs, ds)]) if qs else \
        torch.zeros(0, dtype=torch.float32, device=device)


__all__ = ["MultiVectorEncoder", "maxsim", "maxsim_pairwise"]
