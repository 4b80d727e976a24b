"""`modernbert-embed serve`: the parser of its options and the runner (uvicorn, with draining).

On SIGTERM (or a first Ctrl-C) the server drains: readiness turns 503 and new work is refused
with 503, the requests in flight complete, and the process exits 0 once none is left, or when
`--drain-timeout` seconds have passed (what is still running then is cut off). A second signal
stops at once. (uvicorn alone would stop accepting connections at the first signal, so that a
load balancer's readiness probe could never see the 503, and would re-raise the signal, so that
the process would not exit 0.)
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from ..cli_common import Formatter, add_max_batch_tokens, add_model_options
from ..cli_common import int_at_least as _int_at_least
from .settings import API_KEY_ENV, ServerSettings

DEFAULTS = ServerSettings()
# Seconds kept back from --drain-timeout for closing connections and stopping the worker.
SHUTDOWN_MARGIN = 0.5


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text}")
    return value


def add_serve_parser(sub) -> argparse.ArgumentParser:
    """Register the `serve` subcommand on the main parser's subparsers."""
    s = sub.add_parser(
        "serve", help="serve embeddings, rerankers and classifiers over HTTP (OpenAI, TEI, Cohere/Jina, vLLM APIs)",
        formatter_class=Formatter,
        description="Serve embedders, rerankers and classifiers over HTTP: POST /v1/embeddings and /embeddings "
                    "(OpenAI), POST /embed, /rerank, /predict and /tokenize (text-embeddings-inference), POST "
                    "/v1/rerank (Cohere/Jina), POST /classify (vLLM), GET /info, /v1/models, /health, /ready, "
                    "/metrics. Several models may be served at once (--model A --model B); a request's `model` "
                    "field picks one. Each model's requests are batched together into token-budget forwards by "
                    "its own worker.")
    g = s.add_argument_group("model")
    add_model_options(g, repeatable=True)
    g.add_argument("--served-model-name", action="append", default=None, metavar="NAME",
                   help="the model's name in requests, responses and /v1/models (default: --model as given; a "
                        "folder also answers to its last component); with several models, one per --model, in order")
    g = s.add_argument_group("network")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for every interface)")
    g.add_argument("--port", type=_int_at_least(0), default=8080, help="port (0: any free one)")
    g.add_argument("--api-key", default=None, metavar="KEY",
                   help=f"require 'Authorization: Bearer KEY' on every route but /health, /ready and /metrics "
                        f"(default: ${API_KEY_ENV} when set)")
    g.add_argument("--payload-limit", type=_int_at_least(1), default=DEFAULTS.payload_limit, metavar="BYTES",
                   help="largest request body; more is a 413")
    g.add_argument("--max-concurrent-requests", type=_int_at_least(1), default=DEFAULTS.max_concurrent_requests,
                   metavar="N", help="requests handled at once (every route but /health, /ready and /metrics); "
                                     "more are a 429 with Retry-After")
    g.add_argument("--max-bytes-in-flight", type=_int_at_least(1), default=DEFAULTS.max_bytes_in_flight,
                   metavar="BYTES", help="request and response bodies held at once, server-wide; a request "
                                         "past it is a 429 with Retry-After")
    g.add_argument("--read-timeout", type=_seconds, default=DEFAULTS.read_timeout, metavar="SECONDS",
                   help="how long a client may take to send a request's headers, and then its body; a "
                        "connection slower than that is closed (headers) or answered 408 (body)")
    g.add_argument("--keep-alive-timeout", type=_seconds, default=DEFAULTS.keep_alive_timeout, metavar="SECONDS",
                   help="how long an idle connection stays open between requests")
    g = s.add_argument_group("batching and admission")
    add_max_batch_tokens(g)
    g.add_argument("--max-client-batch-size", type=_int_at_least(1), default=DEFAULTS.max_client_batch_size,
                   metavar="N", help="inputs per request")
    g.add_argument("--max-input-tokens", type=_int_at_least(2), default=None, metavar="N",
                   help="tokens per input, [CLS] and [SEP] included (default: the model's max_seq_length)")
    g.add_argument("--max-queued-tokens", type=_int_at_least(1), default=DEFAULTS.max_queued_tokens, metavar="N",
                   help="tokens waiting for a forward; a request past it is a 429 with Retry-After")
    g.add_argument("--auto-truncate", action=argparse.BooleanOptionalAction, default=True,
                   help="cut over-long inputs (counted in the x-truncated-inputs header and a metric); with "
                        "--no-auto-truncate they are a 4xx naming the input (a request's truncate overrides)")
    g.add_argument("--tokenization-workers", type=_int_at_least(1), default=None, metavar="N",
                   help="threads tokenising beside the model (default: min(4, CPUs))")
    g = s.add_argument_group("operations")
    g.add_argument("--drain-timeout", type=_seconds, default=DEFAULTS.drain_timeout, metavar="SECONDS",
                   help="on SIGTERM, how long requests in flight may take before the process exits")
    g.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    g.add_argument("--access-log", action="store_true", help="log every request")
    return s


def settings_from_args(args) -> ServerSettings:
    names = args.served_model_name
    models = args.model if isinstance(args.model, list) else [args.model]
    if names is not None and len(names) != len(models):
        raise ValueError(f"--served-model-name was given {len(names)} time(s) for {len(models)} --model(s): "
                         "give one name per --model, in the same order, or none")
    return ServerSettings(
        served_model_name=None if names is None else names[0] if len(names) == 1 else tuple(names),
        api_key=os.environ.get(API_KEY_ENV) if args.api_key is None else args.api_key,  # "" is refused
        max_batch_tokens=args.max_batch_tokens, max_client_batch_size=args.max_client_batch_size,
        max_input_tokens=args.max_input_tokens, max_queued_tokens=args.max_queued_tokens,
        payload_limit=args.payload_limit, max_concurrent_requests=args.max_concurrent_requests,
        max_bytes_in_flight=args.max_bytes_in_flight, read_timeout=args.read_timeout,
        keep_alive_timeout=args.keep_alive_timeout, auto_truncate=args.auto_truncate,
        drain_timeout=args.drain_timeout, tokenization_workers=args.tokenization_workers)


# The most bytes of request headers a connection may send (h11's own bound, kept with httptools too).
MAX_HEADER_BYTES = 16 * 1024


def timed_protocol(read_timeout: float, http: str | None = None):
    """uvicorn's HTTP protocol (httptools when installed, as uvicorn's "auto" picks, else h11; or
    `http`) with what uvicorn lacks: a request's headers must arrive within `read_timeout` seconds
    of its first byte (or of the connection), and be at most MAX_HEADER_BYTES, else the connection
    is closed; so must the rest of a body refused before it was read. (A client sending a header a
    minute would otherwise hold its connection for ever.)"""
    if http is None:
        try:
            import httptools  # noqa: F401

            http = "httptools"
        except ImportError:
            http = "h11"
    if http == "httptools":
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
    else:
        from uvicorn.protocols.http.h11_impl import H11Protocol as Base

    class TimedProtocol(Base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.headers_deadline = None
            self.header_bytes = 0

        def _waiting(self) -> bool:
            """No request being read: waiting for headers, or for the rest of a refused body."""
            return self.cycle is None or self.cycle.response_complete

        def _arm(self) -> None:
            if self.headers_deadline is None and not self.transport.is_closing():
                self.headers_deadline = self.loop.call_later(read_timeout, self._too_slow)

        def _disarm(self) -> None:
            if self.headers_deadline is not None:
                self.headers_deadline.cancel()
                self.headers_deadline = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            cycle = self.cycle
            if cycle is None or (cycle.response_complete and not cycle.more_body):
                self.header_bytes += len(data)  # headers (and maybe more) of a new request
            super().data_received(data)
            if self.cycle is not cycle:  # a request's headers are in: its body's deadline is the app's
                self._disarm()
                self.header_bytes = 0
            elif self._waiting():
                if self.header_bytes > MAX_HEADER_BYTES:
                    self._close(f"request headers over {MAX_HEADER_BYTES} bytes")
                else:
                    self._arm()

        def _too_slow(self) -> None:
            self.headers_deadline = None
            if self._waiting():
                self._close(f"no complete request within {read_timeout:g} s")

        def _close(self, why: str) -> None:
            if not self.transport.is_closing():
                logging.getLogger("modernbert_embed.server").info(
                    "closed a connection from %s: %s", "%s:%d" % self.client if self.client else "?", why)
                self.transport.close()

    TimedProtocol.__name__ = f"Timed{Base.__name__}"
    return TimedProtocol


def make_server(app, host: str, port: int, drain_timeout: float, log_level: str = "info",
                access_log: bool = False, http: str | None = None):
    """A uvicorn server for `app` (a `ServerApp`) that drains on SIGTERM (see the module's text),
    with the app's timeouts (`timed_protocol`; idle connections closed after `keep_alive_timeout`).
    `http`: "h11" or "httptools" (default: httptools when installed)."""
    import uvicorn

    settings = app.state.settings

    class DrainingServer(uvicorn.Server):
        def __init__(self, config):
            super().__init__(config)
            self.drain_deadline: float | None = None

        def handle_exit(self, sig, frame) -> None:
            if self.drain_deadline is not None:  # a second signal: stop now
                self.force_exit = self.should_exit
                self.should_exit = True
                return
            self.drain_deadline = time.monotonic() + drain_timeout
            app.state.begin_drain()

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            for server in self.servers:
                for sock in server.sockets:
                    host, port = sock.getsockname()[:2]
                    logging.getLogger("modernbert_embed.server").info("serving on http://%s:%d", host, port)

        async def on_tick(self, counter: int) -> bool:
            if self.drain_deadline is not None and not self.should_exit:
                left = self.drain_deadline - time.monotonic()
                if app.state.in_flight == 0 or left <= SHUTDOWN_MARGIN:
                    # what is still running gets the rest of the time, then is cancelled
                    self.config.timeout_graceful_shutdown = max(0.1, left - SHUTDOWN_MARGIN)
                    self.should_exit = True
            return await super().on_tick(counter)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=access_log,
                            lifespan="on", timeout_graceful_shutdown=max(0.1, drain_timeout),
                            http=timed_protocol(settings.read_timeout, http),
                            timeout_keep_alive=settings.keep_alive_timeout,
                            h11_max_incomplete_event_size=MAX_HEADER_BYTES)
    return DrainingServer(config)


def run_serve(args) -> int:
    """The `serve` subcommand: load the model, then serve until SIGTERM. 0 after a drain, 2 for a
    refused invocation (bad options, a model that cannot be loaded), 1 for a failure to serve."""
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(message)s")
    try:
        import uvicorn  # noqa: F401
        import starlette  # noqa: F401
        import prometheus_client  # noqa: F401
    except ImportError as e:
        print(f"modernbert-embed: error: serving needs the serve extra (pip install 'modernbert-embed[serve]'): {e}",
              file=sys.stderr)
        return 2
    from ..config import ConfigError
    from ..loaded import LoadedModel
    from ..weights import DEFAULT_MODEL, CheckpointError
    from .app import create_app

    try:
        settings = settings_from_args(args)
        models = [LoadedModel.open(name, device=args.device, dtype=args.dtype, revision=args.revision)
                  for name in (args.model or [DEFAULT_MODEL])]
        app = create_app(models if len(models) > 1 else models[0], settings)
    except (CheckpointError, ConfigError, OSError) as e:
        print(f"modernbert-embed: error: cannot load the model: {e}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, RuntimeError) as e:
        print(f"modernbert-embed: error: {e}", file=sys.stderr)
        return 2
    server = make_server(app, args.host, args.port, args.drain_timeout, args.log_level, args.access_log)
    try:
        server.run()
    except OSError as e:  # the port is taken, the address is not ours
        print(f"modernbert-embed: error: cannot serve on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1
    if not server.started:
        return 1
    return 0


__all__ = ["add_serve_parser", "run_serve", "make_server", "settings_from_args", "timed_protocol", "SHUTDOWN_MARGIN",
           "MAX_HEADER_BYTES"]

