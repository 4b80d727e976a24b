"""One loaded checkpoint: what every front end wraps.

A `LoadedModel` owns what a loaded checkpoint is: the `Engine` (the backbone and, for a
classifier, its head), the tokenizer, `max_seq_length`, and what the folder says about its use
(`Checkpoint`: an embedder's pooling, whether it normalises, its prompts; a classifier's labels and
score activation). `Embedder` and `CrossEncoder` (the Python API), the corpus command, the Ray
adapter and the server all wrap one; none reaches through another front end.

Text in: `tokenize` (single texts, with a prompt) and `tokenize_pairs` (`[CLS] a [SEP] b [SEP]`,
truncated longest first), both to `max_seq_length`. `through_model` runs texts through the model
in chunks, tokenising the next chunk on a worker thread while the model runs this one (on a GPU by
default: `tokenize_beside_model`; on the CPU the two would share the same cores).

A folder whose head does not fit the front end asked for is refused by `require`, with the name of
the class to use.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import numpy as np
import torch

from .engine import Engine, NonFiniteError
from .tokenizer import PROMPTS, TextTokenizer
from .weights import (CLASSIFIER, DEFAULT_MODEL, EMBEDDER, MULTIVECTOR, Checkpoint, CheckpointError,
                      resolve_activation_fn)

# Texts per tokenisation chunk when a front end tokenises beside a GPU (`tokenize_chunk`).
TOKENIZE_CHUNK = 4096
# The class that runs each kind of folder, for the error that names it.
FRONT_ENDS = {EMBEDDER: "modernbert_embed.Embedder", CLASSIFIER: "modernbert_embed.CrossEncoder",
              MULTIVECTOR: "modernbert_embed.MultiVectorEncoder"}


class LoadedModel:
    """A checkpoint loaded for inference: `engine`, `tokenizer` (None without tokenizer.json),
    `max_seq_length`, `checkpoint` (None for an engine built by hand), `name`."""

    def __init__(self, engine: Engine, tokenizer: TextTokenizer | None = None, max_seq_length: int | None = None,
                 name: str = "", checkpoint: Checkpoint | None = None):
        self.engine = engine
        self.tokenizer = tokenizer
        self.name = name
        self.checkpoint = checkpoint
        self.max_seq_length = max_seq_length or engine.config.max_position_embeddings
        self.tokenize_beside_model = engine.device.type == "cuda"
        self.tokenize_chunk = TOKENIZE_CHUNK

    # --------------------------------------------------------------------------- loading
    @classmethod
    def open(cls, name_or_path=DEFAULT_MODEL, device=None, dtype=None, revision=None, local_files_only=None,
             ops=None, kind: str | None = None) -> "LoadedModel":
        """Load from a local folder, the HF cache or the Hub (see `Checkpoint.open`, `Engine.load`).
        `kind`: refuse a folder of another kind (see `require`) before loading its weights."""
        checkpoint = Checkpoint.open(name_or_path, revision=revision, local_files_only=local_files_only)
        return cls.from_checkpoint(checkpoint, device=device, dtype=dtype, ops=ops, kind=kind)

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint, device=None, dtype=None, ops=None,
                        kind: str | None = None) -> "LoadedModel":
        if kind is not None:
            require(checkpoint, kind)
        engine = Engine.load(checkpoint, device=device, dtype=dtype, ops=ops)
        tokenizer = TextTokenizer(checkpoint.tokenizer_path) if checkpoint.tokenizer_path else None
        return cls(engine, tokenizer, checkpoint.max_seq_length, name=checkpoint.name, checkpoint=checkpoint)

    # --------------------------------------------------------------------------- what it is
    @property
    def config(self):
        return self.engine.config

    @property
    def kind(self) -> str:
        """EMBEDDER, CLASSIFIER or MULTIVECTOR: the engine's head (none, a classifier, a per-token
        projection)."""
        if self.engine.projection is not None:
            return MULTIVECTOR
        return CLASSIFIER if self.engine.head is not None else EMBEDDER

    @property
    def normalize(self) -> bool:
        """Whether the folder normalises its embeddings (a Normalize module is listed)."""
        return self.checkpoint.normalize if self.checkpoint is not None else True

    @property
    def prompts(self) -> dict[str, str]:
        """Prompts by name: the trained prefixes of modernbert-embed (`PROMPTS`), and the folder's
        own (config_sentence_transformers.json), which win."""
        return {**PROMPTS, **(self.checkpoint.prompts if self.checkpoint is not None else {})}

    @property
    def default_prompt_name(self) -> str | None:
        return self.checkpoint.default_prompt_name if self.checkpoint is not None else None

    @property
    def activation_fn(self):
        """The score activation the folder asks for: sentence-transformers' `activation_fn` from
        config.json when present, else sigmoid for one label and identity for more."""
        spec = self.engine.head.spec
        if spec.activation_fn is not None:
            return resolve_activation_fn(spec.activation_fn)
        return torch.nn.Sigmoid() if spec.num_labels == 1 else torch.nn.Identity()

    @property
    def max_seq_length(self) -> int:
        """Tokens per input ([CLS] and [SEP] included) beyond which text is truncated."""
        return self._max_seq_length

    @max_seq_length.setter
    def max_seq_length(self, value: int) -> None:
        limit = self.engine.config.max_position_embeddings
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 2 <= value <= limit:
            raise ValueError(f"max_seq_length must be an int in 2..{limit}, got {value!r}")
        self._max_seq_length = int(value)

    # --------------------------------------------------------------------------- text in
    def text_tokenizer(self) -> TextTokenizer:
        if self.tokenizer is None:
            raise RuntimeError("this checkpoint has no tokenizer.json: use token ids instead of text")
        return self.tokenizer

    def tokenize(self, texts: Sequence[str], prompt: str = "", max_length: int | None = None
                 ) -> tuple[list[list[int]], list[bool]]:
        """Token ids ([CLS] ... [SEP], truncated to `max_length`, default max_seq_length) and
        whether each was truncated."""
        return self.text_tokenizer().encode(texts, prompt, max_length or self.max_seq_length)

    def tokenize_pairs(self, pairs: Sequence[tuple[str, str]], max_length: int | None = None
                       ) -> tuple[list[list[int]], list[bool]]:
        """Token ids of pairs ([CLS] a [SEP] b [SEP], truncated longest first to `max_length`,
        default max_seq_length) and whether each was truncated."""
        return self.text_tokenizer().encode_pairs(pairs, max_length or self.max_seq_length)

    def through_model(self, n: int, tokenize: Callable[[int, int], tuple[list, list]],
                      compute: Callable[[list, torch.Tensor, bool], object], width: int,
                      what: str = "embeddings") -> tuple[torch.Tensor, list[bool]]:
        """Run `n` inputs through the model: `tokenize(start, end)` -> (ids, truncated) of inputs
        start..end; `compute(ids, out, check_finite)` fills `out` (float32 [len(ids), width] on the
        device) through the engine. Returns (out [n, width], truncated [n]).

        Beside a GPU (`tokenize_beside_model`), in chunks of `tokenize_chunk` inputs: a worker
        thread tokenises chunk k + 1 (the tokenizer releases the GIL) while this thread queues
        chunk k, so that neither waits for the other. Each chunk is planned on its own; rows land
        in input order."""
        out = torch.empty(n, width, dtype=torch.float32, device=self.engine.device)
        chunk = max(1, int(self.tokenize_chunk))
        if not (self.tokenize_beside_model and n > chunk):
            ids, truncated = tokenize(0, n)
            compute(ids, out, True)
            return out, list(truncated)
        truncated: list[bool] = []
        starts = list(range(0, n, chunk))
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize") as pool:
            ahead = pool.submit(tokenize, 0, min(chunk, n))
            for k, start in enumerate(starts):
                ids, tr = ahead.result()
                if k + 1 < len(starts):
                    ahead = pool.submit(tokenize, starts[k + 1], min(starts[k + 1] + chunk, n))
                compute(ids, out[start:start + len(ids)], False)
                truncated.extend(tr)
        bad = self.engine.nonfinite_rows(out)
        if bad:
            raise NonFiniteError(bad, self.engine.dtype_name, what)
        return out, truncated

    def __repr__(self) -> str:
        e = self.engine
        return (f"LoadedModel({self.name!r}, {self.kind}, device={str(e.device)!r}, dtype={e.dtype_name}, "
                f"max_seq_length={self.max_seq_length})")


class FrontEnd:
    """What the Python front ends (`Embedder`, `CrossEncoder`, `MultiVectorEncoder`) share: they wrap one `LoadedModel`
    (`loaded`) of their `KIND`, load it the same way, and show its parts under the same names."""

    KIND = EMBEDDER

    def __init__(self, loaded: LoadedModel):
        if loaded.checkpoint is not None:
            require(loaded.checkpoint, self.KIND)
        elif loaded.kind != self.KIND:
            raise ValueError(f"a {type(self).__name__} needs a model of kind {self.KIND}, got {loaded.kind}: use "
                             f"{FRONT_ENDS[loaded.kind]}")
        self.loaded = loaded

    @classmethod
    def from_pretrained(cls, name_or_path=DEFAULT_MODEL, device=None, dtype=None, revision=None,
                        local_files_only=None):
        """Load from a local folder, the HF cache or the Hub. device: "cpu", "cuda" or "cuda:N"
        (default: the current GPU when there is one); dtype: float32 (CPU default), bfloat16 (default
        on GPUs with native bf16, compute capability 8.0+), float16 (default on older GPUs). A
        folder of another kind is refused, naming the class that runs it."""
        checkpoint = Checkpoint.open(name_or_path, revision=revision, local_files_only=local_files_only)
        return cls.from_checkpoint(checkpoint, device=device, dtype=dtype)

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint, device=None, dtype=None, ops=None):
        """Load an opened `Checkpoint`. `ops` (from `ops.select_ops`) forces the op implementations,
        for experiments and benchmarks; by default the dispatch chooses them (and checks them on a GPU)."""
        return cls(LoadedModel.from_checkpoint(checkpoint, device=device, dtype=dtype, ops=ops, kind=cls.KIND))

    @property
    def engine(self) -> Engine:
        return self.loaded.engine

    @property
    def tokenizer(self) -> TextTokenizer | None:
        return self.loaded.tokenizer

    @property
    def checkpoint(self) -> Checkpoint | None:
        return self.loaded.checkpoint

    @property
    def name(self) -> str:
        return self.loaded.name

    @property
    def model(self):
        return self.engine.model

    @property
    def config(self):
        return self.engine.config

    @property
    def device(self) -> torch.device:
        return self.engine.device

    @property
    def dtype(self) -> torch.dtype:
        return self.engine.dtype

    @property
    def dtype_name(self) -> str:
        """What the model runs: "float32", "bfloat16", "float16", or "int8" for the CPU's int8-weight
        experiment (`select_ops(..., int8_weights=True)`; `dtype` is then float32)."""
        return self.engine.dtype_name

    @property
    def ops(self):
        return self.engine.ops

    @property
    def max_seq_length(self) -> int:
        """Tokens per input ([CLS] and every [SEP] included) beyond which inputs are truncated."""
        return self.loaded.max_seq_length

    @max_seq_length.setter
    def max_seq_length(self, value: int) -> None:
        self.loaded.max_seq_length = value

    @property
    def tokenize_beside_model(self) -> bool:
        """Tokenise the next chunk of `tokenize_chunk` inputs on a worker thread while the model
        runs this one (default: on a GPU)."""
        return self.loaded.tokenize_beside_model

    @tokenize_beside_model.setter
    def tokenize_beside_model(self, value: bool) -> None:
        self.loaded.tokenize_beside_model = value

    @property
    def tokenize_chunk(self) -> int:
        return self.loaded.tokenize_chunk

    @tokenize_chunk.setter
    def tokenize_chunk(self, value: int) -> None:
        self.loaded.tokenize_chunk = value


def check_top_k(top_k) -> None:
    """`rank`'s `top_k`: None (every document) or an int >= 1, else a ValueError naming it."""
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an int >= 1 or None, got {top_k!r}")


def ranked(scores: Sequence[float], documents: Sequence[str], top_k: int | None, return_documents: bool) -> list[dict]:
    """`rank`'s answer, as sentence-transformers gives it: `{"corpus_id", "score"(, "text")}` per
    document, best first (a stable sort: ties keep the input order), the first `top_k`."""
    results = [{"corpus_id": i, "score": s} for i, s in enumerate(scores)]
    if return_documents:
        for r in results:
            r["text"] = documents[r["corpus_id"]]
    results.sort(key=lambda r: r["score"], reverse=True)
    return results[:top_k]

def require(checkpoint: Checkpoint, kind: str) -> None:
    """Refuse a folder that is not of `kind` (EMBEDDER, CLASSIFIER or MULTIVECTOR), naming the class
    to use."""
    if checkpoint.kind == kind:
        return
    arch = checkpoint.architecture or "ModernBertModel"
    asked = {EMBEDDER: "an embedder", CLASSIFIER: "a cross-encoder", MULTIVECTOR: "a multi-vector encoder"}[kind]
    if checkpoint.kind == CLASSIFIER:
        what = f"a sequence classifier ({arch}, {checkpoint.classifier.num_labels} label(s)): a cross-encoder"
    elif checkpoint.kind == MULTIVECTOR:
        what = (f"a late-interaction (ColBERT) model ({arch} with a per-token Dense projection to "
                f"{checkpoint.multivector.out_features}): a multi-vector encoder")
    else:
        what = f"an embedder ({arch}) with one pooled vector per text and no classifier head"
    what += f", not {asked}"
    raise CheckpointError(f"{checkpoint.name} is {what}; load it with {FRONT_ENDS[checkpoint.kind]}")


def as_loaded(model) -> LoadedModel:
    """The `LoadedModel` of a front end (an `Embedder`, a `CrossEncoder`, a `MultiVectorEncoder`)
    or the model itself."""
    loaded = getattr(model, "loaded", model)
    if not isinstance(loaded, LoadedModel):
        raise TypeError(f"expected a loaded model (Embedder, CrossEncoder or LoadedModel), got {type(model).__name__}")
    return loaded


__all__ = ["LoadedModel", "FrontEnd", "TOKENIZE_CHUNK", "FRONT_ENDS", "require", "as_loaded"]
