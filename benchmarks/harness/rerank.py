"""Reranking: the workloads, the cross-encoder checkpoint and the engines that score pairs.

A rerank workload is `queries` x `docs_per_query` (query, document) pairs, each one sequence
`[CLS] query [SEP] document [SEP]` whose whole length is log-normal (median `median`, capped at
`cap`, as the mixed corpus): a `PairCorpus`, whose `ids` are those sequences (what the ONNX
runtimes get, in padded batches) and whose `texts()` spell the same pairs for the text engines
through the id tokenizer (`w123` is token 123; its pair template adds `[CLS] a [SEP] b [SEP]`).

Every engine here returns float32 logits [N, num_labels] (the score before the activation), so
that contenders are compared on the raw scores:

- ours: `CrossEncoder.predict(pairs, activation_fn=Identity)`: the text path, tokenisation and
  packing included, as a user runs it;
- sentence-transformers: `CrossEncoder.predict(pairs, batch_size=32)`, its default;
- ONNX Runtime and OpenVINO (`onnx_peers`) on the export of the same checkpoint, whose output is
  transformers' `ModernBertForSequenceClassification` logits, fed token ids in padded batches.

`ScoresRun` is the alternating rounds on scores: before any round, every contender's scores on
the warm-up pairs are checked against the parity contender's (ours fp32): max |diff| of the logits
for fp32, cosine of the centred logits for the others; one that disagrees is not timed (a row that
says by how much). After the rounds, the same comparisons on the whole workload (round 1's scores)
fill the table's columns.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .corpora import Corpus, Vocab, config_dict, st_folder
from .engines import Engine
from .rounds import RoundsRun

# Before timing: scores that differ from the parity contender's by more than this are not timed.
CHECK_FP32_MAX_ABS = 1e-3
CHECK_HALF_MIN_COS = 0.99


# ----------------------------------------------------------------------------- checkpoint
def write_cross_encoder(folder: Path, config_name: str = "base", seed: int = 0, num_labels: int = 1,
                        pooling: str = "mean") -> Path:
    """A random `ModernBertForSequenceClassification` checkpoint in the real layout (the shape of
    gte-reranker-modernbert-base: one label, mean pooling)."""
    from modernbert_embed.weights import classifier_config, write_random_checkpoint

    cfg = classifier_config(config_dict(config_name), num_labels=num_labels, pooling=pooling)
    return write_random_checkpoint(folder, cfg, seed=seed)


# ----------------------------------------------------------------------------- workloads
def _words(body: Sequence[int]) -> str:
    return " ".join(f"w{t}" for t in body)


@dataclass
class PairCorpus(Corpus):
    """Pairs as token sequences (`ids`), with the bodies they were made of."""

    queries: list[list[int]] = field(default_factory=list)  # query bodies (no special tokens)
    docs: list[list[int]] = field(default_factory=list)  # document bodies, one per pair
    query_of: list[int] = field(default_factory=list)  # which query each pair holds

    def texts(self) -> list[tuple[str, str]]:
        """The pairs spelled for the id tokenizer: they tokenise back to exactly `ids`."""
        return [(_words(self.queries[q]), _words(d)) for q, d in zip(self.query_of, self.docs)]

    def head(self, max_tokens: int) -> "PairCorpus":
        """The first whole pairs up to `max_tokens` tokens (at least one): the warm-up."""
        n, total = 0, 0
        for seq in self.ids:
            if n and total + len(seq) > max_tokens:
                break
            n, total = n + 1, total + len(seq)
        return PairCorpus(self.name + "-head", self.ids[:n], self.description, self.queries, self.docs[:n],
                          self.query_of[:n])


def rerank_corpus(vocab: Vocab, queries: int, docs_per_query: int, seed: int = 0, median: int = 120,
                  sigma: float = 0.8, cap: int = 512, query_len: tuple[int, int] = (6, 24),
                  name: str | None = None) -> PairCorpus:
    """`queries` x `docs_per_query` pairs: each query `query_len` body tokens (uniform), each
    pair's whole length log-normal (median `median`, sigma `sigma`), clipped to the query plus
    [CLS] [SEP] [SEP] and one document token at least, `cap` at most."""
    rng = np.random.default_rng(seed)
    qs, docs, query_of, ids = [], [], [], []
    for q in range(queries):
        body = rng.integers(vocab.low, vocab.high, size=int(rng.integers(query_len[0], query_len[1] + 1))).tolist()
        qs.append(body)
        for _ in range(docs_per_query):
            total = int(np.clip(round(float(rng.lognormal(math.log(median), sigma))), len(body) + 4, cap))
            doc = rng.integers(vocab.low, vocab.high, size=total - len(body) - 3).tolist()
            docs.append(doc)
            query_of.append(q)
            ids.append([vocab.cls] + body + [vocab.sep] + doc + [vocab.sep])
    return PairCorpus(name or f"rerank{queries}x{docs_per_query}", ids,
                      f"{queries} quer{'y' if queries == 1 else 'ies'} x {docs_per_query} documents, pair lengths "
                      f"log-normal, median {median}, up to {cap} tokens", qs, docs, query_of)


# ----------------------------------------------------------------------------- engines
def _as_logits(scores: torch.Tensor, n: int) -> torch.Tensor:
    return scores.detach().float().cpu().reshape(n, -1)


class _TextPairs(Engine):
    """The text engines' shared part: the pairs spelled once per corpus, the round trip checked."""

    def __init__(self):
        self.texts: dict[int, list[tuple[str, str]]] = {}

    def token_ids(self, pairs: list[tuple[str, str]]) -> list[list[int]]:
        raise NotImplementedError

    def pairs(self, corpus: PairCorpus) -> list[tuple[str, str]]:
        key = id(corpus)
        if key not in self.texts:
            texts = corpus.texts()
            got = self.token_ids(texts[:8])
            if [list(g) for g in got] != [list(s) for s in corpus.ids[:8]]:
                raise RuntimeError(f"id tokenizer round trip failed for pairs in {type(self).__name__}")
            self.texts[key] = texts
        return self.texts[key]


class OursCrossEncoder(_TextPairs):
    """`CrossEncoder.predict` on the pairs' text (raw logits: activation_fn=Identity)."""

    def __init__(self, text_folder: Path, device, dtype: torch.dtype):
        from modernbert_embed import CrossEncoder

        super().__init__()
        self.model = CrossEncoder.from_pretrained(text_folder, device=device, dtype=dtype)
        self.identity = torch.nn.Identity()
        self.label = f"ours CrossEncoder ({self.model.ops.name}, {self.model.dtype_name})"

    def token_ids(self, pairs):
        return self.model.tokenize(pairs)[0]

    def encode(self, corpus: PairCorpus) -> torch.Tensor:
        pairs = self.pairs(corpus)
        with torch.inference_mode():
            scores = self.model.predict(pairs, activation_fn=self.identity, convert_to_tensor=True)
        return _as_logits(scores, len(pairs))

    def close(self) -> None:
        del self.model


class SentenceTransformersCrossEncoder(_TextPairs):
    """sentence-transformers' `CrossEncoder.predict(pairs, batch_size=32)`, as its users run it."""

    def __init__(self, text_folder: Path, device, dtype: torch.dtype, batch_size: int = 32):
        from sentence_transformers import CrossEncoder

        super().__init__()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.model = CrossEncoder(str(text_folder), device=str(torch.device(device)))
        if dtype != torch.float32:
            self.model.model.to(dtype)
        self.batch_size = batch_size
        self.identity = torch.nn.Identity()
        attn = getattr(getattr(self.model.model, "config", None), "_attn_implementation", "?")
        self.label = f"sentence-transformers CrossEncoder ({attn}, batch {batch_size})"

    def token_ids(self, pairs):
        tok = self.model.tokenizer
        return [tok(a, b)["input_ids"] for a, b in pairs]

    def encode(self, corpus: PairCorpus) -> torch.Tensor:
        pairs = self.pairs(corpus)
        scores = self.model.predict(pairs, batch_size=self.batch_size, activation_fn=self.identity,
                                    convert_to_tensor=True, show_progress_bar=False)
        return _as_logits(scores, len(pairs))

    def close(self) -> None:
        del self.model


def text_folder(checkpoint: Path, work: Path) -> Path:
    """The cross-encoder with the id tokenizer beside it, for the text engines (ours and
    sentence-transformers read the same folder)."""
    return st_folder(checkpoint, work)


# ----------------------------------------------------------------------------- comparing scores
def centred_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine of the two score vectors after subtracting each one's mean (a Pearson correlation):
    an offset shared by every score would make the plain cosine near 1 whatever the ranking."""
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    denom = float(a.norm() * b.norm())
    return float(a @ b) / denom if denom > 0 else (1.0 if torch.equal(a, b) else 0.0)


def score_diffs(scores: torch.Tensor, base: torch.Tensor) -> tuple[float, float]:
    """(max |diff| of the logits, centred cosine) of `scores` against `base`."""
    if scores.shape != base.shape:
        raise RuntimeError(f"scores of shape {list(scores.shape)} vs {list(base.shape)}")
    return float((scores - base).abs().max()), centred_cosine(scores, base)


class ScoresRun(RoundsRun):
    """`RoundsRun` on scores: parity against `parity` (ours fp32), checked before timing."""

    def __init__(self, *args, parity: str = "ours-fp32", **kwargs):
        super().__init__(*args, **kwargs)
        self.parity = parity
        self.checks: dict[str, dict[str, dict[str, Any]]] = {role: {} for role in self.corpora}

    def check_warmup(self, role: str, outputs: dict[str, torch.Tensor]) -> None:
        base = outputs.get(self.parity)
        cells = self.cells[role]
        by_key = {c.key: c for c in self.contenders}
        for key, scores in outputs.items():
            if key == self.parity or base is None:
                continue
            try:
                max_abs, cos = score_diffs(scores, base)
            except RuntimeError as e:
                cells[key].error = f"before timing: {e}"
                continue
            self.checks[role][key] = {"max_abs": max_abs, "centred_cos": cos, "pairs": int(base.shape[0])}
            fp32 = by_key[key].dtype == "fp32"
            if fp32 and not max_abs <= CHECK_FP32_MAX_ABS:
                cells[key].error = (f"before timing: logits differ from {self.parity}'s by up to {max_abs:.3g} "
                                    f"(> {CHECK_FP32_MAX_ABS:g}) on the {base.shape[0]} warm-up pairs: not timed")
            elif not fp32 and not cos >= CHECK_HALF_MIN_COS:
                cells[key].error = (f"before timing: centred cosine {cos:.5f} (< {CHECK_HALF_MIN_COS}) against "
                                    f"{self.parity}'s logits on the {base.shape[0]} warm-up pairs: not timed")
        if base is None:
            self.log(f"  {role}: no {self.parity} scores to check the others against before timing")

    def _compare(self, role: str) -> None:
        """Round 1's scores of each contender against the parity contender's: max |diff| of the
        logits (`max_abs`) and the centred cosine (`min_cos`: one number over the workload)."""
        cells = self.cells[role]
        base = cells.get(self.parity)
        base = base.embeddings if base is not None else None
        for key, cell in cells.items():
            if cell.embeddings is not None and base is not None and key != self.parity:
                cell.max_abs, cell.min_cos = score_diffs(cell.embeddings, base)
        for cell in cells.values():
            cell.embeddings = None


def factories(checkpoint: Path, text_dir: Path, pad: int, threads: int, batch_size: int = 32,
              ) -> dict[str, tuple[str, str, str, Callable[[str], Engine]]]:
    """Every rerank contender: key -> (name, dtype, kind, factory(role))."""
    from . import onnx_peers

    cpu = torch.device("cpu")
    return {
        "ours-fp32": ("ours", "fp32", "ours", lambda role: OursCrossEncoder(text_dir, cpu, torch.float32)),
        "ours-bf16": ("ours", "bf16", "ours", lambda role: OursCrossEncoder(text_dir, cpu, torch.bfloat16)),
        "sentence-transformers-fp32": ("sentence-transformers", "fp32", "reference",
                                       lambda role: SentenceTransformersCrossEncoder(text_dir, cpu, torch.float32,
                                                                                     batch_size)),
        "onnxruntime-fp32": ("onnxruntime", "fp32", "runtime",
                             lambda role: onnx_peers.ort_engine(checkpoint, "fp32", pad, threads, batch_size)),
        "onnxruntime-bf16": ("onnxruntime", "bf16", "runtime",
                             lambda role: onnx_peers.ort_engine(checkpoint, "bf16", pad, threads, batch_size)),
        "openvino-fp32": ("openvino", "fp32", "runtime",
                          lambda role: onnx_peers.openvino_engine(checkpoint, "fp32", pad, threads, batch_size)),
        "openvino-bf16": ("openvino", "bf16", "runtime",
                          lambda role: onnx_peers.openvino_engine(checkpoint, "bf16", pad, threads, batch_size)),
    }


# ----------------------------------------------------------------------------- token-id engines (GPU rows)
class OursScores(Engine):
    """A `CrossEncoder`'s logits on token ids (`engine.score`: packed, unpadded), as the embedding
    rows run `encode_tokens`: the GPU rows time the model, not the tokenizer."""

    def __init__(self, folder: Path, device, dtype: torch.dtype):
        from modernbert_embed import Checkpoint, CrossEncoder

        self.model = CrossEncoder.from_checkpoint(Checkpoint(folder), device=device, dtype=dtype)
        self.label = f"ours CrossEncoder on token ids ({self.model.ops.name if self.model.ops else '?'})"

    def encode(self, corpus: Corpus) -> torch.Tensor:
        with torch.inference_mode():
            return self.model.engine.score(corpus.ids)

    def close(self) -> None:
        del self.model


def load_classifier(folder: Path, dtype: torch.dtype, attn_implementation: str = "sdpa"):
    """transformers' `ModernBertForSequenceClassification` with `dtype=` (or `torch_dtype=`)."""
    import transformers

    cls = transformers.ModernBertForSequenceClassification
    try:
        model = cls.from_pretrained(folder, attn_implementation=attn_implementation, dtype=dtype)
    except TypeError:  # transformers < 4.56
        model = cls.from_pretrained(folder, attn_implementation=attn_implementation, torch_dtype=dtype)
    return model.to(dtype).eval()


class TransformersScores(Engine):
    """`ModernBertForSequenceClassification` on length-sorted padded batches: float32 logits."""

    def __init__(self, folder: Path, device, dtype: torch.dtype, batch_size: int = 32):
        from .engines import padded_batches

        self.device = torch.device(device)
        self.model = load_classifier(folder, dtype).to(self.device)
        self.batches = padded_batches
        self.pad, self.batch_size = self.model.config.pad_token_id, batch_size
        attn = self.model.config._attn_implementation
        self.label = f"transformers ForSequenceClassification ({attn}, batch {batch_size})"

    def encode(self, corpus: Corpus) -> torch.Tensor:
        out = torch.empty(corpus.num_docs, self.model.config.num_labels, dtype=torch.float32, device=self.device)
        with torch.inference_mode():
            for rows, batch, mask in self.batches(corpus.ids, self.batch_size, self.pad):
                batch, mask = torch.from_numpy(batch).to(self.device), torch.from_numpy(mask).to(self.device)
                logits = self.model(input_ids=batch, attention_mask=mask).logits
                out[torch.from_numpy(rows).to(self.device)] = logits.float()
        return out

    def close(self) -> None:
        del self.model
