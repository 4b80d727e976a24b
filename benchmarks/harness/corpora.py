"""The corpora of every benchmark and the checkpoint they run on: random token ids of chosen
lengths, spelled as text for sentence-transformers through an "id tokenizer".

Every engine in a table runs on the same random checkpoint (the real layout, a fixed seed) and the
same token ids, so that rows differ only in the engine. sentence-transformers takes text, so the
corpus is spelled as words of an id tokenizer written beside the checkpoint (`w123` is token 123,
wrapped in [CLS] ... [SEP] by its post-processor): the ids it encodes are exactly the corpus ids.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from modernbert_embed.config import ModernBertConfig
from modernbert_embed.weights import small_config

# ----------------------------------------------------------------------------- model shapes
# A small ModernBERT (4.48 schema) for smoke runs: the one the tests use.
SMALL_CONFIG: dict[str, Any] = small_config()


def config_dict(name: str) -> dict[str, Any]:
    """`base` (the full modernbert-embed-base shape) or `small`."""
    if name == "base":
        return ModernBertConfig().to_dict()
    if name == "small":
        return dict(SMALL_CONFIG)
    raise ValueError(f"unknown config {name!r}; choose base or small")


def write_checkpoint(folder: Path, config_name: str = "base", seed: int = 0) -> Path:
    """The random checkpoint every engine of a run loads (written once per run)."""
    from modernbert_embed.weights import write_random_checkpoint

    return write_random_checkpoint(folder, config_dict(config_name), seed=seed)


# ----------------------------------------------------------------------------- token ids
@dataclass(frozen=True)
class Vocab:
    """Which ids a corpus uses: [CLS] body... [SEP], body ids drawn from low..high-1."""

    cls: int
    sep: int
    pad: int
    unk: int
    low: int
    high: int

    @classmethod
    def of(cls, cfg: ModernBertConfig) -> "Vocab":
        specials = {cfg.cls_token_id, cfg.sep_token_id, cfg.pad_token_id}
        if min(specials) > cfg.vocab_size // 2:  # base: specials at the top, body 0..50279
            low, high = 0, min(specials) - 1
        else:  # small: specials at the bottom
            low, high = max(specials) + 1, cfg.vocab_size
        unk = next(i for i in range(cfg.vocab_size) if not low <= i < high and i not in specials)
        return cls(cfg.cls_token_id, cfg.sep_token_id, cfg.pad_token_id, unk, low, high)


@dataclass
class Corpus:
    name: str
    ids: list[list[int]]
    description: str = ""

    @property
    def num_docs(self) -> int:
        return len(self.ids)

    @property
    def lengths(self) -> list[int]:
        return [len(s) for s in self.ids]

    @property
    def num_tokens(self) -> int:
        return sum(self.lengths)

    def flops(self, cfg: ModernBertConfig) -> float:
        """Model FLOPs to encode the whole corpus (unpadded)."""
        per_len: dict[int, float] = {}
        total = 0.0
        for n in self.lengths:
            if n not in per_len:
                per_len[n] = cfg.flops_per_token(n)
            total += n * per_len[n]
        return total

    def head(self, max_tokens: int) -> "Corpus":
        """The first documents up to `max_tokens` tokens (the last one cut short, [SEP] kept):
        a cheap warm-up with the corpus's kind of shapes."""
        out, total = [], 0
        for seq in self.ids:
            room = max_tokens - total
            if room < 3:
                break
            out.append(seq if len(seq) <= room else seq[:room - 1] + seq[-1:])
            total += len(out[-1])
        return Corpus(self.name + "-head", out or [self.ids[0][:2]])

    def summary(self) -> dict[str, Any]:
        lengths = np.array(self.lengths)
        return {
            "name": self.name, "description": self.description, "docs": self.num_docs,
            "tokens": int(lengths.sum()), "min_len": int(lengths.min()), "median_len": float(np.median(lengths)),
            "max_len": int(lengths.max()),
        }


def _docs(lengths: Sequence[int], vocab: Vocab, rng: np.random.Generator) -> list[list[int]]:
    out = []
    for n in lengths:
        body = rng.integers(vocab.low, vocab.high, size=max(int(n) - 2, 0)).tolist()
        out.append([vocab.cls] + body + [vocab.sep])
    return out


def mixed_corpus(vocab: Vocab, tokens: int, seed: int = 0, median: int = 100, sigma: float = 0.8,
                 cap: int = 512, min_len: int = 3, docs: int | None = None) -> Corpus:
    """Log-normal lengths (median `median`, clipped to min_len..cap) until `tokens` are reached,
    or exactly `docs` documents where given."""
    rng = np.random.default_rng(seed)
    lengths: list[int] = []
    total = 0
    while (len(lengths) < docs) if docs is not None else (total < tokens):
        n = int(np.clip(round(float(rng.lognormal(math.log(median), sigma))), min_len, cap))
        lengths.append(n)
        total += n
    return Corpus("mixed", _docs(lengths, vocab, rng),
                  f"log-normal lengths, median {median}, {min_len}..{cap} tokens")


def fixed_corpus(vocab: Vocab, length: int, docs: int, seed: int = 1, name: str | None = None) -> Corpus:
    rng = np.random.default_rng(seed)
    return Corpus(name or f"fixed{length}", _docs([length] * docs, vocab, rng), f"{docs} x {length} tokens")


def long_corpus(vocab: Vocab, length: int, docs: int, seed: int = 2) -> Corpus:
    return fixed_corpus(vocab, length, docs, seed, name="long")


def id_texts(ids: Sequence[Sequence[int]]) -> list[str]:
    """The corpus spelled for the id tokenizer: the body of each sequence, one word per token."""
    return [" ".join(f"w{t}" for t in seq[1:-1]) for seq in ids]


def write_id_tokenizer(folder: Path, cfg: ModernBertConfig, max_length: int | None = None) -> None:
    """tokenizer.json + tokenizer_config.json where the word `w<i>` is token i and the
    post-processor adds [CLS] ... [SEP]: text from `id_texts` tokenises back to the exact ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    v = Vocab.of(cfg)
    vocab = {f"w{i}": i for i in range(v.low, v.high)}
    vocab.update({"[UNK]": v.unk, "[CLS]": v.cls, "[SEP]": v.sep, "[PAD]": v.pad})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", v.cls), ("[SEP]", v.sep)],
    )
    tok.add_special_tokens(["[UNK]", "[CLS]", "[SEP]", "[PAD]"])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "cls_token": "[CLS]", "sep_token": "[SEP]",
        "pad_token": "[PAD]", "unk_token": "[UNK]",
        "model_max_length": max_length or cfg.max_position_embeddings,
    }, indent=2))


def st_folder(checkpoint: Path, target: Path) -> Path:
    """A sentence-transformers folder on the checkpoint's weights with the id tokenizer (kept apart
    from the checkpoint so that our engine never sees the id tokenizer)."""
    target.mkdir(parents=True, exist_ok=True)
    for item in checkpoint.iterdir():
        dest = target / item.name
        if dest.exists() or dest.is_symlink():
            continue
        if item.suffix == ".safetensors":
            dest.symlink_to(item.resolve())
        elif item.is_dir():
            shutil.copytree(item, dest)
        elif item.name not in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(item, dest)
    write_id_tokenizer(target, ModernBertConfig.from_file(checkpoint / "config.json"))
    return target
