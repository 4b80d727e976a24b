"""The public API: `Embedder`, shaped like sentence-transformers so its users feel at home.

A thin front on one loaded model (`loaded.LoadedModel`: the engine, the tokenizer,
`max_seq_length` and what the folder says): it checks the options once (`EncodeOptions`), with the
folder's defaults (normalise only when it lists a Normalize module, its prompts), and turns the
engine's float32 embeddings into what was asked for (numpy or torch, float32 / float16 / int8 /
binary). A classifier folder is refused with the name of the class that runs it (`CrossEncoder`).

Thread safety: `encode`, `encode_tokens` and `hidden_states` may be called from many threads at
once; each call's result is the one it would get alone. A call reads `max_seq_length` once, when
it starts.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from . import quantize
from .chunking import embed_windows, split_long
from .loaded import FrontEnd
from .matryoshka import slice_normalize
from .options import EncodeOptions
from .tokenizer import PROMPTS, check_texts
from .weights import EMBEDDER

PRECISIONS = quantize.PRECISIONS  # float32, float16, int8, uint8, binary, ubinary


def progress_bar(total: int, show: bool | None):
    """(tqdm bar over `total` documents, on_batch callback for `Engine.embed`), or (None, None)."""
    if not show:
        return None, None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit="doc", desc="Embedding")
    return bar, lambda docs, _tokens: bar.update(docs)


class Embedder(FrontEnd):
    """Text embeddings with ModernBERT: tokenise, pack by length, encode unpadded, pool.

    `from_pretrained(name_or_path, device=None, dtype=None, revision=None, local_files_only=None)`
    (see `FrontEnd`): a classifier (cross-encoder) folder is refused, `CrossEncoder` runs it; a
    masked-LM folder (`ModernBertForMaskedLM`) gives its backbone's embeddings, mean-pooled and not
    normalised, as sentence-transformers does."""

    KIND = EMBEDDER

    # --------------------------------------------------------------------------- properties
    @property
    def pooling(self) -> str:
        return self.engine.pooling

    @property
    def normalize_embeddings(self) -> bool:
        """What `normalize_embeddings=None` (the default) means: whether the folder lists a
        Normalize module."""
        return self.loaded.normalize

    @property
    def prompts(self) -> dict[str, str]:
        """Prompts by name: modernbert-embed's trained prefixes and the folder's own."""
        return self.loaded.prompts

    @property
    def default_prompt_name(self) -> str | None:
        return self.loaded.default_prompt_name

    @property
    def embedding_dim(self) -> int:
        return self.config.hidden_size

    def get_sentence_embedding_dimension(self) -> int:  # sentence-transformers' spelling
        return self.config.hidden_size

    # --------------------------------------------------------------------------- text in
    def tokenize(self, texts: Sequence[str], prompt: str = "") -> tuple[list[list[int]], list[bool]]:
        """Token ids ([CLS] ... [SEP], truncated to max_seq_length) and whether each was truncated."""
        return self.loaded.tokenize(texts, prompt)

    def _options(self, **kwargs) -> EncodeOptions:
        """EncodeOptions with this model's prompts and defaults (normalize_embeddings=None: what
        the folder says; no prompt given: the folder's default_prompt_name)."""
        if kwargs.get("prompt") is None and kwargs.get("prompt_name") is None and "prompt" in kwargs:
            kwargs["prompt_name"] = self.default_prompt_name
        return EncodeOptions(prompts=self.prompts, **kwargs).for_model(self.config.hidden_size, self.loaded.normalize)

    def encode(self, sentences, prompt: str | None = None, prompt_name: str | None = None,
               truncate_dim: int | None = None, normalize_embeddings: bool | None = None,
               batch_size: int | None = None, max_batch_tokens: int | None = None,
               precision: str = "float32", convert_to_tensor: bool = False,
               show_progress_bar: bool | None = None, long: str = "truncate", overlap: int | None = None,
               ranges=None, calibration_embeddings=None):
        """Embed texts: [N, d] (numpy, or a torch tensor on the model's device with
        convert_to_tensor=True); a single string gives [d].

        prompt_name picks one of the trained prefixes (search_query, search_document,
        classification, clustering) or of the folder's prompts; prompt is prepended as given;
        neither: the folder's default_prompt_name, if any. normalize_embeddings: None (default)
        follows the folder (normalised when it lists a Normalize module, as sentence-transformers
        does). truncate_dim keeps the first d features (Matryoshka), then normalises when
        normalising. Inputs are sorted by length and packed under
        `max_batch_tokens` tokens per forward (default: 4096 on the CPU, 16384 on a GPU);
        `batch_size` caps the *sequences* in one such batch
        (in sentence-transformers it is the texts per padded forward: here the token budget
        decides). precision int8/uint8 quantise with `ranges` ([2, d] minima, maxima), else ranges
        taken from `calibration_embeddings`, else from this call's embeddings; binary/ubinary pack
        the signs (see `quantize.py`). long="chunk" embeds texts longer than max_seq_length as
        overlapping windows (`overlap` tokens) combined into one vector (see `chunking.py`);
        "truncate" cuts them."""
        opts = self._options(
            prompt=prompt, prompt_name=prompt_name, truncate_dim=truncate_dim,
            normalize_embeddings=normalize_embeddings, precision=precision, long=long, overlap=overlap,
            max_batch_tokens=max_batch_tokens, batch_size=batch_size, ranges=ranges,
            calibration_embeddings=calibration_embeddings)
        single = isinstance(sentences, str)
        texts = check_texts([sentences] if single else sentences)
        tokenizer = self.loaded.text_tokenizer()
        msl = self.max_seq_length  # read once: another thread may change it
        dim = opts.dim(self.config.hidden_size)
        bar, on_batch = progress_bar(len(texts), show_progress_bar)

        def compute(ids, out, check_finite):
            self.engine.embed(ids, dim=dim, normalize=opts.normalize_embeddings, max_batch_tokens=opts.max_batch_tokens,
                              batch_size=opts.batch_size, on_batch=on_batch, out=out, check_finite=check_finite)

        try:
            if opts.long == "chunk":
                windows = split_long(tokenizer, texts, opts.prompt, msl, opts.overlap)
                result = embed_windows(self.engine, windows, dim=dim, normalize=opts.normalize_embeddings,
                                       max_batch_tokens=opts.max_batch_tokens, batch_size=opts.batch_size)
                if bar is not None:
                    bar.update(len(texts))
            else:
                result, _ = self.loaded.through_model(
                    len(texts), lambda a, b: tokenizer.encode(texts[a:b], opts.prompt, msl), compute, dim)
        finally:
            if bar is not None:
                bar.close()
        out = self._to_output(result, opts, convert_to_tensor)
        return out[0] if single else out

    def encode_query(self, sentences, **kwargs):
        """encode with the query prompt: the folder's "query" prompt when it has one, else
        modernbert-embed's "search_query: "."""
        return self.encode(sentences, prompt_name="query" if "query" in self.prompts else "search_query", **kwargs)

    def encode_document(self, sentences, **kwargs):
        """encode with the document prompt: the folder's "document" prompt when it has one, else
        modernbert-embed's "search_document: "."""
        name = "document" if "document" in self.prompts else "search_document"
        return self.encode(sentences, prompt_name=name, **kwargs)

    # --------------------------------------------------------------------------- ids in
    def encode_tokens(self, token_ids, truncate_dim: int | None = None, normalize_embeddings: bool | None = None,
                      batch_size: int | None = None, max_batch_tokens: int | None = None,
                      precision: str = "float32", convert_to_tensor: bool = False,
                      show_progress_bar: bool | None = None, ranges=None, calibration_embeddings=None):
        """Embed pre-tokenised inputs (each `[CLS] ... [SEP]` included), same options as encode."""
        opts = self._options(
            truncate_dim=truncate_dim, normalize_embeddings=normalize_embeddings, precision=precision,
            max_batch_tokens=max_batch_tokens, batch_size=batch_size, ranges=ranges,
            calibration_embeddings=calibration_embeddings)
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
