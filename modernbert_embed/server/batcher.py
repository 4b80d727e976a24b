"""The one worker that owns a model's engine: a bounded queue of requests, packed together into
forwards. A server of several models has one of these per model.

```
handlers (event loop) ── submit(ids) ──► queue (bounded by tokens) ──► worker thread ──► Engine.embed
        ▲                                                                   │          (or .score)
        └──────────── future resolved with the request's own rows ◄─────────┘
```

For an embedder the worker runs `Engine.embed`; for a classifier (an engine with a head: rerankers
and classifiers) `Engine.score`, and each request gets its float32 logits [n, num_labels] (a pair
is already `[CLS] a [SEP] b [SEP]` ids), packed under the same token budget: the pairs of many
rerank requests share forwards as texts do. For a multi-vector (ColBERT) model (an engine with a
per-token projection) `Engine.tokens`: each request gets its `TokenRows`, one float32 [n_i, dim]
matrix per input. Its inputs carry what `MultiVectorEncoder.tokenize` gave them: the tokens to
return (`keep`: a document's skiplist left out) and the tokens attended to (`key_lengths`: a query
expanded with unattended [MASK]s); queries and documents of many requests share forwards, each
input keeping its own.

Whenever the worker is free it takes the queued requests, small ones first (so that a query never
waits behind a queue of long documents; `_take`), then first come first served, up to
`max_batch_tokens` tokens (at least one request, however large), and runs ONE `Engine.embed` over
all their inputs: the engine sorts them by length and packs them under the same budget, so 64
clients with one short text each become one forward, not 64. There is no wait timer: at low load a
request waits for nothing but the forward in progress. The engine returns raw pooled rows
(`normalize=False`, all features); each request then gets its own rows, sliced to its dimensions
and normalised (Matryoshka: slice, then normalise), in its input order.

Admission is bounded by the tokens waiting in the queue: a request that would take it past
`max_queued_tokens` is refused with `Overloaded` (a 429 with Retry-After, estimated from the
measured throughput), never queued without bound. A request whose client has gone is taken out of
the queue (`cancel`), and a request cancelled while its forward runs is simply not answered. A
non-finite row fails only the request it belongs to; any other engine failure fails the requests
of that forward, and the worker carries on.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from ..engine import Engine, NonFiniteError
from ..matryoshka import slice_normalize

log = logging.getLogger("modernbert_embed.server")
# Requests of at most this many tokens go first (a query, a sentence): see `Batcher._take`.
SMALL_REQUEST_TOKENS = 256


class Overloaded(Exception):
    """The queue is full; `retry_after` is the estimated seconds until it has room."""

    def __init__(self, retry_after: int, queued_tokens: int, limit: int):
        self.retry_after = retry_after
        super().__init__(f"the server is overloaded ({queued_tokens} tokens queued, limit {limit}); "
                         f"retry in {retry_after} s")


class Closed(Exception):
    """The worker has stopped: no more work is taken."""


@dataclass
class TokenRows:
    """A multi-vector request's answer: float32 [K, dim] token vectors, input i's being
    `vectors[offsets[i]:offsets[i + 1]]`."""

    vectors: np.ndarray
    offsets: np.ndarray

    @property
    def size(self) -> int:
        return self.vectors.size

    def split(self) -> list[np.ndarray]:
        return np.split(self.vectors, self.offsets[1:-1])


@dataclass(eq=False)
class Job:
    """One request's inputs, waiting for (or in) a forward."""

    ids: list
    dim: int
    normalize: bool
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    tokens: int = 0
    enqueued: float = field(default_factory=time.perf_counter)
    started: float = 0.0  # when its forward began
    finished: float = 0.0
    state: str = "queued"  # queued -> running -> done, or cancelled
    keep: list | None = None  # a multi-vector model: per input, the tokens returned (None: all)
    key_lengths: list | None = None  # per input, the tokens attended to (None: all)


class Batcher:
    """The queue and the worker thread. `submit` and `cancel` are called from the event loop,
    everything else in here runs on the worker."""

    def __init__(self, engine: Engine, max_batch_tokens: int, max_queued_tokens: int, metrics=None,
                 model: str = ""):
        self.engine = engine
        self.model = model  # the metrics' `model` label
        self.scores = getattr(engine, "head", None) is not None  # a classifier: logits, not embeddings
        self.vectors = getattr(engine, "projection", None) is not None  # a multi-vector model: token vectors
        self.max_batch_tokens = int(max_batch_tokens)
        self.max_queued_tokens = int(max_queued_tokens)
        self.metrics = metrics
        self._cond = threading.Condition()
        self._queue: collections.deque[Job] = collections.deque()
        self._queued_tokens = 0
        self._running_tokens = 0
        self._closed = False
        self._owed = False  # the next forward starts with the oldest request (see `_take`)
        self._rate = 0.0  # tokens/s of recent forwards (an exponential average)
        self.forwards = 0  # Engine.embed (or .score) calls made
        self._thread = threading.Thread(target=self._run, name="modernbert-embed-worker", daemon=True)

    # --------------------------------------------------------------------------- state
    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._closed

    @property
    def queued_tokens(self) -> int:
        return self._queued_tokens

    @property
    def queued_requests(self) -> int:
        return len(self._queue)

    @property
    def tokens_in_flight(self) -> int:
        """Tokens admitted and not yet answered: queued plus in the forward running now."""
        return self._queued_tokens + self._running_tokens

    def retry_after(self, tokens: int = 0) -> int:
        """Seconds until `tokens` more would likely fit, from the measured throughput (1..120)."""
        if self._rate <= 0:
            return 1
        return int(min(120, max(1, math.ceil((self._queued_tokens + tokens) / self._rate))))

    def check_room(self, tokens: int = 0) -> None:
        """Refuse early (before tokenising) when even `tokens` more would not fit."""
        if self._queued_tokens + tokens > self.max_queued_tokens or self._closed:
            if self._closed:
                raise Closed("the server is shutting down")
            raise Overloaded(self.retry_after(tokens), self._queued_tokens, self.max_queued_tokens)

    # --------------------------------------------------------------------------- event-loop side
    def submit(self, ids: list, dim: int, normalize: bool, keep: list | None = None,
               key_lengths: list | None = None) -> Job:
        """Queue one request's checked token ids; its future gets float32 [len(ids), dim] (a
        multi-vector model: `TokenRows`, with `keep` and `key_lengths` per input as
        `Engine.tokens` takes them, None entries meaning all)."""
        loop = asyncio.get_running_loop()
        job = Job(ids=ids, dim=dim, normalize=normalize, future=loop.create_future(), loop=loop,
                  tokens=sum(len(s) for s in ids), keep=keep, key_lengths=key_lengths)
        with self._cond:
            self.check_room(job.tokens)
            self._queue.append(job)
            self._queued_tokens += job.tokens
            self._cond.notify()
        return job

    def cancel(self, job: Job) -> bool:
        """Drop `job` (its client has gone): out of the queue if it is still there, and never
        answered. True when it had not run yet."""
        with self._cond:
            was_queued = job.state == "queued"
            if was_queued:
                self._queue.remove(job)
                self._queued_tokens -= job.tokens
            if job.state != "done":
                job.state = "cancelled"
        if was_queued and self.metrics is not None:
            self.metrics.dropped.labels(reason="client_disconnected", model=self.model).inc()
        return was_queued

    def close(self, timeout: float | None = None) -> None:
        """Stop taking work; what is still queued fails with `Closed`. Waits up to `timeout` for
        the forward in progress."""
        with self._cond:
            self._closed = True
            left = list(self._queue)
            self._queue.clear()
            self._queued_tokens = 0
            self._cond.notify_all()
        for job in left:
            job.state = "done"
            self._resolve(job, error=Closed("the server is shutting down"))
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # --------------------------------------------------------------------------- worker side
    def _take(self) -> list[Job] | None:
        """The queued requests for one forward, up to the token budget (at least one); None when
        closed. Small requests (at most SMALL_REQUEST_TOKENS) first, then the rest oldest first;
        after a forward that passed over an older request, the next one is oldest first, so that
        a large request waits for at most one forward more than in order, and a small one for the
        forward in progress and at most one other."""
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            jobs: list[Job] = []
            tokens = 0
            if self._owed:  # the last forward passed over an older request: oldest first now
                self._owed = False
            else:  # small requests first, so that they never wait behind a queue of large ones
                rest: collections.deque[Job] = collections.deque()
                for job in self._queue:
                    if job.tokens <= SMALL_REQUEST_TOKENS and tokens + job.tokens <= self.max_batch_tokens:
                        job.state = "running"
                        jobs.append(job)
                        tokens += job.tokens
                    else:
                        rest.append(job)
                self._queue = rest
            while self._queue and (not jobs or tokens + self._queue[0].tokens <= self.max_batch_tokens):
                job = self._queue.popleft()
                job.state = "running"
                jobs.append(job)
                tokens += job.tokens
            self._owed = bool(self._queue) and self._queue[0].enqueued < jobs[-1].enqueued
            self._queued_tokens -= tokens
            self._running_tokens = tokens
            return jobs

    def _run(self) -> None:
        while True:
            jobs = self._take()
            if jobs is None:
                return
            try:
                self._process(jobs)
            except Exception as e:  # never let the worker die with requests waiting
                log.exception("the worker failed on a forward of %d request(s)", len(jobs))
                for job in jobs:
                    self._finish(job, error=e)
            finally:
                with self._cond:
                    self._running_tokens = 0

    def _process(self, jobs: list[Job]) -> None:
        start = time.perf_counter()
        ids = [seq for job in jobs for seq in job.ids]
        if self.metrics is not None:
            queue = self.metrics.queue_seconds.labels(self.model)
            for job in jobs:
                queue.observe(start - job.enqueued)
        on_batch = self.metrics.forward_observer(self.model) if self.metrics is not None else None
        for job in jobs:
            job.started = start
        if self.vectors:
            return self._process_tokens(jobs, ids, start, on_batch)
        if self.scores:
            result = self.engine.score(ids, max_batch_tokens=self.max_batch_tokens, on_batch=on_batch,
                                       check_finite=False)
        else:
            result = self.engine.embed(ids, dim=None, normalize=False, max_batch_tokens=self.max_batch_tokens,
                                       on_batch=on_batch, check_finite=False)
        rows = result.cpu().numpy()
        self._measured(jobs, start)
        finite = np.isfinite(rows).all(axis=1)
        at = 0
        for job in jobs:
            mine = rows[at:at + len(job.ids)]
            ok = finite[at:at + len(job.ids)]
            at += len(job.ids)
            if not ok.all():
                self._finish(job, error=NonFiniteError(np.flatnonzero(~ok).tolist(), self.engine.dtype_name))
                continue
            # float32 like `rows`, and a copy: the request owns it
            self._finish(job, result=mine.copy() if self.scores else slice_normalize(mine, job.dim, job.normalize))

    def _measured(self, jobs: list[Job], start: float) -> None:
        self.forwards += 1
        elapsed = time.perf_counter() - start
        tokens = sum(job.tokens for job in jobs)
        rate = tokens / max(elapsed, 1e-6)
        self._rate = rate if self._rate == 0 else 0.7 * self._rate + 0.3 * rate

    def _process_tokens(self, jobs: list[Job], ids: list, start: float, on_batch) -> None:
        """One `Engine.tokens` over every job's inputs, each input with its own kept tokens and
        key lengths (an input without is given all of its tokens: the same vectors)."""
        keep = keys = None
        if any(job.keep is not None for job in jobs):
            keep = [k if k is not None else np.ones(len(s), dtype=bool)
                    for job in jobs for s, k in zip(job.ids, job.keep or [None] * len(job.ids))]
        if any(job.key_lengths is not None for job in jobs):
            keys = [n if n is not None else len(s)
                    for job in jobs for s, n in zip(job.ids, job.key_lengths or [None] * len(job.ids))]
        out, offsets = self.engine.tokens(ids, keep=keep, key_lengths=keys, dim=self.engine.projection.spec.truncate_dim,
                                          max_batch_tokens=self.max_batch_tokens, on_batch=on_batch,
                                          check_finite=False)
        vectors = out.cpu().numpy()
        self._measured(jobs, start)
        at = 0
        for job in jobs:
            n = len(job.ids)
            a, b = int(offsets[at]), int(offsets[at + n])
            mine = vectors[a:b].copy()  # the request owns it
            local = offsets[at:at + n + 1] - a
            at += n
            finite = np.isfinite(mine).all(axis=1)
            if not finite.all():
                bad = sorted(set((np.searchsorted(local, np.flatnonzero(~finite), side="right") - 1).tolist()))
                self._finish(job, error=NonFiniteError(bad, self.engine.dtype_name))
                continue
            self._finish(job, result=TokenRows(mine, local))

    def _finish(self, job: Job, result=None, error: Exception | None = None) -> None:
        with self._cond:
            if job.state == "cancelled":
                return
            job.state = "done"
        job.finished = time.perf_counter()
        self._resolve(job, result, error)

    @staticmethod
    def _resolve(job: Job, result=None, error: Exception | None = None) -> None:
        def settle():
            if job.future.done():  # the handler gave up waiting (its client went away)
                return
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(result)

        try:
            job.loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the event loop has closed: nobody is waiting any more
            pass


__all__ = ["Batcher", "Job", "TokenRows", "Overloaded", "Closed"]
