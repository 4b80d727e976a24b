"""What the routes share: the model and its worker, the limits, the readiness flags, the warm-up
and what `/info` says."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from .. import __version__
from ..loaded import as_loaded, require
from ..tokenizer import PROMPTS
from ..weights import EMBEDDER
from . import schemas
from .batcher import Batcher
from .errors import ApiError
from .metrics import Metrics
from .settings import ServerSettings

log = logging.getLogger("modernbert_embed.server")

PUBLIC_PATHS = ("/health", "/ready", "/metrics")  # open without the API key; not counted as work
# Requests with bodies of more bytes than this are parsed, tokenised and answered on the large lane.
LARGE_BODY = 64 * 1024
LARGE_LANE_NICE = 10
TOKEN_IDS_NOTE = "token-id inputs are this model's ids WITHOUT [CLS]/[SEP]; the server adds them"


def _lower_priority() -> None:
    """A large-lane thread yields the cores to the model: with more busy threads than cores, the
    model's OpenMP team waits at every op for a thread the kernel has descheduled (a one-word
    forward took 0.5-1.9 s instead of 5 ms on 2 cores beside a large tokenising). Linux: a
    thread's nice value is its own."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LARGE_LANE_NICE)
    except (AttributeError, OSError):  # not Linux, or not allowed: the default priority
        pass


class ServerState:
    """What the routes share: the model, the worker, the limits, the flags."""

    def __init__(self, model, settings: ServerSettings):
        self.model = model = as_loaded(model)  # the loaded model (an Embedder's, or given as such)
        if model.checkpoint is not None:
            require(model.checkpoint, EMBEDDER)  # the embedding routes need an embedder
        self.engine = model.engine
        self.tokenizer = model.tokenizer
        cfg = self.engine.config
        self.settings = settings = settings.check(cfg.max_position_embeddings,
                                                  min(model.max_seq_length, cfg.max_position_embeddings),
                                                  self.engine.max_batch_tokens)
        self.model_name = settings.served_model_name or model.name or "modernbert-embed"
        specials = tuple(sorted({cfg.cls_token_id, cfg.sep_token_id, cfg.pad_token_id}))
        self.limits = schemas.Limits(
            hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size, cls_id=cfg.cls_token_id,
            sep_id=cfg.sep_token_id, special_ids=specials, max_client_batch_size=settings.max_client_batch_size,
            max_input_tokens=settings.max_input_tokens, auto_truncate=settings.auto_truncate)
        self.metrics = Metrics()
        self.batcher = Batcher(self.engine, settings.max_batch_tokens, settings.max_queued_tokens, self.metrics)
        self.metrics.watch(self.batcher, self)
        self.tokenization_workers = (min(4, os.cpu_count() or 1) if settings.tokenization_workers is None
                                     else settings.tokenization_workers)
        # two lanes of threads beside the model: small requests never queue behind large ones (whose
        # parsing, tokenising and answers take their own lane's threads, and no more of them at once)
        self.pool = ThreadPoolExecutor(self.tokenization_workers, thread_name_prefix="modernbert-embed-tokenize")
        # half the threads: a large batch is tokenised on every core by the Rust tokenizer itself,
        # and each thread can hold one large text's tokenising at once (up to ~250 MB for 2 MB)
        self.large_pool = ThreadPoolExecutor(max(1, self.tokenization_workers // 2), initializer=_lower_priority,
                                             thread_name_prefix="modernbert-embed-tokenize-large")
        self.bytes_in_flight = 0  # request and response bodies held by the requests being handled
        self.created = int(time.time())
        self.ready = False  # warmed up
        self.failed = False  # the warm-up forward failed
        self.draining = False
        self.in_flight = 0

    def hold_bytes(self, held: list, n: int) -> None:
        """Count `n` more bytes for one request (`held[0]`, released by `release_bytes` when it
        ends), or refuse it with a 429 when the server would hold more than its limit. Event loop only."""
        limit = self.settings.max_bytes_in_flight
        if self.bytes_in_flight + n > limit:
            raise ApiError("overloaded", f"the server is overloaded (holding {self.bytes_in_flight} bytes of "
                                         f"requests and answers, limit {limit}); retry in 1 s",
                           headers={"Retry-After": "1"})
        self.bytes_in_flight += n
        held[0] += n

    def release_bytes(self, held: list) -> None:
        self.bytes_in_flight -= held[0]
        held[0] = 0

    def lane(self, size: int) -> ThreadPoolExecutor:
        """The threads for a request of `size` body bytes."""
        return self.large_pool if size > LARGE_BODY else self.pool

    @property
    def is_ready(self) -> bool:
        return self.ready and not self.draining and self.batcher.alive

    def begin_drain(self) -> None:
        """Readiness turns 503 and new work is refused; requests in flight complete."""
        if not self.draining:
            log.info("draining: %d request(s) in flight", self.in_flight)
        self.draining = True

    def warmup_ids(self) -> list[list[int]]:
        """One forward's worth of inputs: the full token budget on a GPU (so that an out-of-memory
        shows before the server says it is ready), a short input on the CPU."""
        s, lim = self.settings, self.limits
        total = s.warmup_tokens
        if total is None:
            total = s.max_batch_tokens if self.engine.device.type == "cuda" else 128
        total = max(2, min(total, s.max_queued_tokens))
        n = max(2, min(lim.max_input_tokens, total))
        body = next(i for i in range(lim.vocab_size) if i not in lim.special_ids)
        return [[lim.cls_id] + [body] * (n - 2) + [lim.sep_id] for _ in range(max(1, total // n))]

    async def warm_up(self) -> None:
        try:
            loop, ckpt = asyncio.get_running_loop(), self.model.checkpoint
            if ckpt is not None:  # hash the weights once, off the event loop, before /info needs it
                await loop.run_in_executor(self.pool, lambda: ckpt.fingerprint)
            if self.tokenizer is not None:  # make the tokenizer of this length before the first request
                await loop.run_in_executor(self.pool, self.tokenizer.encode, ["warm up"], "",
                                           self.limits.max_input_tokens)
            job = self.batcher.submit(self.warmup_ids(), self.limits.hidden_size, True)
            await job.future
            self.ready = True
            log.info("ready: %s on %s (%s)", self.model_name, self.engine.device, self.engine.dtype_name)
        except asyncio.CancelledError:
            raise
        except Exception:
            self.failed = True
            log.exception("the warm-up forward failed; the server stays unready")

    def info(self) -> dict:
        s, lim, cfg = self.settings, self.limits, self.engine.config
        ckpt = self.model.checkpoint
        # modernbert-embed was trained with Matryoshka at 768 and 256 dimensions; any 1..hidden is accepted
        trained = sorted({lim.hidden_size, 256} & set(range(1, lim.hidden_size + 1)), reverse=True)
        return {
            "model_id": self.model.name, "model_sha": ckpt.revision if ckpt else None,
            "model_fingerprint": ckpt.fingerprint if ckpt else None, "served_model_name": self.model_name,
            "model_dtype": self.engine.dtype_name, "device": str(self.engine.device),
            "ops": self.engine.ops.name, "model_type": {"embedding": {"pooling": self.engine.pooling}},
            "hidden_size": lim.hidden_size, "vocab_size": cfg.vocab_size,
            "max_input_length": lim.max_input_tokens, "max_batch_tokens": s.max_batch_tokens,
            "max_client_batch_size": s.max_client_batch_size, "max_queued_tokens": s.max_queued_tokens,
            "payload_limit": s.payload_limit, "max_concurrent_requests": s.max_concurrent_requests,
            "max_bytes_in_flight": s.max_bytes_in_flight, "auto_truncate": s.auto_truncate,
            "tokenization_workers": self.tokenization_workers, "prompts": dict(PROMPTS),
            "input_types": dict(schemas.INPUT_TYPES), "matryoshka_dimensions": trained,
            "dimensions_range": [1, lim.hidden_size], "encoding_formats": list(schemas.ENCODING_FORMATS),
            "token_ids": TOKEN_IDS_NOTE, "version": __version__,
        }


__all__ = ["ServerState", "PUBLIC_PATHS", "TOKEN_IDS_NOTE"]
