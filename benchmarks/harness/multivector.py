"""The late-interaction (ColBERT) benchmark's pieces: the random ColBERT folder, its text workloads,
the engines compared (ours, sentence-transformers 6's `MultiVectorEncoder` in this process, PyLate's
`ColBERT.encode` in a worker process of its own virtual environment) and the per-token comparison.

Every engine here has `encode(corpus)` -> one [n_tokens_i, dim] float32 matrix per text (the
PyLate worker: None, its vectors stay in its process; `vectors(corpus)` brings them over for the
parity check), and a self-timed engine sets `seconds` to its own measurement of the last call.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .corpora import Corpus, Vocab, mixed_corpus
from .engines import Engine
from .measure import ROOT
from .rounds import CannotRun

TOKENIZER_JSON = ROOT / "tests" / "data" / "modernbert-embed-base" / "tokenizer.json"
PYLATE_PYTHON = Path(os.environ.get("MODERNBERT_EMBED_PYLATE_PYTHON", ROOT / ".venv-pylate" / "bin" / "python"))
WORKER = Path(__file__).resolve().parent / "pylate_worker.py"
# ModernBERT's tokenizer with PyLate's [Q] / [D] added: 50368 / 50369
SPECIALS = dict(vocab_size=50370, pad_token_id=50283, cls_token_id=50281, sep_token_id=50282, bos_token_id=50281,
                eos_token_id=50282)


def colbert_config(name: str) -> dict[str, Any]:
    """`base`: GTE-ModernColBERT-v1's backbone (modernbert-embed-base: hidden 768, 12 heads, 22
    layers); `small`: hidden 128, 2 heads, 4 layers (the tests' smoke runs). Both with ModernBERT's
    vocabulary plus the two prefix tokens."""
    from modernbert_embed.config import ModernBertConfig
    from modernbert_embed.weights import small_config

    if name == "base":
        return {**ModernBertConfig().to_dict(), **SPECIALS}
    if name == "small":
        return small_config(**SPECIALS)
    raise ValueError(f"unknown config {name!r}; choose base or small")


def write_colbert_checkpoint(folder: Path, config_name: str = "base", seed: int = 0,
                             tokenizer_json: Path = TOKENIZER_JSON, dense_dim: int = 128) -> Path:
    """A random PyLate ColBERT folder in GTE-ModernColBERT-v1's layout: `1_Dense` hidden -> 128,
    query_length 32 with [MASK] expansion not attended to, document_length 300, the default
    skiplist."""
    from modernbert_embed.weights import colbert_st_config, write_random_checkpoint

    if not Path(tokenizer_json).is_file():
        raise FileNotFoundError(f"ModernBERT's tokenizer.json is needed for the ColBERT folder: {tokenizer_json}")
    return write_random_checkpoint(folder, colbert_config(config_name), seed=seed, tokenizer_json=tokenizer_json,
                                   colbert=colbert_st_config(do_query_expansion=True,
                                                             attend_to_expansion_tokens=False),
                                   dense_dim=dense_dim)


# ----------------------------------------------------------------------------- text workloads
@dataclass
class TextCorpus(Corpus):
    """A workload of texts; `ids` are the token ids our encoder runs for them (prefix, truncation
    and query expansion included: the tokens every contender computes), for the rates and FLOPs."""

    texts: list[str] = field(default_factory=list)
    is_query: bool = False
    workload: str = ""  # the name the PyLate worker knows it by

    def head(self, max_tokens: int) -> "TextCorpus":
        """The first texts up to `max_tokens` tokens (at least one), whole."""
        n, total = 0, 0
        while n < len(self.ids) and (n == 0 or total + len(self.ids[n]) <= max_tokens):
            total += len(self.ids[n])
            n += 1
        return TextCorpus(self.name + "-head", self.ids[:n], self.description, self.texts[:n], self.is_query,
                          self.workload)


def word_list(tokenizer_json: Path = TOKENIZER_JSON) -> list[str]:
    """Lower-case words that are one token both alone and after a space (`w` and `Ġw`), so that a
    text of k such words is k tokens."""
    vocab = json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))["model"]["vocab"]
    return sorted(w[1:] for w in vocab if w.startswith("Ġ") and w[1:].isascii() and w[1:].isalpha()
                  and w[1:].islower() and len(w) >= 4 and w[1:] in vocab)


def texts_of(lengths: Sequence[int], words: Sequence[str], rng: np.random.Generator) -> list[str]:
    """One text of about n tokens per length: random words, some followed by a comma or a period
    (single-character tokens of the skiplist, which documents drop from their output)."""
    out = []
    for n in lengths:
        picked = rng.integers(0, len(words), size=max(1, int(n)))
        marks = rng.random(len(picked))
        parts = [words[i] + ("," if m < 0.06 else "." if m < 0.1 else "") for i, m in zip(picked, marks)]
        out.append(" ".join(parts))
    return out


def text_workloads(encoder, docs: int, queries: int, seed: int = 0, median: int = 110,
                   tokenizer_json: Path = TOKENIZER_JSON) -> dict[str, TextCorpus]:
    """documents: the harness's mixed corpus lengths (log-normal, median `median`, 3..512 tokens),
    spelled as words, truncated by the encoder to its document_length as ColBERT does; queries: 5-30
    words, padded to query_length by query expansion. `encoder`: our `MultiVectorEncoder` on the
    folder (it gives the token ids each contender computes)."""
    words = word_list(tokenizer_json)
    lengths = mixed_corpus(Vocab(0, 1, 2, 3, 4, 5), 0, seed=seed, median=median, docs=docs).lengths
    rng = np.random.default_rng(seed + 11)
    doc_texts = texts_of([max(1, n - 2) for n in lengths], words, rng)
    query_texts = texts_of(rng.integers(5, 31, size=queries).tolist(), words, rng)
    out = {}
    for name, texts, is_query, what in (
            ("documents", doc_texts, False,
             f"mixed lengths (median {median}, 3..512 words), truncated to {encoder.document_length} tokens"),
            ("queries", query_texts, True, f"5-30 words, expanded to {encoder.query_length} tokens")):
        ids = encoder.tokenize(texts, is_query=is_query)[0]
        out[name] = TextCorpus(name, [list(s) for s in ids], what, texts, is_query, name)
    return out


# ----------------------------------------------------------------------------- engines
def _as_matrices(out) -> list[torch.Tensor]:
    return [torch.as_tensor(np.asarray(m.float().cpu()) if isinstance(m, torch.Tensor) else np.asarray(m)).float()
            for m in out]


class OursMultiVector(Engine):
    """`MultiVectorEncoder.encode_document` / `encode_query`: float32 numpy (its default) on the
    CPU, tensors on a GPU."""

    def __init__(self, folder, device, dtype: torch.dtype):
        from modernbert_embed import MultiVectorEncoder

        self.model = MultiVectorEncoder.from_pretrained(str(folder), device=device, dtype=dtype)
        self.label = f"ours MultiVectorEncoder ({self.model.ops.name if self.model.ops else '?'})"
        # on a GPU, tensors on the device (as sentence-transformers returns them); else numpy, the default
        self.kwargs = {"convert_to_tensor": True} if torch.device(device).type == "cuda" else {}

    def encode(self, corpus: TextCorpus):
        with torch.inference_mode():
            fn = self.model.encode_query if corpus.is_query else self.model.encode_document
            return fn(corpus.texts, **self.kwargs)

    def vectors(self, corpus: TextCorpus) -> list[torch.Tensor]:
        return _as_matrices(self.encode(corpus))

    def close(self) -> None:
        del self.model


class SentenceTransformersMultiVector(Engine):
    """sentence-transformers 6's `MultiVectorEncoder.encode_document` / `encode_query`, batches of 32,
    its default output (a tensor per text, on the model's device)."""

    def __init__(self, folder, device, dtype: torch.dtype, batch_size: int = 32):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from sentence_transformers import MultiVectorEncoder
        except ImportError as e:
            raise CannotRun(f"sentence-transformers with MultiVectorEncoder (>= 6) is not installed: {e}") from e
        import sentence_transformers

        self.model = MultiVectorEncoder(str(folder), device=str(device))
        if dtype != torch.float32:
            self.model = self.model.to(dtype)
        self.batch_size = batch_size
        self.label = f"sentence-transformers {sentence_transformers.__version__} MultiVectorEncoder (batch {batch_size})"

    def encode(self, corpus: TextCorpus):
        fn = self.model.encode_query if corpus.is_query else self.model.encode_document
        return fn(corpus.texts, batch_size=self.batch_size, show_progress_bar=False, convert_to_numpy=False)

    def vectors(self, corpus: TextCorpus) -> list[torch.Tensor]:
        return _as_matrices(self.encode(corpus))

    def close(self) -> None:
        del self.model


class PyLateWorker(Engine):
    """PyLate's `ColBERT.encode` (fp32, CPU) in a worker process of PyLate's virtual environment
    (pylate_worker.py): the workloads' texts are sent once at start; each `encode` is one command,
    timed by the worker around `encode` alone (`seconds`), so the pipe is not in the time."""

    def __init__(self, folder, workloads: dict[str, TextCorpus], threads: int, batch_size: int = 32,
                 python: Path = PYLATE_PYTHON, timeout: float = 3600.0):
        if not Path(python).is_file():
            raise CannotRun(f"PyLate's virtual environment is absent ({python}): `make pylate-venv` makes it")
        self.tmp = tempfile.TemporaryDirectory(prefix="mbe-pylate-")
        self.stderr = open(Path(self.tmp.name) / "stderr.txt", "w+")
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        self.proc = subprocess.Popen([str(python), "-P", str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.stderr, text=True, env=env, cwd=self.tmp.name)
        self.timeout = timeout
        self.seconds: float | None = None
        self.calls = 0
        setup = {"folder": str(folder), "threads": threads, "batch_size": batch_size,
                 "workloads": {c.workload: {"texts": c.texts, "is_query": c.is_query} for c in workloads.values()}}
        reply = self._ask(setup)
        self.label = reply["label"] + " in its own process"

    def _ask(self, obj: dict) -> dict:
        if self.proc.poll() is not None:
            raise RuntimeError(f"the PyLate worker has exited ({self.proc.returncode}): {self._stderr_tail()}")
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=30)
            raise RuntimeError(f"the PyLate worker ended ({self.proc.returncode}): {self._stderr_tail()}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"PyLate: {reply['error']}")
        return reply

    def _stderr_tail(self) -> str:
        self.stderr.flush()
        self.stderr.seek(0)
        return self.stderr.read()[-1500:]

    def _command(self, cmd: str, corpus: TextCorpus, **extra) -> dict:
        reply = self._ask({"cmd": cmd, "workload": corpus.workload, "n": corpus.num_docs, **extra})
        if reply["count"] != corpus.num_docs:
            raise RuntimeError(f"PyLate gave {reply['count']} outputs for {corpus.num_docs} texts")
        self.seconds = float(reply["seconds"])
        return reply

    def encode(self, corpus: TextCorpus):
        self._command("run", corpus)
        return None  # the vectors stay in the worker (see `vectors`)

    def vectors(self, corpus: TextCorpus) -> list[torch.Tensor]:
        self.calls += 1
        path = Path(self.tmp.name) / f"vectors{self.calls}.npz"
        self._command("vectors", corpus, out=str(path))
        with np.load(path) as z:
            return [torch.from_numpy(z[f"v{i}"]) for i in range(corpus.num_docs)]

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
        except Exception:
            self.proc.kill()
            self.proc.wait()
        finally:
            self.stderr.close()
            self.tmp.cleanup()


def compare_vectors(got: Sequence[torch.Tensor], ref: Sequence[torch.Tensor]) -> tuple[float, float]:
    """(max abs difference over every token's features, min cosine of a token vector) of `got`
    against `ref`, text by text; raises when a text's number of vectors or width differs."""
    if len(got) != len(ref):
        raise RuntimeError(f"{len(got)} outputs for {len(ref)} texts")
    worst, cos = 0.0, 1.0
    for i, (a, b) in enumerate(zip(got, ref)):
        if a.shape != b.shape:
            raise RuntimeError(f"text {i}: vectors of shape {list(a.shape)}, ours {list(b.shape)}")
        if a.numel():
            worst = max(worst, float((a - b).abs().max()))
            cos = min(cos, float(torch.nn.functional.cosine_similarity(a, b, dim=-1).min()))
    return worst, cos
