"""The HTTP routes: OpenAI's `/v1/embeddings`; TEI's `/embed`, `/rerank`, `/predict`, `/tokenize`;
the Cohere/Jina `/v1/rerank` (as vLLM and Infinity serve it); vLLM's `/classify`; and the
operator's `/info`, `/v1/models`, `/health`, `/ready`, `/metrics`. Every model route takes an
optional `model` field that picks one of the served models (`ServerState.pick`). A multi-vector
(ColBERT) model answers `/v1/embeddings` (per-token vectors of queries or documents) and the two
rerank routes (MaxSim), through the same path.

Starlette (with uvicorn), not FastAPI: every request body is checked by our own parser
(`schemas.py`, which reuses the engine's `EncodeOptions`), because both contracts fix their own
error shapes and status codes, and FastAPI's pydantic layer would answer bad input with its own
`{"detail": [...]}` 422 that neither contract has, and add a second validation pass per request.

A handler reads the body (within the payload limit, the read timeout and the server's bytes in
flight), parses and checks it, tokenises beside the model (a small thread pool: the Rust tokenizer
releases the GIL; a second pool for large bodies, so that a one-word request never queues behind
megabytes), hands the token ids to the one worker (`batcher.py`) and awaits its rows, watching for
the client going away meanwhile. The outer `ServerApp` wraps every HTTP request: the API key, the
limit of requests handled at once, the request metrics, the count of requests in flight (for
draining), the bytes they hold, and a last catch-all so that nothing but a JSON error in the
route's shape ever leaves the server.

Limits, each a refusal in the route's shape: a body over `payload_limit` is a 413 (as soon as it is
known); more than `max_concurrent_requests` requests at once, or more than `max_bytes_in_flight`
bytes of request and response bodies held server-wide, a 429 with Retry-After; a body not sent within `read_timeout`, a
408 (headers not sent within it: the connection is closed, `cli.make_server`). A client that leaves
before its answer is counted as status 499 and logged in one line. No route redirects (`POST
/embed/` is a 404: a redirect would send the client to whatever its `Host` header said).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..engine import NonFiniteError
from ..weights import MULTIVECTOR
from . import schemas
from .batcher import Closed, Overloaded
from .errors import ApiError, clip, error_response, internal_error, quote
from .metrics import CONTENT_TYPE_LATEST
from .settings import ServerSettings
from .state import LARGE_BODY, PUBLIC_PATHS, ServerState

log = logging.getLogger("modernbert_embed.server")

ROUTES = ("/v1/embeddings", "/embeddings", "/embed", "/rerank", "/v1/rerank", "/predict", "/classify",
          "/v1/classify", "/tokenize", "/info", "/v1/models") + PUBLIC_PATHS
# Bodies of more bytes than LARGE_BODY are parsed, and responses with more values than this are
# serialised, on a worker thread (of the large lane) rather than on the event loop.
BIG_RESPONSE = 1 << 16
# While the server drains, a body that sends nothing for this long is cut off (503).
BODY_POLL = 0.5
HELD = "modernbert_embed.held"  # the scope key of a request's bytes in flight


class ClientGone(Exception):
    """The client closed the connection before its request was read."""


# ----------------------------------------------------------------------------- request helpers
async def read_body(request: Request, state: ServerState) -> bytes:
    """The body, counted in the server's bytes in flight as it arrives; a 413 as soon as it is known
    to pass `payload_limit`, a 429 when the server holds too many bytes, a 408 when it takes longer
    than `read_timeout`, a 503 when the server drains while the body stalls, `ClientGone` when the
    client leaves."""
    limit, held = state.settings.payload_limit, request.scope[HELD]
    # a 408 or a 503 here closes the connection (its client is slow: the rest is not waited for);
    # after a 413 or a 429 the rest of the body is read and dropped, so that the client reads the answer
    close = {"Connection": "close"}
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit():
        if len(declared) > 18 or int(declared) > limit:
            raise ApiError("payload_too_large", f"the request body ({clip(declared, 20)} bytes) is over the "
                                                f"limit of {limit} bytes")
        state.hold_bytes(held, int(declared))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + state.settings.read_timeout
    chunks, size, pending = [], 0, None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(request.receive())
            left = deadline - loop.time()
            done, _ = await asyncio.wait({pending}, timeout=max(0.0, min(left, BODY_POLL)))
            if not done:
                if state.draining:
                    raise ApiError("draining", "the server is shutting down; retry on another replica",
                                   headers={"Retry-After": "1", **close})
                if left <= BODY_POLL:
                    raise ApiError("request_timeout", f"the request body took longer than "
                                                      f"{state.settings.read_timeout:g} s to arrive", headers=close)
                continue
            message, pending = pending.result(), None
            if message["type"] == "http.disconnect":
                raise ClientGone()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise ApiError("payload_too_large", f"the request body is over the limit of {limit} bytes")
            if size > held[0]:
                state.hold_bytes(held, size - held[0])
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)
    finally:
        if pending is not None:
            pending.cancel()


def _hold_answer(state: ServerState, request: Request, out: bytes) -> None:
    """Count an answer's bytes in flight (a client that does not read holds them), or refuse it."""
    limit = state.settings.max_bytes_in_flight
    if len(out) > limit:
        raise ApiError("request_too_large", f"the answer would be {len(out)} bytes, more than the server holds "
                                            f"at once ({limit}); ask for fewer inputs, fewer dimensions or base64")
    state.hold_bytes(request.scope[HELD], len(out))


async def _client_gone(receive) -> None:
    """Returns when the client disconnects (the body has been read: the next message is that)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _rows_or_gone(request: Request, batcher, job):
    """The job's rows, or None when the client went away first (its work is then dropped)."""
    watcher = asyncio.ensure_future(_client_gone(request.receive))
    try:
        done, _ = await asyncio.wait({job.future, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the server gave up on this request (shutdown timeout)
        batcher.cancel(job)
        raise
    finally:
        watcher.cancel()
    if job.future in done:
        return job.future.result()
    batcher.cancel(job)
    job.future.cancel()
    return None


def _ms(seconds: float) -> str:
    """A duration for the x-*-time headers (milliseconds, as TEI sends them)."""
    return f"{max(seconds, 0.0) * 1000:.2f}"


def _overloaded(e: Overloaded) -> ApiError:
    return ApiError("overloaded", str(e), headers={"Retry-After": str(e.retry_after)})


def _draining() -> ApiError:
    return ApiError("draining", "the server is shutting down; retry on another replica", headers={"Retry-After": "1"})


async def _serve(request: Request, route: str, task: str, field: str, parse, tokenise, shape) -> Response:
    """Every model route's common path: read, parse, pick the model (the body's `model` field, see
    `ServerState.pick`), check, tokenise beside the model, queue on that model's worker, await,
    answer. `parse(body, served)` -> the checked request; `tokenise(req, served)` -> (token ids,
    indices truncated) or, for a multi-vector model, (token ids, indices truncated, keep,
    key_lengths), run on a lane's thread; `shape(req, rows, tokens, served)` -> the body."""
    state: ServerState = request.app.state.server
    m = state.metrics
    if state.draining:
        raise _draining()
    if not state.ready:
        raise ApiError("not_ready", "the model is warming up; retry shortly", headers={"Retry-After": "1"})
    started = time.perf_counter()
    loop = asyncio.get_running_loop()
    body = await read_body(request, state)
    lane = state.lane(len(body))  # a large request's work takes the large lane's threads

    def parsed():
        value = schemas.parse_json(body)
        served = state.pick(value.get("model"), task, route)
        return served, parse(value, served)

    if len(body) > LARGE_BODY:  # parsing a large body would hold up every other request
        served, req = await loop.run_in_executor(lane, parsed)
    else:
        served, req = parsed()
    body = None  # parsed: the bytes may go (the closure above holds the name, not its old value)
    batcher = served.batcher
    try:
        batcher.check_room()
    except Overloaded as e:
        raise _overloaded(e) from None

    def tokenised():
        t0 = time.perf_counter()
        ids, truncated, *marks = tokenise(req, served)
        ids = served.engine.check_ids(ids)
        m.tokenize_seconds.observe(time.perf_counter() - t0)
        return ids, truncated, marks or (None, None)

    ids, truncated, (keep, key_lengths) = await loop.run_in_executor(lane, tokenised)
    tokens = sum(len(s) for s in ids)
    if tokens > served.settings.max_queued_tokens:
        raise ApiError("request_too_large", f"the request has {tokens} tokens, more than the server queues at "
                                            f"once ({served.settings.max_queued_tokens}); split it", field)
    try:
        job = batcher.submit(ids, getattr(req, "dim", 0), getattr(req, "normalize", False), keep, key_lengths)
    except Overloaded as e:
        raise _overloaded(e) from None
    except Closed:
        raise _draining() from None
    try:
        rows = await _rows_or_gone(request, batcher, job)
    except NonFiniteError as e:
        raise ApiError("backend", str(e)) from None
    except Closed:
        raise _draining() from None
    if rows is None:  # nobody is listening; 499 is nginx's "client closed request", for the metrics
        return Response(status_code=499)
    m.inputs.labels(route, served.name).inc(len(ids))
    m.tokens.labels(route, served.name).inc(tokens)
    if truncated:
        m.truncations.labels(route, served.name).inc(len(truncated))
    headers = {"x-truncated-inputs": str(len(truncated)), "x-compute-tokens": str(tokens),
               "x-queue-time": _ms(job.started - job.enqueued), "x-inference-time": _ms(job.finished - job.started),
               "x-total-time": _ms(time.perf_counter() - started)}
    if rows.size > BIG_RESPONSE:
        out = await loop.run_in_executor(lane, shape, req, rows, tokens, served)
    else:
        out = shape(req, rows, tokens, served)
    _hold_answer(state, request, out)
    return Response(out, media_type="application/json", headers=headers)


def _embed_tokens(field: str):
    def tokenise(req, served):
        return schemas.to_token_ids(req, served.tokenizer, served.limits, field)

    return tokenise


# ----------------------------------------------------------------------------- routes
def _openai_parse(body, served):
    if served.kind == MULTIVECTOR:
        return schemas.parse_vectors(body, served)
    return schemas.parse_openai(body, served.limits)


def _openai_tokens(req, served):
    if isinstance(req, schemas.VectorRequest):
        return schemas.vector_token_ids(req, served)
    return schemas.to_token_ids(req, served.tokenizer, served.limits, "input")


def _openai_shape(req, rows, tokens, served):
    if isinstance(req, schemas.VectorRequest):
        return schemas.vectors_body(req, rows, tokens, served)
    return schemas.openai_body(rows, req.encoding_format, served.name, tokens)


def _rerank_tokens(req, served):
    if served.kind == MULTIVECTOR:  # a query and documents, scored by MaxSim
        return schemas.vector_rerank_token_ids(req, served)
    return schemas.score_token_ids(req, served)


async def openai_embeddings(request: Request) -> Response:
    """One pooled vector per input from an embedder; per-token vectors from a multi-vector model
    (its inputs are queries or documents: `input_type`, or PyLate's `is_query`)."""
    return await _serve(request, "/v1/embeddings", ("embed", "embed_tokens"), "input", _openai_parse, _openai_tokens,
                        _openai_shape)


async def tei_embed(request: Request) -> Response:
    return await _serve(request, "/embed", "embed", "inputs", lambda b, sv: schemas.parse_tei(b, sv.limits),
                        _embed_tokens("inputs"), lambda req, rows, tokens, sv: schemas.tei_body(rows))


async def tei_rerank(request: Request) -> Response:
    return await _serve(request, "/rerank", "rerank", "texts", schemas.parse_tei_rerank, _rerank_tokens,
                        schemas.tei_rerank_body)


async def v1_rerank(request: Request) -> Response:
    return await _serve(request, "/v1/rerank", "rerank", "documents", schemas.parse_v1_rerank,
                        _rerank_tokens, schemas.v1_rerank_body)


async def tei_predict(request: Request) -> Response:
    return await _serve(request, "/predict", "classify", "inputs", schemas.parse_predict, schemas.score_token_ids,
                        schemas.predict_body)


async def classify(request: Request) -> Response:
    return await _serve(request, "/classify", "classify", "input", schemas.parse_classify, schemas.score_token_ids,
                        schemas.classify_body)


async def tokenize(request: Request) -> Response:
    """TEI's `/tokenize`, with the embedding routes' limits: at most `max_input_tokens` tokens per
    text (the tokens the model would see; a long text is cut before it is tokenised), and the answer
    written one text at a time, so that it is never held whole (a client that does not read holds
    one text's JSON and the socket's buffer)."""
    state: ServerState = request.app.state.server
    body = await read_body(request, state)
    lane = state.lane(len(body))
    loop = asyncio.get_running_loop()
    if len(body) > LARGE_BODY:
        parsed = await loop.run_in_executor(lane, schemas.parse_json, body)
    else:
        parsed = schemas.parse_json(body)
    del body
    served = state.pick(parsed.get("model"), "tokenize", "/tokenize")
    tokenizer = served.tokenizer
    if tokenizer is None:
        raise ApiError("validation", "this model has no tokenizer", "inputs")
    texts, add_special, prompt = schemas.parse_tokenize(parsed, served.limits)
    await loop.run_in_executor(lane, schemas.check_encodable, texts, "inputs")
    max_length = served.limits.max_input_tokens

    async def pieces():
        for i, text in enumerate(texts):
            piece = await loop.run_in_executor(lane, schemas.tokenize_piece, tokenizer, text, prompt,
                                               add_special, max_length)
            yield (b"[" if i == 0 else b",") + piece
        yield b"]"

    return StreamingResponse(pieces(), media_type="application/json")


async def info(request: Request) -> Response:
    """TEI's `/info`: the first model's (listing every model's under `models` when there are
    several), or the one `?model=NAME` names."""
    state: ServerState = request.app.state.server
    name = request.query_params.get("model")
    if name is None:
        return JSONResponse(state.info())
    model = state.by_name.get(name) or (state.primary if len(state.models) == 1 else None)
    if model is None:
        raise ApiError("model_not_found", f"the model {quote(name)} is not served here; served: "
                                          f"{[m.name for m in state.models]}", "model")
    return JSONResponse(state.info(model))


async def list_models(request: Request) -> Response:
    state: ServerState = request.app.state.server
    return JSONResponse({"object": "list", "data": [{"id": m.name, "object": "model", "created": state.created,
                                                     "owned_by": "modernbert-embed"} for m in state.models]})


async def health(request: Request) -> Response:
    state: ServerState = request.app.state.server
    if state.failed:
        raise ApiError("not_ready", "unhealthy: the warm-up forward failed (see the server's log)")
    if not state.workers_alive and not state.draining:
        raise ApiError("not_ready", "unhealthy: a model worker is not running")
    return JSONResponse({"status": "ok"})


async def ready(request: Request) -> Response:
    state: ServerState = request.app.state.server
    if state.draining:
        raise _draining()
    if not state.is_ready:
        raise ApiError("not_ready", "the model failed to warm up" if state.failed else "warming up")
    return JSONResponse({"status": "ready"})


async def metrics(request: Request) -> Response:
    return Response(request.app.state.server.metrics.render(), media_type=CONTENT_TYPE_LATEST)


async def _http_exception(request: Request, exc: HTTPException) -> Response:
    kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "validation")
    path = clip(request.url.path)
    what = {404: f"no route {path}", 405: f"{clip(request.method)} is not allowed on {path}"}
    return error_response(ApiError(kind, what.get(exc.status_code, str(exc.detail))), request.url.path)


async def _api_error(request: Request, exc: ApiError) -> Response:
    if exc.kind not in ("internal", "backend"):  # refusals, not failures
        request.app.state.server.metrics.rejections.labels(reason=exc.kind).inc()
    return error_response(exc, request.url.path)


async def _client_left(request: Request, exc: Exception) -> Response:
    """The client closed the connection mid-request: one log line, and 499 (nginx's "client closed
    request") for the metrics; nobody reads it."""
    log.info("client %s left during %s %s", _client(request.scope), request.method,
             clip(request.url.path))
    return Response(status_code=499)


async def _unhandled(request: Request, exc: Exception) -> Response:
    """The catch-all: a fixed message for the client (Starlette re-raises the exception after
    sending this, and `ServerApp` logs it)."""
    return error_response(internal_error(), request.url.path)


# ----------------------------------------------------------------------------- the application
class ServerApp:
    """The ASGI application: the API key, request metrics, in-flight count and the catch-all
    around the Starlette routes. `state` is the `ServerState`."""

    def __init__(self, models, settings: ServerSettings | None = None):
        self.state = state = ServerState(models, settings or ServerSettings())

        @contextlib.asynccontextmanager
        async def lifespan(app):
            state.start()
            warm = asyncio.ensure_future(state.warm_up())
            try:
                yield
            finally:
                warm.cancel()
                state.close(timeout=1.0)
                state.pool.shutdown(wait=False, cancel_futures=True)
                state.large_pool.shutdown(wait=False, cancel_futures=True)

        routes = [
            Route("/v1/embeddings", openai_embeddings, methods=["POST"]),
            Route("/embeddings", openai_embeddings, methods=["POST"]),  # TEI's and Infinity's alias
            Route("/embed", tei_embed, methods=["POST"]),
            Route("/rerank", tei_rerank, methods=["POST"]),
            Route("/v1/rerank", v1_rerank, methods=["POST"]),
            Route("/predict", tei_predict, methods=["POST"]),
            Route("/classify", classify, methods=["POST"]),
            Route("/v1/classify", classify, methods=["POST"]),
            Route("/tokenize", tokenize, methods=["POST"]),
            Route("/info", info, methods=["GET"]),
            Route("/v1/models", list_models, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/ready", ready, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ]
        self.starlette = Starlette(routes=routes, lifespan=lifespan,
                                   exception_handlers={HTTPException: _http_exception, ApiError: _api_error,
                                                       ClientGone: _client_left, ClientDisconnect: _client_left,
                                                       Exception: _unhandled})
        self.starlette.router.redirect_slashes = False  # `/embed/` is a 404, never a redirect to `Host`
        self.starlette.state.server = state
        key = settings.api_key if settings and settings.api_key else None
        self._key = key.encode() if key else None

    def _authorised(self, scope) -> bool:
        if self._key is None or scope["path"] in PUBLIC_PATHS:
            return True
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, given = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self._key)
        return False

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.starlette(scope, receive, send)
        state, path = self.state, scope["path"]
        route = path if path in ROUTES else "other"
        status = {"code": 0}
        work = path not in PUBLIC_PATHS
        started = time.perf_counter()

        async def send_status(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        held = scope[HELD] = [0]  # this request's bytes in flight (read_body, _hold_answer)
        if work:
            state.in_flight += 1
        try:
            if not self._authorised(scope):
                state.metrics.rejections.labels(reason="unauthorized").inc()
                err = ApiError("unauthorized", "a valid API key is required (Authorization: Bearer KEY)",
                               headers={"WWW-Authenticate": "Bearer"})
                await error_response(err, path)(scope, receive, send_status)
            elif work and state.in_flight > state.settings.max_concurrent_requests:
                state.metrics.rejections.labels(reason="overloaded").inc()
                err = ApiError("overloaded", f"the server is overloaded ({state.in_flight - 1} requests in flight, "
                                             f"limit {state.settings.max_concurrent_requests}); retry in 1 s",
                               headers={"Retry-After": "1"})
                await error_response(err, path)(scope, receive, send_status)
            else:
                await self.starlette(scope, receive, send_status)
        except (ClientGone, ClientDisconnect):  # nobody to answer: nginx's "client closed request"
            status["code"] = status["code"] or 499
            log.info("client %s left during %s %s", _client(scope), scope.get("method"), clip(path))
        except Exception:
            log.exception("unhandled error on %s %s", scope.get("method"), clip(path))
            if not status["code"]:  # else the response is under way: nothing more can be said
                await error_response(internal_error(), path)(scope, receive, send_status)
        finally:
            if work:
                state.in_flight -= 1
            state.release_bytes(held)
            state.metrics.requests.labels(route, str(status["code"] or 500)).inc()
            state.metrics.request_seconds.labels(route).observe(time.perf_counter() - started)


def _client(scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "?"


def create_app(models, settings: ServerSettings | None = None) -> ServerApp:
    """The server's ASGI application over a loaded model (an `Embedder`, a `CrossEncoder` or a
    `LoadedModel`), or a list of them served side by side (names: `settings.served_model_name`,
    one per model, else each model's own)."""
    return ServerApp(models, settings)


__all__ = ["ServerApp", "ServerSettings", "ServerState", "create_app"]
