"""The engines a benchmark compares, each a loaded model with `encode(corpus) -> [N, H] float32
embeddings` on the run's device:

- ours: `Embedder.encode_tokens` (unpadded, packed under a token budget); `OursText`: the text path
  through `Embedder.encode` on the id-tokenizer texts;
- transformers: `ModernBertModel` (SDPA attention) on length-sorted, padded batches of 32 with
  masked mean pooling and L2 normalisation -- what sentence-transformers computes;
- sentence-transformers: `SentenceTransformer(folder).encode(texts)` on the id-tokenizer texts; its
  timing includes its own (cheap) tokenisation.

Experiment switches (attention variants) reach our engine the documented way:
`Embedder.from_checkpoint(..., ops=select_ops(device, backend, attention))`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .corpora import Corpus, id_texts, st_folder

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def dtype_of(name: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def padded_batches(ids: Sequence[Sequence[int]], batch_size: int, pad: int):
    """Yield (rows, input_ids, attention_mask) for length-sorted padded batches, longest first:
    how the peers' users run them (sentence-transformers sorts the same way). `rows` are the
    positions of the batch's documents in `ids`; the arrays are int64 numpy, [B, longest]."""
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    for start in range(0, len(order), batch_size):
        rows = np.array(order[start:start + batch_size], dtype=np.int64)
        width = len(ids[rows[0]])
        batch = np.full((len(rows), width), pad, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for r, i in enumerate(rows):
            batch[r, :len(ids[i])] = ids[i]
            mask[r, :len(ids[i])] = 1
        yield rows, batch, mask


class Engine:
    """A loaded model with `encode(corpus) -> [N, H] fp32 embeddings` on the run's device."""

    label = "engine"

    def encode(self, corpus: Corpus) -> torch.Tensor:
        raise NotImplementedError

    def close(self) -> None:
        pass


class Ours(Engine):
    def __init__(self, folder, device, dtype: torch.dtype, backend: str = "auto", attention: str = "auto",
                 max_batch_tokens: int | None = None, int8_weights: bool = False):
        from modernbert_embed import Checkpoint, Embedder
        from modernbert_embed.ops import select_ops

        # the experiment switches go through from_checkpoint's `ops` (auto: the library's own choice)
        experiment = (backend, attention) != ("auto", "auto") or int8_weights
        ops = select_ops(device, backend, attention, int8_weights=int8_weights) if experiment else None
        self.model = Embedder.from_checkpoint(Checkpoint(folder), device=device, dtype=dtype, ops=ops)
        self.kwargs = {"max_batch_tokens": max_batch_tokens} if max_batch_tokens else {}
        self.label = f"ours ({self.model.ops.name if self.model.ops else backend})"

    def encode(self, corpus: Corpus) -> torch.Tensor:
        with torch.inference_mode():
            return self.model.encode_tokens(corpus.ids, convert_to_tensor=True, **self.kwargs)

    def close(self) -> None:
        del self.model


class OursText(Engine):
    """`Embedder.encode` on the id-tokenizer texts of the corpus: the text path, tokenisation
    included (on a GPU, chunks of `tokenize_chunk` texts are tokenised beside the model)."""

    def __init__(self, folder, device, dtype: torch.dtype, work_dir: Path | None = None,
                 tokenize_chunk: int | None = None):
        from modernbert_embed import Embedder

        st_dir = st_folder(Path(folder), Path(work_dir or Path(folder).parent / "st-model"))
        self.model = Embedder.from_pretrained(st_dir, device=device, dtype=dtype)
        if tokenize_chunk:
            self.model.tokenize_chunk = tokenize_chunk
        self.texts: dict[int, list[str]] = {}
        self.label = f"ours text ({self.model.ops.name}, tokenize_chunk {self.model.tokenize_chunk})"

    def encode(self, corpus: Corpus) -> torch.Tensor:
        key = id(corpus)
        if key not in self.texts:
            texts = id_texts(corpus.ids)
            got, _ = self.model.tokenize(texts[:8])
            if [list(g) for g in got] != [list(s) for s in corpus.ids[:8]]:
                raise RuntimeError("id tokenizer round trip failed in the text path")
            self.texts[key] = texts
        with torch.inference_mode():
            return self.model.encode(self.texts[key], convert_to_tensor=True)

    def close(self) -> None:
        del self.model


def load_transformers_model(folder, dtype: torch.dtype, attn_implementation: str = "sdpa"):
    """`ModernBertModel.from_pretrained` with `dtype=` (transformers >= 4.56) or `torch_dtype=`."""
    import transformers

    try:
        model = transformers.ModernBertModel.from_pretrained(
            folder, attn_implementation=attn_implementation, dtype=dtype)
    except TypeError:
        model = transformers.ModernBertModel.from_pretrained(
            folder, attn_implementation=attn_implementation, torch_dtype=dtype)
    if next(model.parameters()).dtype != dtype:  # an old version that ignored the keyword
        model = model.to(dtype)
    return model.eval()


class Transformers(Engine):
    """ModernBertModel on padded batches sorted by length, masked mean pooling, L2 normalise."""

    def __init__(self, folder, device, dtype: torch.dtype, batch_size: int = 32, attn_implementation: str = "sdpa"):
        self.device = torch.device(device)
        self.model = load_transformers_model(folder, dtype, attn_implementation).to(self.device)
        self.pad = self.model.config.pad_token_id
        self.batch_size = batch_size
        self.label = f"transformers ({self.model.config._attn_implementation}, batch {batch_size})"

    def encode(self, corpus: Corpus, batch_size: int | None = None) -> torch.Tensor:
        out = torch.empty(corpus.num_docs, self.model.config.hidden_size, dtype=torch.float32, device=self.device)
        with torch.inference_mode():
            for rows, batch, mask in padded_batches(corpus.ids, batch_size or self.batch_size, self.pad):
                batch, mask = torch.from_numpy(batch).to(self.device), torch.from_numpy(mask).to(self.device)
                hidden = self.model(input_ids=batch, attention_mask=mask).last_hidden_state
                m = mask.unsqueeze(-1).float()
                pooled = (hidden.float() * m).sum(1) / mask.sum(1, keepdim=True).float()
                out[torch.from_numpy(rows).to(self.device)] = torch.nn.functional.normalize(pooled, dim=-1)
        return out

    def padded_tokens(self, corpus: Corpus, batch_size: int | None = None) -> int:
        bs = batch_size or self.batch_size
        lengths = sorted(corpus.lengths, reverse=True)
        return sum(lengths[i] * len(lengths[i:i + bs]) for i in range(0, len(lengths), bs))

    def close(self) -> None:
        del self.model


class SentenceTransformers(Engine):
    """`SentenceTransformer.encode` on the id-tokenizer texts of the corpus."""

    def __init__(self, folder, device, dtype: torch.dtype, batch_size: int = 32, work_dir: Path | None = None):
        from sentence_transformers import SentenceTransformer

        self.device = torch.device(device)
        st_dir = st_folder(Path(folder), Path(work_dir or Path(folder).parent / "st-model"))
        self.model = SentenceTransformer(str(st_dir), device=str(self.device))
        if dtype != torch.float32:
            self.model = self.model.to(dtype)
        self.batch_size = batch_size
        self.texts: dict[int, list[str]] = {}
        attn = "?"
        try:
            attn = self.model[0].auto_model.config._attn_implementation
        except (AttributeError, IndexError, TypeError):
            pass
        self.label = f"sentence-transformers ({attn}, batch {batch_size})"

    def check_round_trip(self, corpus: Corpus) -> None:
        """The id tokenizer must give back exactly the corpus ids (raises otherwise)."""
        tok = self.model.tokenizer
        for seq, text in zip(corpus.ids[:8], id_texts(corpus.ids[:8])):
            got = tok(text, truncation=True, max_length=len(seq) + 8)["input_ids"]
            if list(got) != list(seq):
                raise RuntimeError(f"id tokenizer round trip failed: {list(got)[:8]}... vs {list(seq)[:8]}...")

    def encode(self, corpus: Corpus) -> torch.Tensor:
        key = id(corpus)
        if key not in self.texts:
            self.check_round_trip(corpus)
            self.texts[key] = id_texts(corpus.ids)
        out = self.model.encode(self.texts[key], batch_size=self.batch_size, convert_to_tensor=True,
                                show_progress_bar=False)
        return out.float()

    def close(self) -> None:
        del self.model
