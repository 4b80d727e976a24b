"""Long documents: overlapping windows that fit `max_seq_length`, one vector per document.

A document is tokenised whole (no truncation), prompt included, without special tokens. The
leading tokens that lie inside the prompt are the *prompt part*; the rest is the *content*. Each
window is `[CLS] + prompt part + content[a:b] + [SEP]`, at most `max_seq_length` tokens, and
consecutive windows share `overlap` content tokens. A document that fits gets exactly one window,
identical to its truncate-mode token ids, so short documents embed the same in both modes.

The document vector is the token-weighted mean of its window vectors (weight = content tokens in
the window), normalised again when the embeddings are normalised:
`v = sum_w n_w * e_w / sum_w n_w`, then `v / ||v||`. A one-window document keeps its window's
vector as it is.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

LONG_MODES = ("truncate", "chunk")
DEFAULT_MAX_OVERLAP = 128


def check_long(long) -> str:
    if long not in LONG_MODES:
        raise ValueError(f"long {long!r} is not supported; choose one of {LONG_MODES}")
    return long


def default_overlap(budget: int) -> int:
    """The overlap used when none is given: 128 tokens, or a quarter of a window when smaller."""
    return min(DEFAULT_MAX_OVERLAP, budget // 4)


def check_overlap(overlap, budget: int | None = None) -> None:
    if overlap is None:
        return
    if isinstance(overlap, bool) or not isinstance(overlap, (int, np.integer)):
        raise TypeError(f"overlap must be an int (tokens), got {type(overlap).__name__}")
    if overlap < 0:
        raise ValueError(f"overlap must be >= 0 tokens, got {overlap}")
    if budget is not None and overlap >= budget:
        raise ValueError(f"overlap ({overlap} tokens) must be smaller than the {budget} content tokens "
                         "a window holds")


def plan_windows(n: int, budget: int, overlap: int) -> list[tuple[int, int]]:
    """Content-token ranges [start, end) covering 0..n: windows of `budget` tokens advancing by
    `budget - overlap`; the last one ends at n. n <= budget gives the single window (0, n)."""
    if budget < 1:
        raise ValueError(f"a window must hold at least one content token, got {budget}")
    check_overlap(overlap, budget)
    if n <= budget:
        return [(0, n)]
    stride = budget - overlap
    out = []
    start = 0
    while True:
        end = min(start + budget, n)
        out.append((start, end))
        if end >= n:
            return out
        start += stride


@dataclass
class Windows:
    """The windows of a list of documents, flattened: window j belongs to document owner[j]."""

    ids: list[list[int]] = field(default_factory=list)  # [CLS] prompt part content[a:b] [SEP]
    owner: list[int] = field(default_factory=list)
    weights: list[int] = field(default_factory=list)  # content tokens in each window
    doc_tokens: list[int] = field(default_factory=list)  # whole document: [CLS] prompt content [SEP]
    doc_windows: list[int] = field(default_factory=list)

    @property
    def num_docs(self) -> int:
        return len(self.doc_tokens)

    @property
    def num_tokens(self) -> int:
        """Tokens the model processes for these windows (overlaps counted in each window)."""
        return sum(len(w) for w in self.ids)


class WindowTokenizer:
    """Splits texts into windows with a checkpoint's tokenizer (a non-truncating copy of it)."""

    def __init__(self, tokenizer):
        from tokenizers import Tokenizer

        raw = tokenizer.tokenizer if hasattr(tokenizer, "tokenizer") else tokenizer
        tok = Tokenizer.from_str(raw.to_str())
        tok.no_truncation()
        tok.no_padding()
        specials = tok.encode("", add_special_tokens=True).ids
        if len(specials) != 2:
            raise ValueError("chunking needs a tokenizer that adds one token before and one after a "
                             f"text ([CLS] ... [SEP]); this one adds {specials}")
        self.tokenizer = tok
        self.cls_id, self.sep_id = specials

    def split(self, texts: Sequence[str], prompt: str, max_seq_length: int, overlap: int | None = None) -> Windows:
        check_overlap(overlap)
        encodings = self.tokenizer.encode_batch([prompt + t for t in texts], add_special_tokens=False)
        out = Windows()
        n_prompt = len(prompt)
        for d, enc in enumerate(encodings):
            ids, offsets = enc.ids, enc.offsets
            k = 0
            while k < len(ids) and offsets[k][1] <= n_prompt and n_prompt:
                k += 1
            head, content = ids[:k], ids[k:]
            budget = max_seq_length - 2 - k
            if budget < 1:
                raise ValueError(f"the prompt takes {k} tokens, leaving no room for text in a window of "
                                 f"{max_seq_length} tokens")
            lap = default_overlap(budget) if overlap is None else overlap
            spans = plan_windows(len(content), budget, lap)
            for a, b in spans:
                out.ids.append([self.cls_id, *head, *content[a:b], self.sep_id])
                out.owner.append(d)
                out.weights.append(b - a)
            out.doc_tokens.append(len(ids) + 2)
            out.doc_windows.append(len(spans))
        return out


_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def window_tokenizer(text_tokenizer) -> WindowTokenizer:
    """The (cached) WindowTokenizer of an Embedder's TextTokenizer."""
    wt = _CACHE.get(text_tokenizer)
    if wt is None:
        wt = WindowTokenizer(text_tokenizer)
        _CACHE[text_tokenizer] = wt
    return wt


def combine(window_embeddings, owner: Sequence[int], weights: Sequence[int], num_docs: int,
            normalize: bool = True):
    """Token-weighted mean of window embeddings per document, then L2-normalised (when
    `normalize`). torch in, torch out (same device); numpy in, numpy out. A document with one
    window keeps that window's vector unchanged."""
    is_numpy = not isinstance(window_embeddings, torch.Tensor)
    emb = torch.as_tensor(np.asarray(window_embeddings)) if is_numpy else window_embeddings
    emb = emb.float()
    dev = emb.device
    owner_t = torch.as_tensor(list(owner), dtype=torch.long, device=dev)
    if owner_t.numel() != emb.shape[0] or len(weights) != emb.shape[0]:
        raise ValueError(f"{emb.shape[0]} window embeddings but {owner_t.numel()} owners and "
                         f"{len(weights)} weights")
    counts = torch.bincount(owner_t, minlength=num_docs)
    if counts.numel() > num_docs or (counts == 0).any():
        raise ValueError("every document needs at least one window, and owners must be < num_docs")
    w = torch.as_tensor(list(weights), dtype=torch.float32, device=dev)
    # A window of no content tokens (an empty document) still counts, with weight 1.
    w = torch.where(w > 0, w, torch.ones_like(w))
    sums = torch.zeros(num_docs, emb.shape[1], dtype=torch.float32, device=dev)
    sums.index_add_(0, owner_t, emb * w[:, None])
    total = torch.zeros(num_docs, dtype=torch.float32, device=dev).index_add_(0, owner_t, w)
    out = sums / total[:, None]
    if normalize:
        out = out / out.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    single = counts == 1
    if single.any():  # keep one-window documents bit for bit
        first = torch.full((num_docs,), -1, dtype=torch.long, device=dev)
        first.scatter_(0, owner_t.flip(0), torch.arange(len(owner_t) - 1, -1, -1, device=dev))
        out[single] = emb[first[single]]
    return out.cpu().numpy() if is_numpy else out


def embed_long(embedder, texts: Sequence[str], prompt: str = "", overlap: int | None = None,
               truncate_dim: int | None = None, normalize: bool = True, batch_size: int | None = None,
               max_batch_tokens: int | None = None, show_progress_bar: bool | None = None):
    """Chunk-mode embeddings: float32 tensor [len(texts), dim] on the model's device, and the
    `Windows` (token counts per document and window)."""
    if embedder.tokenizer is None:
        raise RuntimeError("this checkpoint has no tokenizer.json: chunking needs text input")
    windows = split_long(embedder, texts, prompt, overlap)
    return embed_windows(embedder, windows, truncate_dim, normalize, batch_size, max_batch_tokens,
                         show_progress_bar), windows


def split_long(embedder, texts: Sequence[str], prompt: str = "", overlap: int | None = None) -> Windows:
    """The windows of `texts` for an Embedder (its tokenizer and current max_seq_length)."""
    if embedder.tokenizer is None:
        raise RuntimeError("this checkpoint has no tokenizer.json: chunking needs text input")
    msl, limit = embedder.max_seq_length, embedder.config.max_position_embeddings
    if not 3 <= msl <= limit:
        raise ValueError(f"max_seq_length must be in 3..{limit} to chunk, got {msl}")
    return window_tokenizer(embedder.tokenizer).split(texts, prompt, msl, overlap)


def embed_windows(embedder, windows: Windows, truncate_dim: int | None = None, normalize: bool = True,
                  batch_size: int | None = None, max_batch_tokens: int | None = None,
                  show_progress_bar: bool | None = None):
    """Embed every window and combine per document: float32 tensor [docs, dim] on the device."""
    if not windows.ids:
        dim = truncate_dim or embedder.config.hidden_size
        return torch.empty(0, dim, dtype=torch.float32, device=embedder.device)
    if max_batch_tokens is None:
        from .api import DEFAULT_MAX_BATCH_TOKENS as max_batch_tokens
    emb = embedder._embed(windows.ids, truncate_dim, normalize, batch_size, max_batch_tokens,
                          "float32", True, show_progress_bar)
    return combine(emb, windows.owner, windows.weights, windows.num_docs, normalize)
