"""The HTTP server in-process (uvicorn in a thread, loopback, an ephemeral port): both contracts'
shapes, the official `openai` client, bad input, the API key, concurrency, overload, disconnects
and batching across requests.

A small random checkpoint with the real tokenizer and max_seq_length 64 (so that truncation shows
on short texts); results are compared with `Embedder.encode` of the same texts on the same weights.
Tests that need the worker to hold still put a gate in front of the engine (`Spy`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import random
import re
import socket
import threading
import time

import numpy as np
import pytest

pytest.importorskip("starlette", reason="the serve extra is not installed")
httpx = pytest.importorskip("httpx", reason="httpx is not installed (the test extra)")

from conftest import fixture_file  # noqa: E402
from helpers import REAL_VOCAB  # noqa: E402
from modernbert_embed import Embedder  # noqa: E402
from modernbert_embed.server import ServerSettings, create_app  # noqa: E402
from modernbert_embed.server.cli import make_server  # noqa: E402

MSL = 64
HIDDEN = REAL_VOCAB["hidden_size"]
WORDS = ("the a of server batch embedding model request queue token window vector search document "
         "query client answer order quick brown fox jumps over lazy dog über café naïve").split()
SHARED = dict(served_model_name="test-model", max_client_batch_size=16, payload_limit=256 * 1024)


def make_texts(n, seed=0, max_words=20):
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(1, max_words))) for _ in range(n)]


def cosines(a, b) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def assert_same(got, want, what=""):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    c = cosines(got, want)
    assert c.min() >= 0.99999, f"{what}: cosine {c.min():.7f} at row {int(c.argmin())}"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from modernbert_embed.weights import write_random_checkpoint

    tok = fixture_file("tokenizer.json")
    return write_random_checkpoint(tmp_path_factory.mktemp("serve-ckpt"), REAL_VOCAB, seed=11, tokenizer_json=tok,
                                   max_seq_length=MSL)


@pytest.fixture(scope="module")
def embedder(ckpt):
    return Embedder.from_pretrained(ckpt, device="cpu")


class Live:
    """A running server: `url`, its `state`, and a client."""

    def __init__(self, app, server, url):
        self.app, self.server, self.url = app, server, url
        self.state = app.state
        self.http = httpx.Client(base_url=url, timeout=30)

    def metric(self, name: str, **labels) -> float:
        """A sample of /metrics (0 when absent)."""
        text = self.http.get("/metrics").text
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in text.splitlines():
            m = re.fullmatch(r"(\w+)(?:\{(.*)\})? (\S+)", line)
            if m and m[1] == name and ",".join(sorted((m[2] or "").split(","))) == want:
                return float(m[3])
        return 0.0


@contextlib.contextmanager
def running(embedder, http=None, **settings):
    """A server on loopback with these settings; `http`: uvicorn's protocol (default: its choice)."""
    app = create_app(embedder, ServerSettings(**settings))
    server = make_server(app, "127.0.0.1", 0, drain_timeout=5, log_level="warning", http=http)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not (server.started and app.state.ready):
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    live = Live(app, server, url)
    try:
        yield live
    finally:
        live.http.close()
        server.should_exit = True
        thread.join(15)
        sock.close()


@pytest.fixture(scope="module")
def live(embedder):
    with running(embedder, **SHARED) as s:
        yield s


class Spy:
    """Stands in front of an engine: records the inputs of each call of its `method` (`embed`,
    `score` or `tokens`: `record(ids, kwargs)`, the id lists by default), and waits at `gate` (open
    by default) so that a test can hold the worker still while requests queue. `hold_request`
    (route, body) is what `hold` sends; `fail(ids, out)`, where given, replaces the result."""

    def __init__(self, engine, method="embed", hold_request=("/embed", {"inputs": "hold the worker"}), fail=None,
                 record=lambda ids, kw: [list(s) for s in ids]):
        self.engine, self.method, self.hold_request, self.fail, self.record = engine, method, hold_request, fail, record
        self.gate = threading.Event()
        self.gate.set()
        self.calls: list = []
        self.entered = threading.Semaphore(0)

    def __getattr__(self, name):
        return self._gated if name == self.method else getattr(self.engine, name)

    def _gated(self, ids, **kw):
        self.calls.append(self.record(ids, kw))
        self.entered.release()
        assert self.gate.wait(60), "the gate was never opened"
        out = getattr(self.engine, self.method)(ids, **kw)
        return self.fail(ids, out) if self.fail else out

    async def hold(self, http):
        """Close the gate and send one request that the worker takes and holds there: what is
        sent next queues behind it. Returns that request's future (it ends once the gate opens)."""
        self.gate.clear()
        first = asyncio.ensure_future(_post(http, *self.hold_request))
        assert await asyncio.to_thread(self.entered.acquire, True, 30), "the held request never reached the engine"
        return first


@contextlib.contextmanager
def spy_on(batcher, **spy_options):
    """A `Spy` in front of `batcher`'s engine for the block (its gate opened at the end)."""
    spy = Spy(batcher.engine, **spy_options)
    batcher.engine = spy
    try:
        yield spy
    finally:
        spy.gate.set()
        batcher.engine = spy.engine


def spied(live, fail=None):
    return spy_on(live.state.batcher, fail=fail)


def hang_up_while_held(live, spy, batcher, model, route, body):
    """Hold the worker with `spy`'s hold request (on a thread), send `body` to `route` from a client
    that hangs up after 0.5 s, and wait until the server has counted it dropped for `model` with
    nothing left queued on `batcher`; then open the gate and let the held request finish."""
    def dropped():
        return live.metric("modernbert_embed_dropped_requests_total", reason="client_disconnected", model=model)

    before = dropped()
    spy.gate.clear()
    hold_route, hold_body = spy.hold_request
    held = threading.Thread(target=lambda: live.http.post(hold_route, json=hold_body))
    held.start()
    assert spy.entered.acquire(timeout=30)
    with pytest.raises(httpx.ReadTimeout, match="timed out"):
        httpx.post(live.url + route, json=body, timeout=0.5)
    wait_for(lambda: dropped() == before + 1, "the dropped request")
    assert batcher.queued_requests == 0
    spy.gate.set()
    held.join(30)


def wait_for(cond, what, timeout=30):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def raw_ids(embedder, texts):
    """The token ids of texts without [CLS]/[SEP] (what a client sends as token-id input)."""
    return [s[1:-1] for s in embedder.tokenize(texts)[0]]


# ----------------------------------------------------------------------------- shapes and results
def test_openai_client_base64_float_dimensions_prompts(live, embedder):
    openai = pytest.importorskip("openai", reason="the openai client is not installed (the test extra)")
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
    texts = make_texts(5, seed=1)
    want = embedder.encode(texts)
    tokens = sum(len(s) for s in embedder.tokenize(texts)[0])

    r = client.embeddings.create(model="anything", input=texts)  # the client's default: base64
    assert [d.index for d in r.data] == list(range(5)) and r.model == "test-model" and r.object == "list"
    assert r.usage.prompt_tokens == r.usage.total_tokens == tokens
    assert_same([d.embedding for d in r.data], want, "base64")

    r = client.embeddings.create(model="m", input=texts, encoding_format="float")
    assert_same([d.embedding for d in r.data], want, "float")

    r = client.embeddings.create(model="m", input=texts[0], dimensions=32)
    assert len(r.data) == 1 and len(r.data[0].embedding) == 32
    assert_same([r.data[0].embedding], embedder.encode(texts[:1], truncate_dim=32), "dimensions")
    assert abs(np.linalg.norm(r.data[0].embedding) - 1) < 1e-5  # slice, then normalise

    r = client.embeddings.create(model="m", input=raw_ids(embedder, texts[:3]))  # [[int]]
    assert_same([d.embedding for d in r.data], want[:3], "token ids")
    r = client.embeddings.create(model="m", input=raw_ids(embedder, texts[:1])[0])  # [int]
    assert_same([r.data[0].embedding], want[:1], "one token list")

    r = client.embeddings.create(model="m", input=texts[:2], extra_body={"input_type": "query"})
    assert_same([d.embedding for d in r.data], embedder.encode(texts[:2], prompt_name="search_query"), "query")
    r = client.embeddings.create(model="m", input=texts[:2], extra_body={"prompt_name": "search_document"})
    assert_same([d.embedding for d in r.data], embedder.encode(texts[:2], prompt_name="search_document"), "doc")


def test_openai_raw_base64_is_little_endian_float32(live, embedder):
    r = live.http.post("/v1/embeddings", json={"input": "hello there", "model": "m", "encoding_format": "base64"})
    assert r.status_code == 200
    blob = base64.b64decode(r.json()["data"][0]["embedding"])
    assert len(blob) == 4 * HIDDEN
    assert_same([np.frombuffer(blob, dtype="<f4")], embedder.encode(["hello there"]))
    alias = live.http.post("/embeddings", json={"input": ["hello there"], "encoding_format": "float"})  # TEI's alias
    assert alias.status_code == 200 and alias.json()["object"] == "list"
    assert_same([alias.json()["data"][0]["embedding"]], embedder.encode(["hello there"]))
    check_error_shape(live.http.post("/embeddings", json={"input": []}), "/v1/embeddings", 400, "cannot be empty")


def test_tei_embed_shapes_and_options(live, embedder):
    texts = make_texts(4, seed=2)
    r = live.http.post("/embed", json={"inputs": texts})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = r.json()
    assert isinstance(body, list) and len(body) == 4 and all(len(v) == HIDDEN for v in body)
    assert_same(body, embedder.encode(texts))

    body = live.http.post("/embed", json={"inputs": texts[0]}).json()  # one string: still [[float]]
    assert len(body) == 1 and len(body[0]) == HIDDEN

    raw = live.http.post("/embed", json={"inputs": texts, "normalize": False}).json()
    np.testing.assert_allclose(raw, embedder.encode(texts, normalize_embeddings=False), rtol=1e-4, atol=1e-5)
    assert abs(np.linalg.norm(raw[0]) - 1) > 1e-3  # really not normalised

    body = live.http.post("/embed", json={"inputs": texts, "dimensions": 16, "prompt_name": "clustering"}).json()
    assert_same(body, embedder.encode(texts, truncate_dim=16, prompt_name="clustering"))

    mixed = [texts[0], raw_ids(embedder, texts[1:2])[0]]  # TEI takes strings and id lists side by side
    assert_same(live.http.post("/embed", json={"inputs": mixed}).json(), embedder.encode(texts[:2]))


def test_truncation_is_reported_or_refused(live, embedder):
    long = " ".join(["vector"] * 200)  # far over max_seq_length 64
    texts = ["short one", long, "another short"]
    before = live.metric("modernbert_embed_truncated_inputs_total", route="/embed", model="test-model")
    r = live.http.post("/embed", json={"inputs": texts})
    assert r.status_code == 200 and r.headers["x-truncated-inputs"] == "1"
    assert_same(r.json(), embedder.encode(texts))  # encode truncates at max_seq_length too
    assert live.metric("modernbert_embed_truncated_inputs_total", route="/embed", model="test-model") == before + 1

    r = live.http.post("/embed", json={"inputs": texts, "truncate": False})
    assert r.status_code == 422 and r.json()["error_type"] == "validation"
    assert "`inputs[1]` has 202 tokens" in r.json()["error"] and "limit is 64" in r.json()["error"]
    ids = list(range(1000, 1100))  # 100 ids + [CLS] [SEP] > 64
    r = live.http.post("/v1/embeddings", json={"input": [ids], "truncate": False})
    assert r.status_code == 400 and "`input` has 102 tokens" in r.json()["error"]["message"]
    r = live.http.post("/v1/embeddings", json={"input": [ids]})
    assert r.status_code == 200 and r.headers["x-truncated-inputs"] == "1"
    want = embedder.encode_tokens([[REAL_VOCAB["cls_token_id"]] + ids[:MSL - 2] + [REAL_VOCAB["sep_token_id"]]])
    assert_same([r.json()["data"][0]["embedding"]], want)


def test_tokenize_info_models_health_metrics(live, embedder):
    r = live.http.post("/tokenize", json={"inputs": ["hello world", "café"], "prompt_name": "search_query"})
    assert r.status_code == 200
    toks = r.json()
    want = embedder.tokenize(["hello world", "café"], prompt="search_query: ")[0]
    assert [[t["id"] for t in seq] for seq in toks] == want
    first = toks[0]
    assert first[0]["special"] and first[-1]["special"] and not first[1]["special"]
    assert "".join(t["text"] for t in first[1:-1]).replace(" ", "") == "search_query:helloworld"
    assert {"id", "text", "special", "start", "stop"} == set(first[1])

    info = live.http.get("/info").json()
    assert info["served_model_name"] == "test-model" and info["hidden_size"] == HIDDEN
    assert info["max_input_length"] == MSL and info["max_client_batch_size"] == 16
    assert info["prompts"]["search_query"] == "search_query: " and info["model_dtype"] == "float32"
    assert len(info["model_fingerprint"]) == 64 and "WITHOUT [CLS]/[SEP]" in info["token_ids"]
    models = live.http.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "test-model"
    assert live.http.get("/health").json() == {"status": "ok"}
    assert live.http.get("/ready").status_code == 200
    text = live.http.get("/metrics").text
    for name in ("requests_total", "inputs_total", "tokens_total", "queue_duration_seconds", "batch_tokens",
                 "truncated_inputs_total", "rejections_total", "tokens_in_flight"):
        assert f"modernbert_embed_{name}" in text, name


# ----------------------------------------------------------------------------- bad input
BAD = [
    # (route, body: dict or raw bytes, status, words the message must hold)
    ("/v1/embeddings", b"{not json", 400, "not valid JSON"),
    ("/embed", b"{not json", 400, "not valid JSON"),
    ("/v1/embeddings", b'{"input": "caf\xe9"}', 400, "not valid UTF-8"),
    ("/embed", b'{"inputs": "\xff\xfe"}', 400, "not valid UTF-8"),
    ("/embed", b'{"inputs": "\\ud800 lone surrogate"}', 422, "`inputs[0]` is not valid Unicode"),
    ("/embed", b'{"inputs": [[5, 6], "fine", "\\udfff"]}', 422, "`inputs[2]` is not valid Unicode"),
    ("/tokenize", b'{"inputs": ["fine", "\\ud800"]}', 422, "`inputs[1]` is not valid Unicode"),
    ("/v1/embeddings", b'{"input": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, "nested too deeply"),
    ("/v1/embeddings", b'["input"]', 400, "must be a JSON object"),
    ("/v1/embeddings", {"model": "m"}, 400, "`input` is required"),
    ("/v1/embeddings", {"input": 5}, 400, "`input` must be a string"),
    ("/embed", {"inputs": {"a": 1}}, 422, "`inputs` must be a string"),
    ("/v1/embeddings", {"input": []}, 400, "cannot be empty"),
    ("/embed", {"inputs": []}, 400, "cannot be empty"),
    ("/v1/embeddings", {"input": ""}, 400, "empty string"),
    ("/embed", {"inputs": ["ok", ""]}, 400, "`inputs[1]` is an empty string"),
    ("/v1/embeddings", {"input": ["ok", 3.5]}, 400, "`input[1]` is a number"),
    ("/embed", {"inputs": ["ok", None]}, 422, "`inputs[1]` is null"),
    ("/v1/embeddings", {"input": [[5, 6], []]}, 400, "`input[1]` is an empty list"),
    ("/v1/embeddings", {"input": [[5, "x"]]}, 400, "`input[0][1]` is a string"),
    ("/v1/embeddings", {"input": [[5, True]]}, 400, "`input[0][1]` is a boolean"),
    ("/v1/embeddings", {"input": [7, 99999]}, 400, "token id 99999"),
    ("/embed", {"inputs": [[7, -1]]}, 422, "token id -1"),
    ("/v1/embeddings", {"input": [[7, 2 ** 70]]}, 400, "outside the vocabulary"),
    ("/v1/embeddings", {"input": [[REAL_VOCAB["cls_token_id"], 7]]}, 400, "special token id"),
    ("/v1/embeddings", {"input": "x", "dimensions": 0}, 400, "`dimensions` must be >= 1, got 0"),
    ("/v1/embeddings", {"input": "x", "dimensions": -3}, 400, "`dimensions` must be >= 1, got -3"),
    ("/v1/embeddings", {"input": "x", "dimensions": HIDDEN + 1}, 400, f"`dimensions` must be in 1..{HIDDEN}"),
    ("/embed", {"inputs": "x", "dimensions": 0}, 422, "`dimensions` must be >= 1"),
    ("/v1/embeddings", {"input": "x", "dimensions": "8"}, 400, "`dimensions` must be an int"),
    ("/v1/embeddings", {"input": "x", "encoding_format": "int8"}, 400, "unknown `encoding_format` 'int8'"),
    ("/v1/embeddings", {"input": "x", "encoding_format": 3}, 400, "`encoding_format` must be a string"),
    ("/v1/embeddings", {"input": "x", "model": 3}, 400, "`model` must be a string"),
    ("/v1/embeddings", {"input": "x", "input_type": "passage"}, 400, "unknown `input_type` 'passage'"),
    ("/v1/embeddings", {"input": [[5, 6]], "input_type": "query"}, 400, "applies to text inputs"),
    ("/embed", {"inputs": "x", "normalize": "yes"}, 422, "`normalize` must be True or False"),
    ("/embed", {"inputs": "x", "prompt_name": "nope"}, 422, "unknown `prompt_name` 'nope'"),
    ("/embed", {"inputs": "x", "truncation_direction": "left"}, 422, "not supported"),
    ("/v1/embeddings", {"input": ["x"] * 17}, 400, "batch size 17 > maximum allowed batch size 16"),
    ("/embed", {"inputs": ["x"] * 17}, 422, "batch size 17 > maximum allowed batch size 16"),
    ("/tokenize", {"inputs": [[1, 2]]}, 422, "not a string"),
    ("/v1/embeddings", b'{"input": "' + b"a" * 300_000 + b'"}', 413, "over the limit"),
    ("/embed", b'{"inputs": "' + b"a" * 300_000 + b'"}', 413, "over the limit"),
    ("/v1/nowhere", {"input": "x"}, 404, "no route"),
    ("/nowhere", {"input": "x"}, 404, "no route"),
]


def check_error_shape(r, route, status, words):
    assert r.status_code == status, (r.status_code, r.text)
    assert "Traceback" not in r.text and 'File "' not in r.text
    body = r.json()
    if route.startswith("/v1/"):
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
        message = body["error"]["message"]
    else:
        assert set(body) == {"error", "error_type"}
        message = body["error"]
    assert words in message, message


@pytest.mark.parametrize("route,body,status,words", BAD, ids=[f"{b[0]}-{b[3]}" for b in BAD])
def test_bad_input_is_a_4xx_in_the_route_shape(live, route, body, status, words):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    check_error_shape(live.http.post(route, **kw), route, status, words)
    r = live.http.post("/embed", json={"inputs": "still serving"})  # and the server still serves
    assert r.status_code == 200 and len(r.json()[0]) == HIDDEN


def test_payload_limit_without_content_length(live):
    def chunks():
        yield b'{"inputs": "'
        for _ in range(40):
            yield b"a" * 8192
        yield b'"}'

    check_error_shape(live.http.post("/embed", content=chunks()), "/embed", 413, "over the limit")
    assert live.metric("modernbert_embed_rejections_total", reason="payload_too_large") >= 1
    check_error_shape(live.http.get("/embed"), "/embed", 405, "not allowed")


def test_api_key(embedder):
    openai = pytest.importorskip("openai", reason="the openai client is not installed (the test extra)")
    with running(embedder, api_key="s3cret") as s:
        for route, body in (("/v1/embeddings", {"input": "x"}), ("/embed", {"inputs": "x"})):
            check_error_shape(s.http.post(route, json=body), route, 401, "API key")
            r = s.http.post(route, json=body, headers={"Authorization": "Bearer wrong"})
            check_error_shape(r, route, 401, "API key")
            assert r.headers["www-authenticate"] == "Bearer"
            assert s.http.post(route, json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        check_error_shape(s.http.get("/info"), "/info", 401, "API key")
        check_error_shape(s.http.get("/v1/models", headers={"Authorization": "s3cret"}), "/v1/models", 401, "API key")
        for open_route in ("/health", "/ready", "/metrics"):
            assert s.http.get(open_route).status_code == 200, open_route
        def client(key):
            return openai.OpenAI(base_url=s.url + "/v1", api_key=key, max_retries=0)

        with pytest.raises(openai.AuthenticationError, match="API key"):
            client("wrong").embeddings.create(model="m", input="x")
        r = client("s3cret").embeddings.create(model="m", input="x")
        assert len(r.data[0].embedding) == HIDDEN
        assert s.metric("modernbert_embed_rejections_total", reason="unauthorized") == 7


# ----------------------------------------------------------------------------- load
async def _post(client, route, body):
    r = await client.post(route, json=body)
    return r.status_code, r.json(), r.headers


def test_32_concurrent_clients_get_their_own_rows(live, embedder):
    """32 clients, each with its own texts and its own dimensions, for a bounded number of rounds:
    every answer is its own request's, in order; nothing lost, duplicated or crossed."""
    clients, rounds = 32, 4
    texts = {c: make_texts(1 + c % 4, seed=100 + c) for c in range(clients)}
    dims = {c: (None, 64, 16)[c % 3] for c in range(clients)}
    want = {c: embedder.encode(texts[c], truncate_dim=dims[c]) for c in range(clients)}
    forwards = live.state.batcher.forwards

    async def client(c, http):
        out = []
        for _ in range(rounds):
            route = "/embed" if c % 2 else "/v1/embeddings"
            body = {"inputs" if c % 2 else "input": texts[c], "dimensions": dims[c]}
            status, got, _ = await _post(http, route, body)
            assert status == 200, got
            out.append(got if c % 2 else [d["embedding"] for d in got["data"]])
        return out

    async def main():
        async with httpx.AsyncClient(base_url=live.url, timeout=60) as http:
            return await asyncio.gather(*(client(c, http) for c in range(clients)))

    results = asyncio.run(main())
    assert len(results) == clients
    for c, answers in enumerate(results):
        assert len(answers) == rounds
        for got in answers:
            assert_same(got, want[c], f"client {c}")
    assert live.state.batcher.forwards - forwards < clients * rounds  # requests shared forwards


def test_64_one_text_clients_share_a_few_forwards(live, embedder):
    texts = make_texts(64, seed=7)
    want = embedder.encode(texts)
    with spied(live) as spy:
        async def main():
            async with httpx.AsyncClient(base_url=live.url, timeout=60) as http:
                first = await spy.hold(http)
                rest = [asyncio.ensure_future(_post(http, "/embed", {"inputs": t})) for t in texts]
                await asyncio.to_thread(wait_for, lambda: live.state.batcher.queued_requests == 64, "64 queued")
                spy.gate.set()
                return await first, await asyncio.gather(*rest)

        first, rest = asyncio.run(main())
    assert first[0] == 200
    assert [len(call) for call in spy.calls] == [1, 64]  # one forward for the 64 clients
    for t, (status, body, _), w in zip(texts, rest, want):
        assert status == 200
        assert_same(body, w[None], t)


def test_overload_gives_429_with_retry_after_then_full_service(embedder):
    with running(embedder, max_queued_tokens=200) as s:
        with spied(s) as spy:
            async def main():
                async with httpx.AsyncClient(base_url=s.url, timeout=60) as http:
                    first = await spy.hold(http)
                    admitted, refused = [], []
                    for i in range(30):  # 40 tokens each: the queue of 200 is full after 5
                        body = {"input": " ".join(["vector"] * 38)} if i % 2 else {"inputs": " ".join(["token"] * 38)}
                        route = "/v1/embeddings" if i % 2 else "/embed"
                        task = asyncio.ensure_future(_post(http, route, body))
                        while not task.done() and s.state.batcher.queued_requests == len(admitted):
                            await asyncio.sleep(0.005)  # until it is refused or queued
                        if task.done():
                            refused.append((route, task.result()))
                        else:
                            admitted.append(task)
                    spy.gate.set()
                    return await first, await asyncio.gather(*admitted), refused

            first, admitted, refused = asyncio.run(main())
        assert first[0] == 200 and len(admitted) == 5 and len(refused) == 25
        assert s.state.batcher.queued_tokens == 0
        assert all(status == 200 for status, _, _ in admitted)  # every admitted request answered
        for route, (status, body, headers) in refused:
            assert int(headers["retry-after"]) >= 1
            message = body["error"]["message"] if route.startswith("/v1/") else body["error"]
            assert "overloaded" in message
            assert (body["error"]["type"] == "rate_limit_error") if route.startswith("/v1/") else \
                (body["error_type"] == "overloaded")
        assert s.metric("modernbert_embed_rejections_total", reason="overloaded") == len(refused)
        for _ in range(5):  # load gone: full service again
            assert s.http.post("/embed", json={"inputs": " ".join(["token"] * 38)}).status_code == 200
        assert s.state.batcher.queued_tokens == 0 and s.state.batcher.tokens_in_flight == 0


def test_a_disconnected_clients_work_is_dropped(live, embedder):
    gone_texts = ["this client will hang up"] * 3
    with spied(live) as spy:
        hang_up_while_held(live, spy, live.state.batcher, "test-model", "/embed", {"inputs": gone_texts})
        r = live.http.post("/embed", json={"inputs": ["after the hang-up"]})
    assert r.status_code == 200
    assert_same(r.json(), embedder.encode(["after the hang-up"]))
    gone = embedder.tokenize(gone_texts)[0][0]
    assert all(gone not in call for call in spy.calls)  # its inputs never reached the engine


def test_a_failing_forward_fails_only_its_requests(live, embedder):
    pill = embedder.tokenize(["poison pill here"])[0][0]

    def poison(ids, out):
        out[[i for i, s in enumerate(ids) if list(s) == pill]] = float("nan")
        return out

    with spied(live, fail=poison) as spy:
        async def main():
            async with httpx.AsyncClient(base_url=live.url, timeout=60) as http:
                first = await spy.hold(http)
                good = asyncio.ensure_future(_post(http, "/embed", {"inputs": ["a fine text to embed"]}))
                bad = asyncio.ensure_future(_post(http, "/v1/embeddings", {"input": ["poison pill here"]}))
                await asyncio.to_thread(wait_for, lambda: live.state.batcher.queued_requests == 2, "2 queued")
                spy.gate.set()
                return await first, await good, await bad

        first, good, bad = asyncio.run(main())
    assert len(spy.calls[1]) == 2  # the good and the bad request shared one forward
    assert first[0] == 200 and good[0] == 200
    assert_same(good[1], embedder.encode(["a fine text to embed"]))
    assert bad[0] == 500 and "non-finite" in bad[1]["error"]["message"] and bad[1]["error"]["type"] == "server_error"

    def boom(ids, out):
        raise RuntimeError("an engine failure with /secret/path in it")

    with spied(live, fail=boom):
        r = live.http.post("/embed", json={"inputs": "x"})
    check_error_shape(r, "/embed", 500, "internal server error")
    assert "secret" not in r.text
    assert live.http.post("/embed", json={"inputs": "x"}).status_code == 200  # the worker lives on


@pytest.mark.parametrize("given, want", [(None, 4096), (2048, 2048)])
def test_settings_batch_budget_defaults_only_when_absent(given, want):
    assert ServerSettings(max_batch_tokens=given).check(8192, 512, 4096).max_batch_tokens == want


def test_settings_refuse_a_zero_batch_budget():
    with pytest.raises(ValueError, match="max_batch_tokens must be a whole number >= 1, got 0"):
        ServerSettings(max_batch_tokens=0).check(8192, 512, 4096)
