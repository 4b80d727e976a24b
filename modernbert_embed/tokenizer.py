"""Text -> token ids: the checkpoint's own `tokenizer.json`, prompts, truncation.

The post-processor of ModernBERT's tokenizer adds `[CLS] ... [SEP]` (a pair: `[CLS] a [SEP] b
[SEP]`); truncation keeps them and counts them, so a truncated input is exactly `max_length` tokens
long. A pair is truncated longest first (the longer of the two loses a token at a time), as
transformers' tokenizers do with `truncation=True`.

Thread safety: a Rust tokenizer is never reconfigured once in use (changing its truncation while
another thread is inside `encode_batch` raises "Already borrowed"). `TextTokenizer` keeps one
tokenizer per truncation length, each made on first use from the same JSON and never changed
afterwards, so any number of threads may encode at once with any lengths.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Sequence

# The prefixes modernbert-embed was trained with: lower case, a colon, one space.
PROMPTS = {
    "search_query": "search_query: ",
    "search_document": "search_document: ",
    "classification": "classification: ",
    "clustering": "clustering: ",
}


def check_texts(texts: Sequence) -> list[str]:
    """`texts` as a list, or a TypeError naming the first item that is not a string."""
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            what = "None" if t is None else f"a {type(t).__name__}"
            raise TypeError(f"input {i} is {what}, not a string")
    return texts


def check_pairs(pairs: Sequence) -> list[tuple[str, str]]:
    """`pairs` as a list of (str, str), or a TypeError naming the first item that is not a pair
    of strings."""
    out = []
    for i, p in enumerate(pairs):
        if not isinstance(p, (list, tuple)) or len(p) != 2 or not all(isinstance(t, str) for t in p):
            raise TypeError(f"input {i} is not a pair of two strings: {p!r:.80}")
        out.append((p[0], p[1]))
    return out


class TextTokenizer:
    """A checkpoint's tokenizer. `encode(texts, prompt, max_length)` truncates to `max_length`
    tokens ([CLS] and [SEP] included); `encode_whole` does not truncate and keeps the character
    offsets (for chunking)."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on a corrupt file
            raise ValueError(f"cannot read tokenizer {path}: {e}") from None
        tok.no_padding()
        tok.no_truncation()
        self.path = path
        self._json = tok.to_str()
        self._lock = threading.Lock()
        self._by_length: dict[int | None, object] = {None: tok}
        specials = tok.encode("", add_special_tokens=True).ids
        # (first, last) special token ids a text is wrapped in, when it is one before and one after
        self.specials = tuple(specials) if len(specials) == 2 else None

    def _for_length(self, max_length: int | None):
        """The tokenizer truncating at `max_length` (None: none), made once and never changed."""
        tok = self._by_length.get(max_length)
        if tok is None:
            from tokenizers import Tokenizer

            with self._lock:
                tok = self._by_length.get(max_length)
                if tok is None:
                    tok = Tokenizer.from_str(self._json)
                    tok.no_padding()
                    tok.enable_truncation(max_length=max_length)
                    self._by_length[max_length] = tok
        return tok

    def encode(self, texts: Sequence[str], prompt: str = "", max_length: int | None = None
               ) -> tuple[list[list[int]], list[bool]]:
        """Token ids per text ([CLS] ... [SEP], truncated to `max_length` when given) and whether
        each one was truncated."""
        texts = check_texts(texts)
        if prompt:
            texts = [prompt + t for t in texts]
        tok = self._for_length(max_length)
        # encode_batch_fast (tokenizers >= 0.20) skips the character offsets we never read: the
        # same ids and truncation, about 20% faster
        encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
        encodings = encode(texts, add_special_tokens=True)
        return [e.ids for e in encodings], [len(e.overflowing) > 0 for e in encodings]

    def encode_pairs(self, pairs: Sequence[tuple[str, str]], max_length: int | None = None
                     ) -> tuple[list[list[int]], list[bool]]:
        """Token ids per pair (`[CLS] a [SEP] b [SEP]`, truncated longest first to `max_length`
        when given) and whether each one was truncated."""
        pairs = check_pairs(pairs)
        tok = self._for_length(max_length)
        encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
        encodings = encode(pairs, add_special_tokens=True)
        return [e.ids for e in encodings], [len(e.overflowing) > 0 for e in encodings]

    def encode_prefixed(self, texts: Sequence[str], prefix_id: int | None, max_length: int
                        ) -> tuple[list[list[int]], list[bool]]:
        """PyLate's ColBERT tokenisation: each text stripped of surrounding white space (as
        sentence-transformers' Transformer tokenises), `[CLS] ... [SEP]` truncated to `max_length - 1`
        tokens, then `prefix_id` inserted at position 1, after [CLS] (no prefix: truncated to
        `max_length`). Returns the ids and whether each text was truncated."""
        texts = [t.strip() for t in check_texts(texts)]
        if prefix_id is None:
            ids, truncated = self.encode(texts, "", max_length)
        else:
            ids, truncated = self.encode(texts, "", max_length - 1)
            ids = [s[:1] + [prefix_id] + s[1:] for s in ids]
        return ids, truncated

    def token_id(self, token: str) -> int | None:
        """The id of `token` (a vocabulary entry or an added token such as ColBERT's `[Q] `), or None."""
        return self.untruncated.token_to_id(token)

    @property
    def untruncated(self):
        """The `tokenizers.Tokenizer` that neither truncates nor pads (made at load, never changed)."""
        return self._by_length[None]

    def encode_whole(self, texts: Sequence[str]) -> list:
        """Untruncated encodings without special tokens, with character offsets."""
        return self.untruncated.encode_batch(check_texts(texts), add_special_tokens=False)
