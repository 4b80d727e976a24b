"""What the routes share: the served models (each with its own worker, queue and limits), the
server-wide limits, the readiness flags, the warm-up and what `/info` says.

Several models may be served at once (an embedder and a reranker is the usual pair). A request's
`model` field picks one by name (`ServerState.pick`): with one model loaded any name is accepted
(clients hard-code names); with several, an unknown name is a 404 `model_not_found`. Without the
field, the route's only model that can do it is used. A route asked of a model that cannot do it
is a 4xx naming the model's kind. What a model can do is its set of `tasks`: an embedder's
`embed`, a classifier's `classify` (and `rerank` with one label), a multi-vector (ColBERT) model's
`embed_tokens` (per-token vectors on /v1/embeddings) and `rerank` (by MaxSim); a route may accept
several tasks (/v1/embeddings: `embed` or `embed_tokens`)."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from .. import __version__
from ..loaded import as_loaded
from ..multivector import MultiVectorEncoder
from ..tokenizer import PROMPTS
from ..weights import CLASSIFIER, EMBEDDER, MULTIVECTOR
from . import schemas
from .batcher import Batcher
from .errors import ApiError, quote
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


# What the routes ask of a model, in words for the error that refuses a model that cannot.
TASKS = {"embed": "an embedder", "rerank": "a reranker (a cross-encoder with one label, or a multi-vector model)",
         "classify": "a classifier (a cross-encoder)", "tokenize": "a model with a tokenizer",
         "embed_tokens": "a multi-vector (ColBERT) model"}


class ServedModel:
    """One served model: its `LoadedModel` (`loaded`), the name requests use (`name`, and the
    `aliases` they may use), its limits (`settings`, resolved for it, and `limits`), and its own
    worker and queue (`batcher`)."""

    def __init__(self, model, name: str, settings: ServerSettings, metrics: Metrics, aliases=()):
        self.loaded = model = as_loaded(model)
        self.engine = model.engine
        self.tokenizer = model.tokenizer
        self.kind = model.kind
        cfg = self.engine.config
        self.settings = settings = settings.check(cfg.max_position_embeddings,
                                                  min(model.max_seq_length, cfg.max_position_embeddings),
                                                  self.engine.max_batch_tokens)
        self.name = name
        self.aliases = frozenset({name, *aliases})
        specials = tuple(sorted({cfg.cls_token_id, cfg.sep_token_id, cfg.pad_token_id}))
        self.limits = schemas.Limits(
            hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size, cls_id=cfg.cls_token_id,
            sep_id=cfg.sep_token_id, special_ids=specials, max_client_batch_size=settings.max_client_batch_size,
            max_input_tokens=settings.max_input_tokens, auto_truncate=settings.auto_truncate)
        self.batcher = Batcher(self.engine, settings.max_batch_tokens, settings.max_queued_tokens, metrics, name)
        if self.kind == CLASSIFIER:
            spec = self.engine.head.spec
            self.num_labels = spec.num_labels
            self.labels = [spec.id2label.get(i, f"LABEL_{i}") for i in range(spec.num_labels)]
            self.tasks = frozenset({"classify", "tokenize"} | ({"rerank"} if spec.num_labels == 1 else set()))
        elif self.kind == MULTIVECTOR:  # per-token vectors of queries and documents, MaxSim reranking
            self.num_labels, self.labels = 0, []
            self.vectors = MultiVectorEncoder(model)  # its tokenisation (prefixes, expansion, skiplist)
            self.tasks = frozenset({"embed_tokens", "rerank", "tokenize"})
        else:
            self.num_labels, self.labels = 0, []
            self.tasks = frozenset({"embed", "tokenize"})
        self.ready = False

    @property
    def what(self) -> str:
        """The model's kind in words."""
        if self.kind == EMBEDDER:
            return "an embedder"
        if self.kind == MULTIVECTOR:
            return "a multi-vector (ColBERT) model"
        if self.num_labels == 1:
            return "a reranker (a cross-encoder with one label)"
        return f"a classifier with {self.num_labels} labels"

    @property
    def model_type(self) -> dict:
        """TEI's `model_type` of /info."""
        if self.kind == EMBEDDER:
            return {"embedding": {"pooling": self.engine.pooling}}
        if self.kind == MULTIVECTOR:
            v = self.vectors
            return {"multi_vector": {"dim": v.get_embedding_dimension(), "query_length": v.query_length,
                                     "document_length": v.document_length,
                                     "do_query_expansion": v.do_query_expansion,
                                     "attend_to_expansion_tokens": v.attend_to_expansion_tokens}}
        labels = {"id2label": {str(i): name for i, name in enumerate(self.labels)},
                  "label2id": {name: i for i, name in enumerate(self.labels)}}
        return {"reranker" if self.num_labels == 1 else "classifier": labels}

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


def _aliases(name: str) -> tuple[str, ...]:
    """Other names a model given as a folder path answers to: the folder's last component."""
    tail = os.path.basename(os.path.normpath(name)) if name else ""
    return (tail,) if tail and tail != name else ()


class ServerState:
    """What the routes share: the served models (`models`, in the order given; the first is
    `primary`), the server-wide limits, the flags."""

    def __init__(self, model, settings: ServerSettings):
        given = list(model) if isinstance(model, (list, tuple)) else [model]
        if not given:
            raise ValueError("no model to serve")
        names = settings.served_model_name
        if isinstance(names, (list, tuple)):
            if len(names) != len(given):
                raise ValueError(f"--served-model-name was given {len(names)} time(s) for {len(given)} model(s): "
                                 "give one name per --model, in the same order, or none")
            names = list(names)
        else:
            if names is not None and len(given) > 1:
                raise ValueError(f"one --served-model-name for {len(given)} models: give one name per --model, "
                                 "in the same order, or none")
            names = [names] * len(given)
        for n in names:
            if n == "":
                raise ValueError("served_model_name is empty; leave it unset for the model's name")
        self.metrics = Metrics()
        self.models: list[ServedModel] = []
        for m, n in zip(given, names):
            loaded = as_loaded(m)
            name = n or loaded.name or "modernbert-embed"
            one = replace(settings, served_model_name=None)
            self.models.append(ServedModel(loaded, name, one, self.metrics, () if n else _aliases(name)))
        self.by_name: dict[str, ServedModel] = {}
        for m in self.models:
            if m.name in self.by_name:
                raise ValueError(f"two models are served as {m.name!r}: give each its own --served-model-name")
            self.by_name[m.name] = m
        shared = {}  # a folder's last component, when no other model has that name or component
        for m in self.models:
            for alias in m.aliases - {m.name}:
                shared.setdefault(alias, []).append(m)
        for alias, ms in shared.items():
            if len(ms) == 1 and alias not in self.by_name:
                self.by_name[alias] = ms[0]
        primary = self.primary = self.models[0]
        # the first model's view, as with one model: its limits are the server's
        self.model, self.engine, self.tokenizer = primary.loaded, primary.engine, primary.tokenizer
        self.settings, self.limits, self.batcher = primary.settings, primary.limits, primary.batcher
        self.model_name = primary.name
        self.metrics.watch({m.name: m.batcher for m in self.models}, self)
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
        self.ready = False  # every model warmed up
        self.failed = False  # a warm-up forward failed
        self.draining = False
        self.in_flight = 0

    # --------------------------------------------------------------------------- which model
    def pick(self, name, task, route: str) -> ServedModel:
        """The model a request names (`name`, its `model` field; None when absent) for `task` (a
        key of TASKS, or a tuple of them: any one will do), or an ApiError: a 404 for a name not served (with several models), a 400
        without a name when no model or several can do it, a 4xx naming the kind of a model that
        cannot."""
        tasks = (task,) if isinstance(task, str) else tuple(task)
        needs = " or ".join(TASKS[t] for t in tasks)
        if name is not None and not isinstance(name, str):
            raise ApiError("validation", f"`model` must be a string, got {schemas.json_type(name)}", "model")
        if name is not None:
            if len(self.models) == 1:  # any name: clients hard-code theirs
                model = self.models[0]
            else:
                model = self.by_name.get(name)
                if model is None:
                    raise ApiError("model_not_found", f"the model {quote(name)} is not served here; served: "
                                                      f"{[m.name for m in self.models]}", "model")
        else:
            able = [m for m in self.models if m.tasks.intersection(tasks)]
            if len(able) == 1 or (able and tasks == ("tokenize",)):
                return able[0]
            if len(able) > 1:
                raise ApiError("validation", f"{len(able)} served models can answer {route} "
                                             f"({[m.name for m in able]}): name one in `model`", "model")
            model = self.models[0]
            if len(self.models) > 1:
                served = ", ".join(f"{m.name!r} ({m.what})" for m in self.models)
                raise ApiError("wrong_model", f"{route} needs {needs}, and no served model is one: {served}",
                               "model")
        if not model.tasks.intersection(tasks):
            raise ApiError("wrong_model", f"the model {model.name!r} is {model.what}: {route} needs {needs}",
                           "model")
        return model

    # --------------------------------------------------------------------------- limits
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
    def workers_alive(self) -> bool:
        return all(m.batcher.alive for m in self.models)

    @property
    def is_ready(self) -> bool:
        return self.ready and not self.draining and self.workers_alive

    def begin_drain(self) -> None:
        """Readiness turns 503 and new work is refused; requests in flight complete."""
        if not self.draining:
            log.info("draining: %d request(s) in flight", self.in_flight)
        self.draining = True

    def start(self) -> None:
        for m in self.models:
            m.batcher.start()

    def close(self, timeout: float) -> None:
        for m in self.models:
            m.batcher.close(timeout=timeout)

    def warmup_ids(self) -> list[list[int]]:
        return self.primary.warmup_ids()

    async def warm_up(self) -> None:
        try:
            loop = asyncio.get_running_loop()
            for m in self.models:
                ckpt = m.loaded.checkpoint
                if ckpt is not None:  # hash the weights once, off the event loop, before /info needs it
                    await loop.run_in_executor(self.pool, lambda: ckpt.fingerprint)
                if m.tokenizer is not None:  # make the tokenizer of this length before the first request
                    await loop.run_in_executor(self.pool, m.tokenizer.encode, ["warm up"], "",
                                               m.limits.max_input_tokens)
                job = m.batcher.submit(m.warmup_ids(), m.limits.hidden_size, True)
                await job.future
                m.ready = True
                log.info("ready: %s (%s) on %s (%s)", m.name, m.what, m.engine.device, m.engine.dtype_name)
            self.ready = True
        except asyncio.CancelledError:
            raise
        except Exception:
            self.failed = True
            log.exception("the warm-up forward failed; the server stays unready")

    def info(self, model: ServedModel | None = None) -> dict:
        """TEI's `/info` of one model (default: the first), with this server's limits; with several
        models, the first's also lists every model's under `models`."""
        m = model or self.primary
        s, lim, cfg = m.settings, m.limits, m.engine.config
        ckpt = m.loaded.checkpoint
        out = {
            "model_id": m.loaded.name, "model_sha": ckpt.revision if ckpt else None,
            "model_fingerprint": ckpt.fingerprint if ckpt else None, "served_model_name": m.name,
            "model_dtype": m.engine.dtype_name, "device": str(m.engine.device),
            "ops": m.engine.ops.name, "model_type": m.model_type,
            "hidden_size": lim.hidden_size, "vocab_size": cfg.vocab_size,
            "max_input_length": lim.max_input_tokens, "max_batch_tokens": s.max_batch_tokens,
            "max_client_batch_size": s.max_client_batch_size, "max_queued_tokens": s.max_queued_tokens,
            "payload_limit": s.payload_limit, "max_concurrent_requests": s.max_concurrent_requests,
            "max_bytes_in_flight": s.max_bytes_in_flight, "auto_truncate": s.auto_truncate,
            "tokenization_workers": self.tokenization_workers, "routes": sorted(m.tasks),
            "token_ids": TOKEN_IDS_NOTE, "version": __version__,
        }
        if m.kind == EMBEDDER:
            # modernbert-embed was trained with Matryoshka at 768 and 256 dimensions; any 1..hidden is accepted
            trained = sorted({lim.hidden_size, 256} & set(range(1, lim.hidden_size + 1)), reverse=True)
            out.update({"prompts": dict(PROMPTS), "input_types": dict(schemas.INPUT_TYPES),
                        "matryoshka_dimensions": trained, "dimensions_range": [1, lim.hidden_size],
                        "encoding_formats": list(schemas.ENCODING_FORMATS)})
        elif m.kind == MULTIVECTOR:
            out.update({"input_types": ["query", "document"], "encoding_formats": list(schemas.ENCODING_FORMATS),
                        "max_documents": s.max_client_batch_size, "base64_layout": schemas.TOKENS_B64_LAYOUT})
        else:
            out.update({"num_labels": m.num_labels, "labels": list(m.labels),
                        "max_documents": s.max_client_batch_size})
        if model is None and len(self.models) > 1:
            out["models"] = [self.info(x) for x in self.models]
        return out


__all__ = ["ServerState", "ServedModel", "TASKS", "PUBLIC_PATHS", "TOKEN_IDS_NOTE"]
