"""The public API: `Embedder`, shaped like sentence-transformers so its users feel at home.

A thin front on the engine core: it reads the checkpoint (`weights.Checkpoint`), loads an
`Engine`, tokenises text, checks the options once (`EncodeOptions`) and turns the engine's float32
embeddings into what was asked for (numpy or torch, float32 / float16 / int8 / binary).

Thread safety: `encode`, `encode_tokens` and `hidden_states` may be called from many threads at
once; each call's result is the one it would get alone. A call reads `max_seq_length` once, when
it starts.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
import torch

from . import quantize
from .chunking import embed_windows, split_long
from .engine import Engine, NonFiniteError
from .matryoshka import slice_normalize
from .options import EncodeOptions
from .tokenizer import PROMPTS, TextTokenizer, check_texts
from .weights import DEFAULT_MODEL, Checkpoint

PRECISIONS = quantize.PRECISIONS  # float32, float16, int8, uint8, binary, ubinary
# Texts per tokenisation chunk when encode tokenises beside a GPU (the Embedder's `tokenize_chunk`).
TOKENIZE_CHUNK = 4096


def progress_bar(total: int, show: bool | None):
    """(tqdm bar over `total` documents, on_batch callback for `Engine.embed`), or (None, None)."""
    if not show:
        return None, None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit="doc", desc="Embedding")
    return bar, lambda docs, _tokens: bar.update(docs)


class Embedder:
    """Text embeddings with ModernBERT: tokenise, pack by length, encode unpadded, pool."""

    def __init__(self, engine: Engine, tokenizer: TextTokenizer | None = None, max_seq_length: int | None = None,
                 name: str = "", checkpoint: Checkpoint | None = None):
        self.engine = engine
        self.tokenizer = tokenizer
        self.name = name
        self.checkpoint = checkpoint
        self.max_seq_length = max_seq_length or engine.config.max_position_embeddings
        # Tokenise the next chunk of `tokenize_chunk` texts on a worker thread while the model runs
        # this one: on a GPU by default (on the CPU the two would share the same cores).
        self.tokenize_beside_model = engine.device.type == "cuda"
        self.tokenize_chunk = TOKENIZE_CHUNK

    # --------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, name_or_path=DEFAULT_MODEL, device=None, dtype=None, revision=None,
                        local_files_only=None) -> "Embedder":
        """Load from a local folder, the HF cache or the Hub. device: "cpu", "cuda" or "cuda:N"
        (default: the current GPU when there is one); dtype: float32 (CPU default), bfloat16 (default
        on GPUs with native bf16, compute capability 8.0+), float16 (default on older GPUs)."""
        checkpoint = Checkpoint.open(name_or_path, revision=revision, local_files_only=local_files_only)
        return cls.from_checkpoint(checkpoint, device=device, dtype=dtype)

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint, device=None, dtype=None, ops=None) -> "Embedder":
        """Load an opened `Checkpoint`. `ops` (from `ops.select_ops`) forces the op implementations,
        for experiments and benchmarks; by default the dispatch chooses them (and checks them on a GPU)."""
        engine = Engine.load(checkpoint, device=device, dtype=dtype, ops=ops)
        tokenizer = TextTokenizer(checkpoint.tokenizer_path) if checkpoint.tokenizer_path else None
        return cls(engine, tokenizer, checkpoint.max_seq_length, name=checkpoint.name, checkpoint=checkpoint)

    # --------------------------------------------------------------------------- properties
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
    def pooling(self) -> str:
        return self.engine.pooling

    @property
    def embedding_dim(self) -> int:
        return self.config.hidden_size

    def get_sentence_embedding_dimension(self) -> int:  # sentence-transformers' spelling
        return self.config.hidden_size

    @property
    def max_seq_length(self) -> int:
        """Tokens per input ([CLS] and [SEP] included) beyond which text is truncated (or chunked)."""
        return self._max_seq_length

    @max_seq_length.setter
    def max_seq_length(self, value: int) -> None:
        limit = self.engine.config.max_position_embeddings
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 2 <= value <= limit:
            raise ValueError(f"max_seq_length must be an int in 2..{limit}, got {value!r}")
        self._max_seq_length = int(value)

    # --------------------------------------------------------------------------- text in
    def tokenize(self, texts: Sequence[str], prompt: str = "") -> tuple[list[list[int]], list[bool]]:
        """Token ids ([CLS] ... [SEP], truncated to max_seq_length) and whether each was truncated."""
        return self._tokenizer().encode(texts, prompt, self.max_seq_length)

    def _tokenizer(self) -> TextTokenizer:
        if self.tokenizer is None:
            raise RuntimeError("this checkpoint has no tokenizer.json: use encode_tokens with token ids")
        return self.tokenizer

    def encode(self, sentences, prompt: str | None = None, prompt_name: str | None = None,
               truncate_dim: int | None = None, normalize_embeddings: bool = True,
               batch_size: int | None = None, max_batch_tokens: int | None = None,
               precision: str = "float32", convert_to_tensor: bool = False,
               show_progress_bar: bool | None = None, long: str = "truncate", overlap: int | None = None,
               ranges=None, calibration_embeddings=None):
        """Embed texts: [N, d] (numpy, or a torch tensor on the model's device with
        convert_to_tensor=True); a single string gives [d].

        prompt_name picks one of the trained prefixes (search_query, search_document,
        classification, clustering); prompt is prepended as given. truncate_dim keeps the first d
        features (Matryoshka), then normalises. Inputs are sorted by length and packed under
        `max_batch_tokens` tokens per forward (default: 4096 on the CPU, 16384 on a GPU);
        `batch_size` caps the *sequences* in one such batch
        (in sentence-transformers it is the texts per padded forward: here the token budget
        decides). precision int8/uint8 quantise with `ranges` ([2, d] minima, maxima), else ranges
        taken from `calibration_embeddings`, else from this call's embeddings; binary/ubinary pack
        the signs (see `quantize.py`). long="chunk" embeds texts longer than max_seq_length as
        overlapping windows (`overlap` tokens) combined into one vector (see `chunking.py`);
        "truncate" cuts them."""
        opts = EncodeOptions(
            prompt=prompt, prompt_name=prompt_name, truncate_dim=truncate_dim,
            normalize_embeddings=normalize_embeddings, precision=precision, long=long, overlap=overlap,
            max_batch_tokens=max_batch_tokens, batch_size=batch_size, ranges=ranges,
            calibration_embeddings=calibration_embeddings).for_model(self.config.hidden_size)
        single = isinstance(sentences, str)
        texts = check_texts([sentences] if single else sentences)
        tokenizer = self._tokenizer()
        msl = self.max_seq_length  # read once: another thread may change it
        dim = opts.dim(self.config.hidden_size)
        bar, on_batch = progress_bar(len(texts), show_progress_bar)
        try:
            if opts.long == "chunk":
                windows = split_long(tokenizer, texts, opts.prompt, msl, opts.overlap)
                result = embed_windows(self.engine, windows, dim=dim, normalize=opts.normalize_embeddings,
                                       max_batch_tokens=opts.max_batch_tokens, batch_size=opts.batch_size)
                if bar is not None:
                    bar.update(len(texts))
            elif self.tokenize_beside_model and len(texts) > self.tokenize_chunk:
                result = self._embed_texts_in_chunks(texts, opts, msl, dim, on_batch)
            else:
                ids, _ = tokenizer.encode(texts, opts.prompt, msl)
                result = self.engine.embed(ids, dim=dim, normalize=opts.normalize_embeddings,
                                           max_batch_tokens=opts.max_batch_tokens, batch_size=opts.batch_size,
                                           on_batch=on_batch)
        finally:
            if bar is not None:
                bar.close()
        out = self._to_output(result, opts, convert_to_tensor)
        return out[0] if single else out

    def _embed_texts_in_chunks(self, texts, opts: EncodeOptions, msl: int, dim: int, on_batch) -> torch.Tensor:
        """encode's text path beside the model, in chunks of `tokenize_chunk` texts: a worker thread
        tokenises chunk k + 1 (the tokenizer releases the GIL) while this thread queues chunk k on
        the GPU, so that neither waits for the other. Each chunk is planned on its own (longest
        first within the chunk); rows land in input order."""
        result = torch.empty(len(texts), dim, dtype=torch.float32, device=self.device)
        chunk = max(1, int(self.tokenize_chunk))
        starts = list(range(0, len(texts), chunk))

        def tokenize(start):
            return self.tokenizer.encode(texts[start:start + chunk], opts.prompt, msl)[0]

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize") as pool:
            ahead = pool.submit(tokenize, 0)
            for k, start in enumerate(starts):
                ids = ahead.result()
                if k + 1 < len(starts):
                    ahead = pool.submit(tokenize, starts[k + 1])
                self.engine.embed(ids, dim=dim, normalize=opts.normalize_embeddings,
                                  max_batch_tokens=opts.max_batch_tokens, batch_size=opts.batch_size,
                                  on_batch=on_batch, out=result[start:start + len(ids)], check_finite=False)
        bad = self.engine.nonfinite_rows(result)
        if bad:
            raise NonFiniteError(bad, self.dtype_name)
        return result

    def encode_query(self, sentences, **kwargs):
        return self.encode(sentences, prompt_name="search_query", **kwargs)

    def encode_document(self, sentences, **kwargs):
        return self.encode(sentences, prompt_name="search_document", **kwargs)

    # --------------------------------------------------------------------------- ids in
    def encode_tokens(self, token_ids, truncate_dim: int | None = None, normalize_embeddings: bool = True,
                      batch_size: int | None = None, max_batch_tokens: int | None = None,
                      precision: str = "float32", convert_to_tensor: bool = False,
                      show_progress_bar: bool | None = None, ranges=None, calibration_embeddings=None):
        """Embed pre-tokenised inputs (each `[CLS] ... [SEP]` included), same options as encode."""
        opts = EncodeOptions(
            truncate_dim=truncate_dim, normalize_embeddings=normalize_embeddings, precision=precision,
            max_batch_tokens=max_batch_tokens, batch_size=batch_size, ranges=ranges,
            calibration_embeddings=calibration_embeddings).for_model(self.config.hidden_size)
        ids = self.engine.check_ids(token_ids)
        bar, on_batch = progress_bar(len(ids), show_progress_bar)
        try:
            result = self.engine.embed(ids, dim=opts.dim(self.config.hidden_size),
                                       normalize=opts.normalize_embeddings, max_batch_tokens=opts.max_batch_tokens,
                                       batch_size=opts.batch_size, on_batch=on_batch)
        finally:
            if bar is not None:
                bar.close()
        return self._to_output(result, opts, convert_to_tensor)

    def hidden_states(self, token_ids, max_batch_tokens: int | None = None) -> list[torch.Tensor]:
        """Final-norm hidden states, one float32 CPU tensor [len_i, hidden] per input, input order."""
        opts = EncodeOptions(max_batch_tokens=max_batch_tokens)
        return self.engine.hidden_states(self.engine.check_ids(token_ids), opts.max_batch_tokens)

    # --------------------------------------------------------------------------- similarity
    @staticmethod
    def similarity(a, b) -> torch.Tensor:
        """Cosine similarity matrix [len(a), len(b)] (1-D inputs count as one row)."""
        a = torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a).float()
        b = torch.as_tensor(np.asarray(b) if not isinstance(b, torch.Tensor) else b).float().to(a.device)
        a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
        return slice_normalize(a) @ slice_normalize(b).T

    # --------------------------------------------------------------------------- out
    def _to_output(self, result: torch.Tensor, opts: EncodeOptions, convert_to_tensor: bool):
        """float32 embeddings [N, d] on the device -> the requested precision and container."""
        if opts.precision in quantize.QUANTIZED_PRECISIONS:
            codes = quantize.quantize_embeddings(result.cpu().numpy(), opts.precision, opts.ranges,
                                                 opts.calibration_embeddings)
            return torch.from_numpy(codes).to(self.device) if convert_to_tensor else codes
        if opts.precision == "float16":
            result = result.half()
        return result if convert_to_tensor else result.cpu().numpy()

    def __repr__(self) -> str:
        return (f"Embedder({self.name!r}, device={str(self.device)!r}, dtype={self.dtype_name}, "
                f"ops={self.ops.name!r}, max_seq_length={self.max_seq_length})")


__all__ = ["Embedder", "PROMPTS", "PRECISIONS", "progress_bar"]
