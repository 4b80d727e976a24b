"""Prometheus metrics of one server, in a registry of its own (so that several servers in one
process, as in the tests, never share counters).

What TEI exports, plus what its users miss: truncations, rejections by reason, dropped work,
tokens in flight. Names start with `modernbert_embed_`; durations are in seconds. With several
models served, what concerns one model carries its name in a `model` label (inputs, tokens,
truncations, dropped work, queue times, forwards, and its queue's gauges); the unlabelled gauges
are the server's totals.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

PREFIX = "modernbert_embed_"
_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TOKENS = tuple(float(2 ** k) for k in range(2, 21))  # 4 .. 1M
_INPUTS = tuple(float(2 ** k) for k in range(0, 13))  # 1 .. 4096


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(PREFIX + "requests", "HTTP requests answered, by route and status code",
                                ["route", "status"], registry=r)
        self.request_seconds = Histogram(PREFIX + "request_duration_seconds", "Time from request to response",
                                         ["route"], buckets=_SECONDS, registry=r)
        self.inputs = Counter(PREFIX + "inputs", "Inputs embedded or scored (texts, pairs and token-id lists)",
                              ["route", "model"], registry=r)
        self.tokens = Counter(PREFIX + "tokens", "Tokens embedded or scored ([CLS] and [SEP] included)",
                              ["route", "model"], registry=r)
        self.truncations = Counter(PREFIX + "truncated_inputs", "Inputs cut to the input token limit",
                                   ["route", "model"], registry=r)
        self.rejections = Counter(PREFIX + "rejections", "Requests refused, by reason", ["reason"], registry=r)
        self.dropped = Counter(PREFIX + "dropped_requests", "Admitted requests dropped before their forward",
                               ["reason", "model"], registry=r)
        self.queue_seconds = Histogram(PREFIX + "queue_duration_seconds", "Time from admission to the forward",
                                       ["model"], buckets=_SECONDS, registry=r)
        self.tokenize_seconds = Histogram(PREFIX + "tokenization_duration_seconds", "Time spent tokenising "
                                          "a request", buckets=_SECONDS, registry=r)
        self.batch_tokens = Histogram(PREFIX + "batch_tokens", "Tokens per forward", ["model"], buckets=_TOKENS,
                                      registry=r)
        self.batch_inputs = Histogram(PREFIX + "batch_inputs", "Inputs per forward", ["model"], buckets=_INPUTS,
                                      registry=r)
        self.tokens_in_flight = Gauge(PREFIX + "tokens_in_flight", "Tokens admitted and not yet answered",
                                      registry=r)
        self.queued_tokens = Gauge(PREFIX + "queued_tokens", "Tokens waiting for a forward", registry=r)
        self.queued_requests = Gauge(PREFIX + "queued_requests", "Requests waiting for a forward", registry=r)
        self.requests_in_flight = Gauge(PREFIX + "requests_in_flight", "HTTP requests being handled",
                                        registry=r)
        self.ready = Gauge(PREFIX + "ready", "1 when warmed up and not draining", registry=r)
        self.model_tokens_in_flight = Gauge(PREFIX + "model_tokens_in_flight", "One model's tokens admitted and "
                                            "not yet answered", ["model"], registry=r)
        self.model_queued_requests = Gauge(PREFIX + "model_queued_requests", "Requests waiting for one model's "
                                           "forward", ["model"], registry=r)

    def watch(self, batchers: dict, state) -> None:
        """Gauges read at scrape time from the live objects; `batchers`: model name -> its Batcher."""
        every = list(batchers.values())
        self.tokens_in_flight.set_function(lambda: sum(b.tokens_in_flight for b in every))
        self.queued_tokens.set_function(lambda: sum(b.queued_tokens for b in every))
        self.queued_requests.set_function(lambda: sum(b.queued_requests for b in every))
        self.requests_in_flight.set_function(lambda: state.in_flight)
        self.ready.set_function(lambda: 1.0 if state.is_ready else 0.0)
        for name, b in batchers.items():
            self.model_tokens_in_flight.labels(name).set_function(lambda b=b: b.tokens_in_flight)
            self.model_queued_requests.labels(name).set_function(lambda b=b: b.queued_requests)

    def forward_observer(self, model: str):
        """`Engine.embed`'s (and `score`'s) on_batch for `model`: one forward of `inputs` sequences
        and `tokens` tokens."""
        inputs, tokens = self.batch_inputs.labels(model), self.batch_tokens.labels(model)

        def observe(n: int, t: int) -> None:
            inputs.observe(n)
            tokens.observe(t)

        return observe

    def render(self) -> bytes:
        return generate_latest(self.registry)


__all__ = ["Metrics", "PREFIX", "CONTENT_TYPE_LATEST"]
