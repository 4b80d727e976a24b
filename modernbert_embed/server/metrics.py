"""Prometheus metrics of one server, in a registry of its own (so that several servers in one
process, as in the tests, never share counters).

What TEI exports, plus what its users miss: truncations, rejections by reason, dropped work,
tokens in flight. Names start with `modernbert_embed_`; durations are in seconds.
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
        self.inputs = Counter(PREFIX + "inputs", "Inputs embedded (texts and token-id lists)", ["route"], registry=r)
        self.tokens = Counter(PREFIX + "tokens", "Tokens embedded ([CLS] and [SEP] included)", ["route"], registry=r)
        self.truncations = Counter(PREFIX + "truncated_inputs", "Inputs cut to the input token limit",
                                   ["route"], registry=r)
        self.rejections = Counter(PREFIX + "rejections", "Requests refused, by reason", ["reason"], registry=r)
        self.dropped = Counter(PREFIX + "dropped_requests", "Admitted requests dropped before their forward",
                               ["reason"], registry=r)
        self.queue_seconds = Histogram(PREFIX + "queue_duration_seconds", "Time from admission to the forward",
                                       buckets=_SECONDS, registry=r)
        self.tokenize_seconds = Histogram(PREFIX + "tokenization_duration_seconds", "Time spent tokenising "
                                          "a request", buckets=_SECONDS, registry=r)
        self.batch_tokens = Histogram(PREFIX + "batch_tokens", "Tokens per forward", buckets=_TOKENS, registry=r)
        self.batch_inputs = Histogram(PREFIX + "batch_inputs", "Inputs per forward", buckets=_INPUTS, registry=r)
        self.tokens_in_flight = Gauge(PREFIX + "tokens_in_flight", "Tokens admitted and not yet answered",
                                      registry=r)
        self.queued_tokens = Gauge(PREFIX + "queued_tokens", "Tokens waiting for a forward", registry=r)
        self.queued_requests = Gauge(PREFIX + "queued_requests", "Requests waiting for a forward", registry=r)
        self.requests_in_flight = Gauge(PREFIX + "requests_in_flight", "HTTP requests being handled",
                                        registry=r)
        self.ready = Gauge(PREFIX + "ready", "1 when warmed up and not draining", registry=r)

    def watch(self, batcher, state) -> None:
        """Gauges read at scrape time from the live objects."""
        self.tokens_in_flight.set_function(lambda: batcher.tokens_in_flight)
        self.queued_tokens.set_function(lambda: batcher.queued_tokens)
        self.queued_requests.set_function(lambda: batcher.queued_requests)
        self.requests_in_flight.set_function(lambda: state.in_flight)
        self.ready.set_function(lambda: 1.0 if state.is_ready else 0.0)

    def observe_forward(self, inputs: int, tokens: int) -> None:
        """`Engine.embed`'s on_batch: one forward of `inputs` sequences and `tokens` tokens."""
        self.batch_inputs.observe(inputs)
        self.batch_tokens.observe(tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)


__all__ = ["Metrics", "PREFIX", "CONTENT_TYPE_LATEST"]
