"""Text -> token ids: the checkpoint's own `tokenizer.json`, prompts, truncation.

The post-processor of ModernBERT's tokenizer adds `[CLS] ... [SEP]`; truncation keeps both and
counts them, so a truncated input is exactly `max_seq_length` tokens long.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

# The prefixes modernbert-embed was trained with: lower case, a colon, one space.
PROMPTS = {
    "search_query": "search_query: ",
    "search_document": "search_document: ",
    "classification": "classification: ",
    "clustering": "clustering: ",
}


def resolve_prompt(prompt: str | None, prompt_name: str | None) -> str:
    if prompt is not None and prompt_name is not None:
        raise ValueError("give either prompt or prompt_name, not both")
    if prompt is not None:
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
        return prompt
    if prompt_name is None:
        return ""
    if prompt_name not in PROMPTS:
        raise ValueError(f"unknown prompt_name {prompt_name!r}; known: {sorted(PROMPTS)}")
    return PROMPTS[prompt_name]


def check_texts(texts: Sequence) -> None:
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            what = "None" if t is None else f"a {type(t).__name__}"
            raise TypeError(f"input {i} is {what}, not a string")


class TextTokenizer:
    def __init__(self, path: str | Path, max_seq_length: int):
        from tokenizers import Tokenizer

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on a corrupt file
            raise ValueError(f"cannot read tokenizer {path}: {e}") from None
        tok.no_padding()
        self.tokenizer = tok
        self.set_max_seq_length(max_seq_length)

    def set_max_seq_length(self, max_seq_length: int) -> None:
        self.tokenizer.enable_truncation(max_length=max_seq_length)
        self.max_seq_length = max_seq_length

    def encode(self, texts: Sequence[str], prompt: str = "") -> tuple[list[list[int]], list[bool]]:
        """Token ids per text ([CLS] ... [SEP], truncated to max_seq_length) and whether each one
        was truncated."""
        check_texts(texts)
        if prompt:
            texts = [prompt + t for t in texts]
        # encode_batch_fast (tokenizers >= 0.20) skips the character offsets we never read: the
        # same ids and truncation, about 20% faster
        encode = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)
        encodings = encode(list(texts), add_special_tokens=True)
        return [e.ids for e in encodings], [len(e.overflowing) > 0 for e in encodings]
