"""The engine core: token ids in, embeddings (or a classifier's logits) out. The only way to the
model for every front end.

```
ids ─► check ─► plan (sort by length, pack under a token budget) ─► pack ─► forward ─► pool ─► scatter ─► finite check
                                                                                        └─► head (classifiers: fp32 logits)
```

`Engine.embed` and `Engine.score` run that loop (one loop, `_run`; pairs `[CLS] a [SEP] b [SEP]`
are token ids like any other); the Embedder and the CrossEncoder (and through `Embedder.encode`
the Ray adapter), chunking, the corpus command and the HTTP server call it and nothing below it. It holds no state that a call changes, so any
number of threads may call it at once, and each call's result is the one it would get alone (its
batches are its own). On a GPU the calls share one CUDA stream: they interleave batch by batch and
each waits as long as the work queued before it.

Every launch happens on the engine's device (`torch.cuda.device` around the loop), whatever the
calling thread's current device is.
"""

from __future__ import annotations

import array
import collections
import contextlib
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import numpy as np
import torch

from .batching import Batch, pack, plan_batches, upload
from .heads import ClassifierHead, ProjectionHead
from .model import ModernBert
from .devices import default_max_batch_tokens, keep_cpu_heap, resolve_device, resolve_dtype
from .ops import Ops, select_ops, self_check
from .weights import CLASSIFIER_PREFIXES, Checkpoint, load_state_dict

# With progress reporting on a GPU, how many batches the host may queue beyond the one it waits
# for: two keep the GPU fed while the host packs the next batch.
RUN_AHEAD = 2


class NonFiniteError(FloatingPointError):
    """Embeddings (or logits) that are NaN or infinite; `rows` are the inputs' indices in the call."""

    def __init__(self, rows: Sequence[int], dtype, what: str = "embeddings"):
        self.rows = list(rows)
        shown = f"{self.rows[:10]}{' ...' if len(self.rows) > 10 else ''}"
        super().__init__(f"non-finite {what} for input(s) {shown} (model dtype {dtype}; float16 can "
                         "overflow where bfloat16 does not)")


class Engine:
    """A loaded model, its pooling and, for a classifier, its head (for a late-interaction model,
    its per-token projection): `embed`, `score`, `tokens` and `hidden_states` over lists of token
    ids."""

    def __init__(self, model: ModernBert, pooling: str = "mean", head: ClassifierHead | None = None,
                 projection: ProjectionHead | None = None):
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling {pooling!r} is not supported (mean or cls)")
        self.model = model
        self.head = head
        self.projection = projection  # a late-interaction model's per-token head (`tokens`)
        self.config = model.config
        self.ops = model.ops
        self.pooling = pooling
        first = next(model.parameters())
        self.device, self.dtype = first.device, first.dtype
        # What the model runs, by name: the dtype's, or "int8" for the int8-weight experiment
        # (float32 elsewhere), so that a corpus folder or /info never mistakes one for the other.
        self.dtype_name = "int8" if model.ops.int8_weights else str(self.dtype).removeprefix("torch.")
        # Tokens per forward when a call does not say (`max_batch_tokens=None`): by device.
        self.max_batch_tokens = default_max_batch_tokens(self.device)

    @classmethod
    def load(cls, checkpoint: Checkpoint, device=None, dtype=None, ops: Ops | None = None) -> "Engine":
        """Build the model of `checkpoint` on `device` in `dtype` (see `devices.resolve_device`,
        `devices.resolve_dtype`) and load its weights. `ops` forces the op implementations; by default
        the dispatch chooses them, and on a GPU checks them first (`ops.self_check`)."""
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        if device.type == "cpu":
            keep_cpu_heap()
            # On a thread that ends with the load: torch's OpenMP (libgomp) keeps a team of helper
            # threads for every thread that ran a parallel op, and once there are more helpers than
            # cores it lets them spin only briefly, so every op of a forward wakes its helper again.
            # A model loaded on the main thread and run on another (a server's worker, a thread
            # pool) then took 1.3-1.45x as long per forward after an idle moment (2 cores); a
            # passing thread's team goes with it, and the thread that runs the model keeps the
            # only one.
            with ThreadPoolExecutor(1, thread_name_prefix="modernbert-embed-load") as loader:
                return loader.submit(cls._load, checkpoint, device, dtype, ops).result()
        return cls._load(checkpoint, device, dtype, ops)

    @classmethod
    def _load(cls, checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype, ops: Ops | None) -> "Engine":
        cfg = checkpoint.config
        if ops is None:
            ops = select_ops(device)
            if device.type == "cuda":
                with torch.cuda.device(device):
                    ops = self_check(ops, cfg, device, dtype)
        model = ModernBert(cfg, ops, device=device)
        expected = {k: v.shape for k, v in model.state_dict().items()}
        head = ClassifierHead(cfg.hidden_size, checkpoint.classifier) if checkpoint.classifier else None
        if checkpoint.multivector is not None:  # the backbone, and the Dense module's own folder
            spec = checkpoint.multivector
            projection = ProjectionHead(spec, ops)
            dense = {k: v.shape for k, v in projection.linear.state_dict().items()}
            dense = {"linear." + k: v for k, v in dense.items()}
            if spec.bias:
                dense["linear.bias"] = projection.bias.shape
            projection.load(load_state_dict(checkpoint.folder / spec.dense, dense, dtype, device))
            model.load(load_state_dict(checkpoint.folder, expected, dtype, device))
            return cls(model, checkpoint.pooling, projection=projection)
        if head is None:
            model.load(load_state_dict(checkpoint.folder, expected, dtype, device))
            return cls(model, checkpoint.pooling)
        expected.update((k, v.shape) for k, v in head.state_dict().items())
        tensors = load_state_dict(checkpoint.folder, expected, dtype, device, heads=CLASSIFIER_PREFIXES)
        head.load({k: tensors.pop(k) for k in list(tensors) if k.startswith(CLASSIFIER_PREFIXES)})
        model.load(tensors)
        return cls(model, checkpoint.pooling, head)

    # --------------------------------------------------------------------------- device
    def on_device(self):
        """A context in which launches go to this engine's GPU (nothing on the CPU)."""
        if self.device.type == "cuda":
            return torch.cuda.device(self.device)
        return contextlib.nullcontext()

    # --------------------------------------------------------------------------- checks
    def check_ids(self, token_ids) -> list:
        """The inputs as flat sequences of ints inside the vocabulary and the position limit, or a
        clear error naming the first bad input."""
        if isinstance(token_ids, (str, bytes)):
            raise TypeError("token_ids must be a list of token-id sequences, not a string")
        seqs = list(token_ids)
        if self._ids_fast_check(seqs):
            return seqs
        return [self._check_one(i, s) for i, s in enumerate(seqs)]

    def _ids_fast_check(self, seqs) -> bool:
        """The common case in one pass: every input a non-empty list or tuple of Python (or numpy)
        ints, all in range. False when any is not, so that the per-input checks find and name it."""
        V, P = self.config.vocab_size, self.config.max_position_embeddings
        if not all(type(s) in (list, tuple) and s and type(s[0]) is not bool and len(s) <= P for s in seqs):
            return False
        if not seqs:
            return True
        flat = array.array("q")
        try:  # takes ints (and numpy ints) only: floats, None, nested lists raise
            for s in seqs:
                flat.fromlist(s) if type(s) is list else flat.extend(s)
        except (TypeError, OverflowError):
            return False
        values = np.frombuffer(flat, dtype=np.int64)
        return bool(values.min() >= 0 and values.max() < V)

    def _check_one(self, i: int, seq) -> list[int]:
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

    @staticmethod
    def nonfinite_rows(result: torch.Tensor) -> list[int]:
        """Rows of `result` holding a NaN or an infinity (waits for the device)."""
        return (~torch.isfinite(result).all(dim=1)).nonzero().flatten().tolist()

    def budget(self, max_batch_tokens: int | None) -> int:
        """Tokens per forward: the one given (a bad one is refused by the planner), or, for None,
        this engine's default for its device."""
        return self.max_batch_tokens if max_batch_tokens is None else max_batch_tokens

    def width(self, dim: int | None) -> int:
        """Features per pooled vector: `dim` when it is a whole number in 1..hidden_size, the full
        hidden_size for None; anything else is refused (0 is not "the default")."""
        hidden = self.config.hidden_size
        if dim is None:
            return hidden
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)):
            raise TypeError(f"dim must be an int or None, got {type(dim).__name__}")
        if not 1 <= dim <= hidden:
            raise ValueError(f"dim must be in 1..{hidden} (this model's hidden size), got {dim}")
        return int(dim)

    # --------------------------------------------------------------------------- the batch loop
    def embed(self, ids: Sequence[Sequence[int]], *, dim: int | None = None, normalize: bool = True,
              max_batch_tokens: int | None = None, batch_size: int | None = None,
              on_batch: Callable[[int, int], None] | None = None, out: torch.Tensor | None = None,
              check_finite: bool = True) -> torch.Tensor:
        """Sentence embeddings of `ids` (checked token-id lists, see `check_ids`): float32
        [len(ids), dim] on the device, in input order, pooled, sliced to `dim` (None: the hidden size;
        outside 1..hidden_size: refused) and normalised when `normalize`. Batches are planned longest
        first under `max_batch_tokens` tokens (None: the engine's `max_batch_tokens`, by device) and at
        most `batch_size` sequences. `on_batch(docs, tokens)` hears of each batch as it finishes, in
        plan order. `out`: a float32 [len(ids), dim] tensor on the device to fill instead of a new
        one. Non-finite rows raise `NonFiniteError` naming them, unless `check_finite` is False.

        Nothing here waits for the GPU (inputs go up through pinned memory, each batch's rows are
        scattered into place on the device), so while the GPU runs one batch the host packs the
        next; with `on_batch` the host stays at most RUN_AHEAD batches ahead, so that the counts
        are of batches computed, not merely queued."""
        dim = self.width(dim)

        def pooled(hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
            return self.ops.pool(hidden, batch, self.pooling, dim, normalize)

        return self._run(ids, dim, pooled, "embeddings", max_batch_tokens, batch_size, on_batch, out, check_finite)

    def score(self, ids: Sequence[Sequence[int]], *, max_batch_tokens: int | None = None,
              batch_size: int | None = None, on_batch: Callable[[int, int], None] | None = None,
              out: torch.Tensor | None = None, check_finite: bool = True) -> torch.Tensor:
        """A classifier's logits for `ids` (checked token-id lists; a pair is `[CLS] a [SEP] b
        [SEP]`): float32 [len(ids), num_labels] on the device, in input order, planned and packed
        as `embed` does (same options). Pooling is the head's (`classifier_pooling`), the head
        runs in float32. An engine without a head raises ValueError."""
        if self.head is None:
            raise ValueError("this model has no classifier head (it is an embedder): use embed")
        head = self.head

        def logits(hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
            return head(self.ops.pool(hidden, batch, head.pooling, None, False))

        return self._run(ids, head.spec.num_labels, logits, "logits", max_batch_tokens, batch_size, on_batch, out,
                         check_finite)

    def tokens(self, ids: Sequence[Sequence[int]], *, keep: Sequence[np.ndarray] | None = None,
               key_lengths: Sequence[int] | None = None, dim: int | None = None,
               max_batch_tokens: int | None = None, batch_size: int | None = None,
               on_batch: Callable[[int, int], None] | None = None, check_finite: bool = True
               ) -> tuple[torch.Tensor, np.ndarray]:
        """A late-interaction model's per-token vectors for `ids` (checked token-id lists): the
        projection head on every token's final-norm state, L2-normalised per token (`dim`: the
        first `dim` features, normalised; None: all). Returns (`out`, `offsets`): float32
        [K, dim] on the device and int64 [len(ids) + 1], input i's vectors being
        `out[offsets[i]:offsets[i + 1]]`, in token order. `keep[i]` (bool [len(ids[i])]): the
        tokens of input i to return (None: all of them). `key_lengths[i]`: only the first
        key_lengths[i] tokens of input i are attended to (ColBERT's query expansion with
        unattended [MASK] tokens; `Batch.key_lengths`). Planned and packed as `embed` does (same
        options); an engine without the head raises ValueError."""
        if self.projection is None:
            raise ValueError("this model has no per-token projection (it is not a late-interaction model)")
        head = self.projection
        width = head.spec.out_features if dim is None else dim
        if isinstance(width, bool) or not isinstance(width, (int, np.integer)) or not 1 <= width <= head.spec.out_features:
            raise ValueError(f"dim must be an int in 1..{head.spec.out_features}, got {dim!r}")
        lengths = np.fromiter((len(s) for s in ids), dtype=np.int64, count=len(ids))
        if keep is None:
            counts = lengths
        else:
            keep = [np.asarray(k, dtype=bool) for k in keep]
            if len(keep) != len(ids) or any(k.shape != (n,) for k, n in zip(keep, lengths)):
                raise ValueError("keep must hold one bool mask per input, as long as its token ids")
            counts = np.fromiter((int(k.sum()) for k in keep), dtype=np.int64, count=len(ids))
        offsets = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        out = torch.empty(int(offsets[-1]), int(width), dtype=torch.float32, device=self.device)

        def rows(hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
            vectors = head(hidden, int(width))
            return vectors if keep is None else vectors[upload(kept(batch.order), torch.int64, self.device)]

        def kept(order) -> np.ndarray:  # the batch's kept tokens, as packed rows
            starts = np.concatenate([[0], np.cumsum(lengths[list(order)])[:-1]])
            return np.concatenate([s + np.flatnonzero(keep[i]) for s, i in zip(starts, order)])

        def destination(order) -> np.ndarray:  # where each returned row of the batch lands in `out`
            return np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in order])

        self._run(ids, int(width), rows, "token vectors", max_batch_tokens, batch_size, on_batch, out, False,
                  destination=destination, key_lengths=key_lengths)
        if check_finite:
            bad = self.nonfinite_rows(out)
            if bad:  # rows -> the inputs they belong to
                inputs = sorted(set((np.searchsorted(offsets, bad, side="right") - 1).tolist()))
                raise NonFiniteError(inputs, self.dtype_name, "token vectors")
        return out, offsets

    def _run(self, ids, width: int, reduce: Callable[[torch.Tensor, Batch], torch.Tensor], what: str,
             max_batch_tokens, batch_size, on_batch, out, check_finite: bool,
             destination: Callable[[list[int]], np.ndarray] | None = None,
             key_lengths: Sequence[int] | None = None) -> torch.Tensor:
        """The batch loop: plan, pack, forward, `reduce(hidden, batch)` -> float32 [B, width] rows,
        scattered into `out` [len(ids), width] in input order (see `embed`). `destination(order)`:
        the rows of `out` that a batch's rows go to (None: one per input, `order`); `out` is then
        given, of any length. `key_lengths`: see `Batch.key_lengths`."""
        if destination is None:
            destination = np.asarray
            if out is None:
                out = torch.empty(len(ids), width, dtype=torch.float32, device=self.device)
            elif out.shape != (len(ids), width) or out.dtype != torch.float32 or out.device != self.device:
                raise ValueError(f"out must be float32 [{len(ids)}, {width}] on {self.device}, got "
                                 f"{out.dtype} {list(out.shape)} on {out.device}")
        if not ids:
            return out
        plan = plan_batches([len(s) for s in ids], self.budget(max_batch_tokens), batch_size)
        track = on_batch is not None and self.device.type == "cuda"
        pending: collections.deque = collections.deque()
        with self.on_device():
            for order in plan:
                batch = pack(ids, order, self.device, key_lengths)
                rows = reduce(self.model(batch), batch)
                out.index_copy_(0, upload(np.asarray(destination(order), dtype=np.int64), torch.int64, self.device), rows)
                if track:
                    event = torch.cuda.Event()
                    event.record()
                    pending.append((event, batch.num_seqs, batch.num_tokens))
                    if len(pending) > RUN_AHEAD:
                        event, n, t = pending.popleft()
                        event.synchronize()
                        on_batch(n, t)
                elif on_batch is not None:
                    on_batch(batch.num_seqs, batch.num_tokens)
            for event, n, t in pending:
                event.synchronize()
                on_batch(n, t)
            if check_finite:
                bad = self.nonfinite_rows(out)
                if bad:
                    raise NonFiniteError(bad, self.dtype_name, what)
        return out

    def hidden_states(self, ids: Sequence[Sequence[int]],
                      max_batch_tokens: int | None = None) -> list[torch.Tensor]:
        """Final-norm hidden states of checked token-id lists: one float32 CPU tensor
        [len_i, hidden] per input, in input order."""
        result: list[torch.Tensor | None] = [None] * len(ids)
        with self.on_device():
            for order in plan_batches([len(s) for s in ids], self.budget(max_batch_tokens)):
                batch = pack(ids, order, self.device)
                hidden = self.model(batch).float().cpu()
                for seq, piece in zip(batch.order, hidden.split(list(batch.lengths))):
                    result[seq] = piece
        return result


__all__ = ["Engine", "NonFiniteError", "RUN_AHEAD"]
