"""Text -> token ids: the checkpoint's own `tokenizer.json`, prompts, truncation.

The post-processor of ModernBERT's tokenizer adds `[CLS] ... [SEP]` (a pair: `[CLS] a [SEP] b
[SEP]`); truncation keeps them and counts them, so a truncated input is exactly `max_length` tokens
long. A pair is truncated longest first (the longer of the two loses a token at a time), as
transformers' tokenizers do with `truncation=True`.

Thread safety: a Rust tokenizer is never reconfigured once in use (changing its truncation while
another thread is inside `encode_batch` raises "Already borrowed"). `TextTokenizer` keeps one
tokenizer per truncation length, each made on first use from the same JSON and never changed
afterwards, so any number of threads may encode at once with any lengths.

The cut before tokenising: a text is tokenised in full before it is truncated, so a megabyte string
would cost a megabyte of tokens (hundreds of MB, seconds) to keep `max_length` of them. With a
truncation length, `encode` first cuts each (prompted) text to a prefix whose tokens, truncated,
are exactly those of the whole text (`cut`):

1. a short cut, `max_length x 16 + 64` characters: taken when its first `max_length` tokens lie in
   pre-tokens (the byte-level "words": a run of letters, of digits, of punctuation, of spaces) that
   end before the one 32 to 64 characters from the cut. The pre-tokens of a prefix are those of
   the whole text except near its end (the split looks one character ahead; an added token is at
   most 24 characters; NFC composes a character with the marks that follow it), so the tokens kept
   are the same;
2. else the sure cut, `max_length x T + 64` characters, where T is the longest vocabulary entry (512
   for ModernBERT's tokenizer, a run of spaces): a byte-level token covers at most as many
   characters as its entry has bytes, so the prefix holds more than `max_length` tokens.

The exceptions, where the tokens kept may differ from the whole text's: a single pre-token that
holds kept tokens and runs across the sure cut (a "word" of more than `max_length x T` characters
without a space or punctuation; its first part is tokenised as cut), and a run of more than 32
combining marks across the short cut's edge (NFC may reorder it). Tested on ordinary text, runs
of spaces, emoji, marks, digits, added tokens and long words (tests/test_server_limits.py).

Only byte-level BPE tokenizers are cut (each byte is in the vocabulary); any other is tokenised whole.
"""

from __future__ import annotations

import json
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


# The short cut's characters per token (most text is 3-6), and the characters kept back from the
# end of a cut prefix, where its pre-tokens may differ from the whole text's.
CUT_CHARS_PER_TOKEN = 16
CUT_MARGIN = 64


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


def _longest_first(n1: int, n2: int, target: int) -> tuple[int, int]:
    """How many tokens of each side a pair keeps within `target` (its specials not counted), as
    tokenizers' longest-first truncation decides: the shorter side whole when the longer one can
    take the rest, else half each, the odd token to the longer side (the second on a tie)."""
    if n1 + n2 <= target:
        return n1, n2
    short = min(n1, n2)
    keep_long = short if short > target else max(short, target - short)
    keep_short = short
    if keep_short + keep_long > target:
        keep_short = target // 2
        keep_long = keep_short + target % 2
    return (keep_long, keep_short) if n1 > n2 else (keep_short, keep_long)


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
        self._added = tok.num_special_tokens_to_add(False)  # [CLS] and [SEP]
        # the most characters one token can cover: the longest vocabulary entry (byte-level BPE
        # spells one byte per symbol, and a character is at least one byte); None: not cut
        spec = json.loads(self._json)
        byte_level = spec.get("model", {}).get("type") == "BPE" and "ByteLevel" in json.dumps(spec.get("pre_tokenizer"))
        self.max_token_chars = max(map(len, tok.get_vocab(with_added_tokens=True))) if byte_level else None

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

    def cut_bound(self, max_length: int) -> int | None:
        """The sure cut: characters that always hold more than `max_length` tokens (None: no cut)."""
        return None if self.max_token_chars is None else max_length * self.max_token_chars + CUT_MARGIN

    def cut(self, text: str, max_length: int, special_tokens: bool = True) -> str:
        """The prefix of `text` to tokenise when only its first `max_length` tokens (counting
        [CLS] and [SEP] when `special_tokens`) are kept: the text itself when short (see the
        module's text for why the tokens kept are the same)."""
        sure = self.cut_bound(max_length)
        short = max_length * CUT_CHARS_PER_TOKEN + CUT_MARGIN
        if sure is None or len(text) <= short:
            return text
        keep = max_length - (self._added if special_tokens else 0)
        first = text[:short]
        enc = self.untruncated.encode(first, add_special_tokens=False)
        if keep < 1 or len(enc.ids) > keep:
            last_kept = enc.word_ids[keep - 1] if keep >= 1 else -1
            # the pre-token at CUT_MARGIN characters from the cut (the first character after it
            # that has one: a combining mark composed by NFC has none)
            edge = next((w for w in map(enc.char_to_word, range(short - CUT_MARGIN, short - CUT_MARGIN // 2))
                         if w is not None), None)
            if last_kept is not None and edge is not None and last_kept < edge:
                return first
        return text[:sure]

    def encode(self, texts: Sequence[str], prompt: str = "", max_length: int | None = None
               ) -> tuple[list[list[int]], list[bool]]:
        """Token ids per text ([CLS] ... [SEP], truncated to `max_length` when given) and whether
        each one was truncated. With `max_length`, a long text is cut before it is tokenised
        (`cut`), with the same tokens."""
        texts = check_texts(texts)
        if prompt:
            texts = [prompt + t for t in texts]
        if max_length is not None:
            texts = [self.cut(t, max_length) for t in texts]
        tok = self._for_length(max_length)
        # encode_batch_fast (tokenizers >= 0.20) skips the character offsets we never read: the
        # same ids and truncation, about 20% faster
        encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
        encodings = encode(texts, add_special_tokens=True)
        return [e.ids for e in encodings], [len(e.overflowing) > 0 for e in encodings]

    def encode_pairs(self, pairs: Sequence[tuple[str, str]], max_length: int | None = None
                     ) -> tuple[list[list[int]], list[bool]]:
        """Token ids per pair (`[CLS] a [SEP] b [SEP]`, truncated longest first to `max_length`
        when given) and whether each one was truncated.

        The tokens are those of the tokenizer's own pair encoding with longest-first truncation
        (tokenizers' `TruncationStrategy::LongestFirst`, as sentence-transformers' CrossEncoder
        truncates), computed here from each side's tokens: the library's own pair truncation also
        builds every combination of the two sides' overflowing pieces, which grows with the product
        of their lengths (gigabytes for a long document). Each side is cut before it is tokenised
        (`cut`: neither side keeps more than its first `max_length` tokens); where both sides were
        cut, their whole lengths are counted, since which one is longer decides which side keeps the
        odd token."""
        pairs = check_pairs(pairs)
        tok = self.untruncated
        encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
        prefix, middle, suffix = self._pair_template()
        if max_length is None:
            sides = encode([t for p in pairs for t in p], add_special_tokens=False)
            return [prefix + a.ids + middle + b.ids + suffix for a, b in zip(sides[::2], sides[1::2])], \
                [False] * len(pairs)
        cut = [(self.cut(a, max_length), self.cut(b, max_length)) for a, b in pairs]
        sides = encode([t for p in cut for t in p], add_special_tokens=False)
        target = max(max_length - len(prefix) - len(middle) - len(suffix), 0)
        ids, truncated = [], []
        for (a, b), (ca, cb), ea, eb in zip(pairs, cut, sides[::2], sides[1::2]):
            na, nb = len(ea.ids), len(eb.ids)
            if ca is not a and cb is not b:  # both cut: which is longer decides the odd token
                na, nb = (len(e.ids) for e in tok.encode_batch([a, b], add_special_tokens=False))
            ka, kb = _longest_first(na, nb, target)
            ids.append(prefix + ea.ids[:ka] + middle + eb.ids[:kb] + suffix)
            truncated.append(ka < na or kb < nb)
        return ids, truncated

    def _pair_template(self) -> tuple[list[int], list[int], list[int]]:
        """The special tokens a pair is wrapped in, before, between and after its two sides, read
        from the tokenizer's post-processor (ModernBERT: [CLS] | [SEP] | [SEP])."""
        if not hasattr(self, "_pair_specials"):
            enc = self.untruncated.encode("a", "b", add_special_tokens=True)
            seq = enc.sequence_ids
            first, second = seq.index(0), seq.index(1)
            self._pair_specials = (enc.ids[:first], [i for i, s in zip(enc.ids[first:second], seq[first:second])
                                                     if s is None],
                                   [i for i, s in zip(enc.ids[second:], seq[second:]) if s is None])
        return self._pair_specials

    def encode_offsets(self, texts: Sequence[str], max_length: int, add_special_tokens: bool = True) -> list:
        """Encodings with character offsets, truncated to `max_length` tokens (cut first, as in
        `encode`): what `/tokenize` shows."""
        texts = [self.cut(t, max_length, add_special_tokens) for t in check_texts(texts)]
        return self._for_length(max_length).encode_batch(texts, add_special_tokens=add_special_tokens)

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
