"""The public API: `Embedder`, shaped like sentence-transformers so its users feel at home."""

from __future__ import annotations

import array
import collections
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from . import quantize as _quantize
from .batching import pack, plan_batches, upload
from .config import ModernBertConfig
from .model import ModernBert
from .ops import select_ops
from .tokenizer import PROMPTS, TextTokenizer, check_texts, resolve_prompt
from .weights import load_state_dict, resolve_checkpoint

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
PRECISIONS = _quantize.PRECISIONS  # float32, float16, int8, uint8, binary, ubinary
DEFAULT_MAX_BATCH_TOKENS = 16384
# With progress reporting on a GPU, how many batches the host may queue beyond the one it waits
# for: two keep the GPU fed while the host packs the next batch.
RUN_AHEAD = 2
# Texts per tokenisation chunk when encode tokenises beside the GPU (see _tokenize_ahead); the
# Embedder's `tokenize_chunk` attribute, set from this.
TOKENIZE_CHUNK = 4096


def resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} was requested but no CUDA GPU is available")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {str(device)!r} is not supported (cpu or cuda)")
    return device


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype {dtype} is not supported (float32, bfloat16, float16)")
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.lower().removeprefix("torch.")]
    raise ValueError(f"dtype {dtype!r} is not supported (float32, bfloat16, float16)")


def read_pooling(folder: Path) -> str:
    """'mean' or 'cls' from the sentence-transformers Pooling config (mean when absent)."""
    path = folder / "1_Pooling" / "config.json"
    if not path.is_file():
        return "mean"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    if not cfg.get("include_prompt", True):
        raise ValueError(f"{path}: include_prompt=false is not supported")
    modes = [k for k, v in cfg.items() if k.startswith("pooling_mode_") and v]
    if modes == ["pooling_mode_mean_tokens"]:
        return "mean"
    if modes == ["pooling_mode_cls_token"]:
        return "cls"
    raise ValueError(f"{path}: pooling {modes} is not supported (mean or cls tokens only)")


def read_max_seq_length(folder: Path, cfg: ModernBertConfig) -> int:
    path = folder / "sentence_bert_config.json"
    if path.is_file():
        value = json.loads(path.read_text(encoding="utf-8")).get("max_seq_length")
        if value:
            return min(int(value), cfg.max_position_embeddings)
    return cfg.max_position_embeddings


def _progress_bar(total: int, show: bool | None):
    """(tqdm bar over `total` documents, on_done callback for `_run_plan`), or (None, None)."""
    if not show:
        return None, None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit="doc", desc="Embedding")
    return bar, lambda docs, _tokens: bar.update(docs)


class Embedder:
    """Text embeddings with ModernBERT: tokenise, pack by length, encode unpadded, pool."""

    def __init__(self, model: ModernBert, tokenizer: TextTokenizer | None, pooling: str = "mean",
                 max_seq_length: int | None = None, name: str = ""):
        self.model = model
        self.config = model.config
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.max_seq_length = max_seq_length or self.config.max_position_embeddings
        self.name = name
        first = next(model.parameters())
        self.device, self.dtype = first.device, first.dtype
        self.ops = model.ops
        self.tokenize_chunk = TOKENIZE_CHUNK

    # --------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, name_or_path="nomic-ai/modernbert-embed-base", device=None, dtype=None,
                        revision=None, local_files_only=None, backend="auto", attention="auto"):
        """Load from a local folder, the HF cache or the Hub. device: "cpu"/"cuda" (default: cuda
        when present); dtype: float32 (CPU default), bfloat16 (CUDA default) or float16.
        backend/attention force an op implementation (see `ops.select_ops`)."""
        folder = resolve_checkpoint(name_or_path, revision=revision, local_files_only=local_files_only)
        cfg = ModernBertConfig.from_file(folder / "config.json")
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        ops = select_ops(device, backend=backend, attention=attention)
        model = ModernBert(cfg, ops, device=device)
        expected = {k: v.shape for k, v in model.state_dict().items()}
        model.load(load_state_dict(folder, expected, dtype, device))
        max_seq_length = read_max_seq_length(folder, cfg)
        tok_path = folder / "tokenizer.json"
        tokenizer = TextTokenizer(tok_path, max_seq_length) if tok_path.is_file() else None
        return cls(model, tokenizer, read_pooling(folder), max_seq_length, name=os.fspath(name_or_path))

    @property
    def embedding_dim(self) -> int:
        return self.config.hidden_size

    def get_sentence_embedding_dimension(self) -> int:  # sentence-transformers' spelling
        return self.config.hidden_size

    # --------------------------------------------------------------------------- text in
    def tokenize(self, texts: Sequence[str], prompt: str = "") -> tuple[list[list[int]], list[bool]]:
        if self.tokenizer is None:
            raise RuntimeError("this checkpoint has no tokenizer.json: use encode_tokens with token ids")
        if self.tokenizer.max_seq_length != self.max_seq_length:  # the user changed the attribute
            if not 2 <= self.max_seq_length <= self.config.max_position_embeddings:
                raise ValueError(f"max_seq_length must be in 2..{self.config.max_position_embeddings}, "
                                 f"got {self.max_seq_length}")
            self.tokenizer.set_max_seq_length(self.max_seq_length)
        return self.tokenizer.encode(texts, prompt)

    def encode(self, sentences, prompt: str | None = None, prompt_name: str | None = None,
               truncate_dim: int | None = None, normalize_embeddings: bool = True,
               batch_size: int | None = None, max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
               precision: str = "float32", convert_to_tensor: bool = False,
               show_progress_bar: bool | None = None, long: str = "truncate", overlap: int | None = None,
               ranges=None, calibration_embeddings=None):
        """Embed texts: [N, d] (numpy, or a torch tensor on the model's device with
        convert_to_tensor=True); a single string gives [d]. prompt_name picks one of the trained
        prefixes (search_query, search_document, classification, clustering); prompt is prepended
        as given. truncate_dim keeps the first d features (Matryoshka), then normalises.
        precision int8/uint8 quantise with `ranges` ([2, d] minima, maxima), else ranges taken from
        `calibration_embeddings`, else from this call's embeddings; binary/ubinary pack the signs
        (see `quantize.py`). long="chunk" embeds texts longer than max_seq_length as overlapping
        windows (`overlap` tokens) combined into one vector (see `chunking.py`); "truncate" cuts them."""
        from .chunking import check_long, check_overlap, embed_long

        single = isinstance(sentences, str)
        texts = [sentences] if single else list(sentences)
        check_texts(texts)
        prefix = resolve_prompt(prompt, prompt_name)
        self._check_options(truncate_dim, precision)
        check_long(long)
        check_overlap(overlap)
        if overlap is not None and long != "chunk":
            raise ValueError("overlap applies to long='chunk' only")
        if long == "chunk":
            result, _ = embed_long(self, texts, prefix, overlap, truncate_dim, normalize_embeddings,
                                   batch_size, max_batch_tokens, show_progress_bar)
            out = self._finish(result, precision, convert_to_tensor, ranges, calibration_embeddings)
        elif self._tokenize_ahead(len(texts)):
            result = self._embed_texts_pipelined(texts, prefix, truncate_dim, normalize_embeddings, batch_size,
                                                 max_batch_tokens, show_progress_bar)
            out = self._finish(result, precision, convert_to_tensor, ranges, calibration_embeddings)
        else:
            ids, _ = self.tokenize(texts, prefix) if texts else ([], [])
            out = self._embed(ids, truncate_dim, normalize_embeddings, batch_size, max_batch_tokens,
                              precision, convert_to_tensor, show_progress_bar, ranges, calibration_embeddings)
        return out[0] if single else out

    def _tokenize_ahead(self, n_texts: int) -> bool:
        """Tokenise in chunks beside the model? On a GPU, for more than one chunk of texts: the
        tokenizer runs on the CPU cores while the GPU computes. On the CPU both would share the
        same cores, so there the texts are tokenised first, all at once."""
        return self.device.type == "cuda" and n_texts > self.tokenize_chunk

    def _embed_texts_pipelined(self, texts, prefix, truncate_dim, normalize, batch_size, max_batch_tokens,
                               show_progress_bar) -> torch.Tensor:
        """encode's text path in chunks of `tokenize_chunk` texts: a worker thread tokenises chunk
        k + 1 (the tokenizer releases the GIL) while this thread queues chunk k on the GPU. Each
        chunk is planned on its own (longest first within the chunk); rows land in input order.
        float32 [len(texts), dim] on the device, checked finite."""
        from concurrent.futures import ThreadPoolExecutor

        dim = truncate_dim or self.config.hidden_size
        result = torch.empty(len(texts), dim, dtype=torch.float32, device=self.device)
        bar, on_done = _progress_bar(len(texts), show_progress_bar)
        chunk = max(1, int(self.tokenize_chunk))
        starts = list(range(0, len(texts), chunk))
        try:
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize") as pool:
                ahead = pool.submit(self.tokenize, texts[:chunk], prefix)
                for k, start in enumerate(starts):
                    ids, _ = ahead.result()
                    if k + 1 < len(starts):
                        nxt = starts[k + 1]
                        ahead = pool.submit(self.tokenize, texts[nxt:nxt + chunk], prefix)
                    plan = plan_batches([len(s) for s in ids], max_batch_tokens, batch_size)
                    result[start:start + len(ids)] = self._run_plan(ids, plan, dim, normalize, on_done)
        finally:
            if bar is not None:
                bar.close()
        self._check_finite(result)
        return result

    def encode_query(self, sentences, **kwargs):
        return self.encode(sentences, prompt_name="search_query", **kwargs)

    def encode_document(self, sentences, **kwargs):
        return self.encode(sentences, prompt_name="search_document", **kwargs)

    # --------------------------------------------------------------------------- ids in
    def encode_tokens(self, token_ids, truncate_dim: int | None = None, normalize_embeddings: bool = True,
                      batch_size: int | None = None, max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
                      precision: str = "float32", convert_to_tensor: bool = False,
                      show_progress_bar: bool | None = None, ranges=None, calibration_embeddings=None):
        """Embed pre-tokenised inputs (each `[CLS] ... [SEP]` included), same options as encode."""
        ids = self._check_ids(token_ids)
        self._check_options(truncate_dim, precision)
        return self._embed(ids, truncate_dim, normalize_embeddings, batch_size, max_batch_tokens,
                           precision, convert_to_tensor, show_progress_bar, ranges, calibration_embeddings)

    def hidden_states(self, token_ids, max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS) -> list[torch.Tensor]:
        """Final-norm hidden states, one float32 CPU tensor [len_i, hidden] per input, input order."""
        ids = self._check_ids(token_ids)
        out: list[torch.Tensor | None] = [None] * len(ids)
        for order in plan_batches([len(s) for s in ids], max_batch_tokens):
            batch = pack(ids, order, self.device)
            hidden = self.model(batch).float().cpu()
            for seq, piece in zip(batch.order, hidden.split(list(batch.lengths))):
                out[seq] = piece
        return out

    # --------------------------------------------------------------------------- similarity
    @staticmethod
    def similarity(a, b) -> torch.Tensor:
        """Cosine similarity matrix [len(a), len(b)] (1-D inputs count as one row)."""
        a = torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a).float()
        b = torch.as_tensor(np.asarray(b) if not isinstance(b, torch.Tensor) else b).float().to(a.device)
        a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
        a = a / a.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        b = b / b.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return a @ b.T

    # --------------------------------------------------------------------------- internals
    def _check_options(self, truncate_dim, precision):
        H = self.config.hidden_size
        if truncate_dim is not None:
            if isinstance(truncate_dim, bool) or not isinstance(truncate_dim, (int, np.integer)):
                raise TypeError(f"truncate_dim must be an int, got {type(truncate_dim).__name__}")
            if not 1 <= truncate_dim <= H:
                raise ValueError(f"truncate_dim must be in 1..{H}, got {truncate_dim}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r} is not supported; choose one of {PRECISIONS}")

    def _check_ids(self, token_ids) -> list:
        """The inputs as flat sequences of ints inside the vocabulary and the position limit, or a
        clear error naming the first bad input."""
        if isinstance(token_ids, (str, bytes)):
            raise TypeError("token_ids must be a list of token-id sequences, not a string")
        seqs = list(token_ids)
        checked = self._check_id_lists(seqs)
        return checked if checked is not None else [self._check_one_ids(i, s) for i, s in enumerate(seqs)]

    def _check_id_lists(self, seqs) -> list | None:
        """The common case in one pass: every input a non-empty list or tuple of Python ints, all
        in range. Returns the inputs themselves (nothing converted), or None when any is not
        like that, so that the per-input checks find it and name it. About 30 ns a token on a
        2-core host where the per-input checks take 120-210: on a GPU the model spends about 700 ns
        a token, and these checks run before the first batch."""
        V, P = self.config.vocab_size, self.config.max_position_embeddings
        if not all(type(s) in (list, tuple) and s and type(s[0]) is not bool and len(s) <= P for s in seqs):
            return None
        if not seqs:
            return seqs
        flat = array.array("q")
        try:  # takes ints (and numpy ints) only: floats, None, nested lists raise
            for s in seqs:
                flat.fromlist(s) if type(s) is list else flat.extend(s)
        except (TypeError, OverflowError):
            return None
        flat = np.frombuffer(flat, dtype=np.int64)
        if flat.min() < 0 or flat.max() >= V:
            return None
        return seqs

    def _check_one_ids(self, i: int, seq) -> list[int]:
        V, P = self.config.vocab_size, self.config.max_position_embeddings
        if seq is None:
            raise TypeError(f"input {i} is None, not a sequence of token ids")
        arr = np.asarray(seq.cpu() if isinstance(seq, torch.Tensor) else seq)
        if arr.ndim != 1:
            raise ValueError(f"input {i}: token ids must be a flat sequence, got shape {arr.shape}")
        if arr.size == 0:
            raise ValueError(f"input {i} is an empty token list (an empty text is [CLS] [SEP])")
        if not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"input {i}: token ids must be integers, got {arr.dtype}")
        bad = np.flatnonzero((arr < 0) | (arr >= V))
        if bad.size:
            raise ValueError(f"input {i}: token id {int(arr[bad[0]])} at position {int(bad[0])} "
                             f"is outside the vocabulary 0..{V - 1}")
        if arr.size > P:
            raise ValueError(f"input {i} has {arr.size} tokens; the model takes at most {P}")
        return arr.tolist()

    def _embed(self, ids, truncate_dim, normalize, batch_size, max_batch_tokens, precision,
               convert_to_tensor, show_progress_bar, ranges=None, calibration_embeddings=None):
        dim = truncate_dim or self.config.hidden_size
        plan = plan_batches([len(s) for s in ids], max_batch_tokens, batch_size) if ids else []
        bar, on_done = _progress_bar(len(ids), show_progress_bar)
        try:
            result = self._run_plan(ids, plan, dim, normalize, on_done)
        finally:
            if bar is not None:
                bar.close()
        self._check_finite(result)
        return self._finish(result, precision, convert_to_tensor, ranges, calibration_embeddings)

    def _check_finite(self, result: torch.Tensor) -> None:
        """Refuse non-finite embeddings, naming the inputs. Once per call, not per batch: it waits
        for the device."""
        bad = (~torch.isfinite(result).all(dim=1)).nonzero().flatten().tolist()
        if bad:
            raise FloatingPointError(
                f"non-finite embeddings for input(s) {bad[:10]}{' ...' if len(bad) > 10 else ''} "
                f"(model dtype {self.dtype}; float16 can overflow where bfloat16 does not)")

    def _run_plan(self, ids, plan, dim, normalize, on_done=None) -> torch.Tensor:
        """Embed `ids` batch by batch as `plan` groups them: float32 [len(ids), dim] on the device,
        in input order. Nothing here waits for the GPU (inputs go up through pinned memory, each
        batch's rows are scattered into place on the device), so while the GPU runs one batch the
        host packs the next. `on_done(docs, tokens)` is called as batches finish, in plan order;
        with it, on a GPU, the host stays at most RUN_AHEAD batches ahead so that the counts are
        of batches computed, not merely queued."""
        result = torch.empty(len(ids), dim, dtype=torch.float32, device=self.device)
        track = on_done is not None and self.device.type == "cuda"
        pending: collections.deque = collections.deque()
        for order in plan:
            batch = pack(ids, order, self.device)
            hidden = self.model(batch)
            emb = self.ops.pool(hidden, batch, self.pooling, dim, normalize)
            result.index_copy_(0, upload(np.asarray(order, dtype=np.int64), torch.int64, self.device), emb)
            if track:
                event = torch.cuda.Event()
                event.record()
                pending.append((event, batch.num_seqs, batch.num_tokens))
                if len(pending) > RUN_AHEAD:
                    event, n, t = pending.popleft()
                    event.synchronize()
                    on_done(n, t)
            elif on_done is not None:
                on_done(batch.num_seqs, batch.num_tokens)
        for event, n, t in pending:
            event.synchronize()
            on_done(n, t)
        return result

    def _finish(self, result, precision, convert_to_tensor, ranges=None, calibration_embeddings=None):
        """float32 embeddings [N, d] on the device -> the requested precision and container."""
        if (ranges is not None or calibration_embeddings is not None) and \
                precision not in _quantize.SCALAR_PRECISIONS:
            raise ValueError(f"ranges / calibration_embeddings apply to int8 and uint8, not {precision!r}")
        if precision in _quantize.QUANTIZED_PRECISIONS:
            codes = _quantize.quantize_embeddings(result.cpu().numpy(), precision, ranges, calibration_embeddings)
            return torch.from_numpy(codes).to(self.device) if convert_to_tensor else codes
        if precision == "float16":
            result = result.half()
        if convert_to_tensor:
            return result
        return result.cpu().numpy()


__all__ = ["Embedder", "PROMPTS"]
