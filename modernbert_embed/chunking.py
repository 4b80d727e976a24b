"""Long documents: overlapping windows that fit `max_seq_length`, one vector per document.

A document is tokenised whole (no truncation), prompt included, without special tokens. The
leading tokens that lie inside the prompt are the *prompt part*; the rest is the *content*. Each
window is `[CLS] + prompt part + content[a:b] + [SEP]`, at most `max_seq_length` tokens, and
consecutive windows share `overlap` content tokens. A document that fits gets exactly one window,
identical to its truncate-mode token ids, so short documents embed the same in both modes. A token
that spans the end of the prompt (its last characters merged with the text's first) counts as
content, so only the first window has it; nomic's prompts end in a space, which the next word
takes, so no token spans theirs.

The document vector is the token-weighted mean of its window vectors (weight = content tokens in
the window), normalised again when the embeddings are normalised:
`v = sum_w n_w * e_w / sum_w n_w`, then `v / ||v||`. A one-window document keeps its window's
vector as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from .engine import NonFiniteError
from .matryoshka import slice_normalize

DEFAULT_MAX_OVERLAP = 128


def default_overlap(budget: int) -> int:
    """The overlap used when none is given: 128 tokens, or a quarter of a window when smaller."""
    return min(DEFAULT_MAX_OVERLAP, budget // 4)


def plan_windows(n: int, budget: int, overlap: int) -> list[tuple[int, int]]:
    """Content-token ranges [start, end) covering 0..n: windows of `budget` tokens advancing by
    `budget - overlap`; the last one ends at n. n <= budget gives the single window (0, n)."""
    if budget < 1:
        raise ValueError(f"a window must hold at least one content token, got {budget}")
    if not 0 <= overlap < budget:
        raise ValueError(f"overlap ({overlap} tokens) must be in 0..{budget - 1}: smaller than the {budget} "
                         "content tokens a window holds")
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
    content_tokens: list[int] = field(default_factory=list)  # content tokens in each window (its weight)
    doc_tokens: list[int] = field(default_factory=list)  # whole document: [CLS] prompt content [SEP]
    doc_windows: list[int] = field(default_factory=list)

    @property
    def num_docs(self) -> int:
        return len(self.doc_tokens)

    @property
    def num_tokens(self) -> int:
        """Tokens the model processes for these windows (overlaps counted in each window)."""
        return sum(len(w) for w in self.ids)


def split_long(tokenizer, texts: Sequence[str], prompt: str, max_seq_length: int,
               overlap: int | None = None) -> Windows:
    """The windows of `texts` for a `TextTokenizer`: each at most `max_seq_length` tokens."""
    if tokenizer.specials is None:
        raise ValueError("chunking needs a tokenizer that adds one token before and one after a text "
                         "([CLS] ... [SEP])")
    if max_seq_length < 3:
        raise ValueError(f"max_seq_length must be at least 3 to chunk, got {max_seq_length}")
    cls_id, sep_id = tokenizer.specials
    encodings = tokenizer.encode_whole([prompt + t for t in texts])
    out = Windows()
    n_prompt = len(prompt)
    for d, enc in enumerate(encodings):
        ids, offsets = enc.ids, enc.offsets
        k = 0  # tokens inside the prompt (a token ending past it belongs to the content)
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
            out.ids.append([cls_id, *head, *content[a:b], sep_id])
            out.owner.append(d)
            out.content_tokens.append(b - a)
        out.doc_tokens.append(len(ids) + 2)
        out.doc_windows.append(len(spans))
    return out


def combine(window_embeddings, owner: Sequence[int], content_tokens: Sequence[int], num_docs: int,
            normalize: bool = True):
    """Token-weighted mean of window embeddings per document, then L2-normalised (when
    `normalize`). torch in, torch out (same device); numpy in, numpy out. A document with one
    window keeps that window's vector unchanged."""
    is_numpy = not isinstance(window_embeddings, torch.Tensor)
    emb = torch.as_tensor(np.asarray(window_embeddings)) if is_numpy else window_embeddings
    emb = emb.float()
    dev = emb.device
    if num_docs == 0 and emb.shape[0] == 0:
        return emb.cpu().numpy() if is_numpy else emb
    owner_t = torch.as_tensor(list(owner), dtype=torch.long, device=dev)
    if owner_t.numel() != emb.shape[0] or len(content_tokens) != emb.shape[0]:
        raise ValueError(f"{emb.shape[0]} window embeddings but {owner_t.numel()} owners and "
                         f"{len(content_tokens)} weights")
    counts = torch.bincount(owner_t, minlength=num_docs)
    if counts.numel() > num_docs or (counts == 0).any():
        raise ValueError("every document needs at least one window, and owners must be < num_docs")
    w = torch.as_tensor(list(content_tokens), dtype=torch.float32, device=dev)
    # A window of no content tokens (an empty document) still counts, with weight 1.
    w = torch.where(w > 0, w, torch.ones_like(w))
    sums = torch.zeros(num_docs, emb.shape[1], dtype=torch.float32, device=dev)
    sums.index_add_(0, owner_t, emb * w[:, None])
    total = torch.zeros(num_docs, dtype=torch.float32, device=dev).index_add_(0, owner_t, w)
    out = sums / total[:, None]
    if normalize:
        out = slice_normalize(out)
    single = counts == 1
    if single.any():  # keep one-window documents bit for bit
        first = torch.full((num_docs,), -1, dtype=torch.long, device=dev)
        first.scatter_(0, owner_t.flip(0), torch.arange(len(owner_t) - 1, -1, -1, device=dev))
        out[single] = emb[first[single]]
    return out.cpu().numpy() if is_numpy else out


def embed_windows(engine, windows: Windows, *, dim: int, normalize: bool = True,
                  max_batch_tokens: int | None = None, batch_size: int | None = None,
                  on_batch=None) -> torch.Tensor:
    """Embed every window with `engine` and combine per document: float32 [docs, dim] on the
    engine's device. Non-finite windows raise `NonFiniteError` naming their documents."""
    try:
        emb = engine.embed(windows.ids, dim=dim, normalize=normalize, max_batch_tokens=max_batch_tokens,
                           batch_size=batch_size, on_batch=on_batch)
    except NonFiniteError as e:
        raise NonFiniteError(sorted({windows.owner[r] for r in e.rows}), engine.dtype_name) from None
    return combine(emb, windows.owner, windows.content_tokens, windows.num_docs, normalize)
