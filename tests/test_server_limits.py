"""The server's limits under attack, in-process on loopback: the cut of long texts before tokenising
(the tokens kept are the same), small requests beside large ones, the request and byte limits, a
client leaving mid-body, no trailing-slash redirect, the read timeouts (and the drain with a slow
body), and errors that never echo a large value whole.

Each test fails on a server without the limit it checks. The heavy attack on a real server process
(peak memory, a one-word request's latency) is in test_server_process.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import socket
import threading
import time

import pytest

pytest.importorskip("starlette", reason="the serve extra is not installed")
httpx = pytest.importorskip("httpx", reason="httpx is not installed (the test extra)")

from conftest import fixture_file  # noqa: E402
from test_server import HIDDEN, MSL, _post, check_error_shape, ckpt, embedder, running, spied  # noqa: E402,F401

from modernbert_embed.tokenizer import CUT_CHARS_PER_TOKEN, CUT_MARGIN, TextTokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    return TextTokenizer(fixture_file("tokenizer.json"))


class Recorder:
    """Stands in for one of `TextTokenizer`'s truncating tokenizers: records the length of every
    text it is given, and waits at `gate` when a call's texts are larger than `hold_over` characters."""

    def __init__(self, tok, hold_over=None):
        self.tok, self.hold_over = tok, hold_over
        self.lengths: list[int] = []
        self.gate = threading.Event()
        if hold_over is None:
            self.gate.set()
        self.held = threading.Semaphore(0)

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def _record(self, texts):
        self.lengths.extend(len(t) for t in texts)
        if self.hold_over is not None and sum(map(len, texts)) > self.hold_over:
            self.held.release()
            assert self.gate.wait(60), "the gate was never opened"

    def encode_batch_fast(self, texts, **kw):
        self._record(texts)
        return self.tok.encode_batch_fast(texts, **kw)

    def encode_batch(self, texts, **kw):
        self._record(texts)
        return self.tok.encode_batch(texts, **kw)


def record(tokenizer: TextTokenizer, max_length: int, hold_over=None) -> Recorder:
    tokenizer._for_length(max_length)
    rec = tokenizer._by_length[max_length] = Recorder(tokenizer._by_length[max_length], hold_over)
    return rec


def unrecord(tokenizer: TextTokenizer, max_length: int) -> None:
    rec = tokenizer._by_length[max_length]
    if isinstance(rec, Recorder):
        rec.gate.set()
        tokenizer._by_length[max_length] = rec.tok


# ----------------------------------------------------------------------------- the cut
def texts_to_cut(seed=0):
    """Texts whose cut falls in every kind of place: between words, in runs of spaces and
    newlines, in digits, punctuation, emoji (4 UTF-8 bytes, several tokens each), combining marks,
    added tokens, long words, and one word longer than the short cut."""
    rng = random.Random(seed)
    words = ["the", "quick", "brown", "fox", "über", "naïve", "東京", "😀😀", "e\u0301\u0301", "1234567",
             "...", "—", "|||IP_ADDRESS|||", "[MASK]", "<|endoftext|>", "don't", "a" * 40]
    seps = [" ", "  ", "\n", "\t", "    ", "", " " * 30]
    out = []
    for _ in range(40):
        n = rng.randint(200, 3000)
        out.append("".join(rng.choice(words) + rng.choice(seps) for _ in range(n)))
    out += ["a" * 5000, "ab1" * 3000, " " * 5000, "😀" * 3000, "x" + " " * 4000 + "y" * 10, ". " * 5000,
            "e" + "\u0301" * 3000, "|||IP_ADDRESS|||" * 600, "".join(rng.choice("abc ") for _ in range(20000))]
    return out


@pytest.mark.parametrize("max_length", [8, 64, 300])
def test_the_cut_keeps_the_tokens_of_the_whole_text(tokenizer, max_length):
    """The tokens of a cut text, truncated, are those of the whole text, truncated; and the text
    given to the tokenizer is at most the sure cut (the short one for ordinary text)."""
    whole = tokenizer._for_length(max_length)
    sure, short = tokenizer.cut_bound(max_length), max_length * CUT_CHARS_PER_TOKEN + CUT_MARGIN
    texts = texts_to_cut()
    rec = record(tokenizer, max_length)
    try:
        for prompt in ("", "search_query: "):
            rec.lengths.clear()
            got, cut = tokenizer.encode(texts, prompt, max_length)
            want = whole.encode_batch([prompt + t for t in texts], add_special_tokens=True)
            for i, (g, w, c) in enumerate(zip(got, want, cut)):
                assert g == w.ids, f"text {i}: the cut changed its tokens"
                assert c == (len(w.overflowing) > 0), f"text {i}"
            assert max(rec.lengths) <= sure
            ordinary = rec.lengths[:40]
            assert max(ordinary) <= short, "ordinary text took the sure cut"
    finally:
        unrecord(tokenizer, max_length)
    # /tokenize's encodings: the same cut, with and without [CLS]/[SEP]
    for special in (True, False):
        got = tokenizer.encode_offsets(texts[:10], max_length, special)
        want = whole.encode_batch(texts[:10], add_special_tokens=special)
        assert [e.ids for e in got] == [e.ids for e in want]


def test_a_megabyte_text_is_cut_before_it_is_tokenised(tokenizer):
    rec = record(tokenizer, 512)
    try:
        ids, cut = tokenizer.encode(["the quick brown fox " * 50_000, "a" * 1_000_000], "", 512)
    finally:
        unrecord(tokenizer, 512)
    assert [len(s) for s in ids] == [512, 512] and cut == [True, True]
    assert rec.lengths[0] <= 512 * CUT_CHARS_PER_TOKEN + CUT_MARGIN  # the short cut
    assert rec.lengths[1] <= tokenizer.cut_bound(512) < 1_000_000  # one word: the sure cut


class Sides:
    """Stands in for the untruncated tokenizer: records the length of every text it is given."""

    def __init__(self, tok):
        self.tok, self.lengths = tok, []

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def encode_batch_fast(self, texts, **kw):
        self.lengths.extend(map(len, texts))
        return self.tok.encode_batch_fast(texts, **kw)

    def encode_batch(self, texts, **kw):
        self.lengths.extend(map(len, texts))
        return self.tok.encode_batch(texts, **kw)


def pairs_as_the_library_truncates(tokenizer, pairs, max_length):
    """The tokenizers library's own pair encoding, truncated longest first (its overflowing
    pieces grow with the product of the sides' lengths: keep the sides short)."""
    want = tokenizer._for_length(max_length).encode_batch(pairs, add_special_tokens=True)
    return [w.ids for w in want], [len(w.overflowing) > 0 for w in want]


@pytest.mark.parametrize("max_length", [8, 64, 300])
def test_a_pair_is_truncated_longest_first_as_the_library_does(tokenizer, max_length):
    """A cross-encoder's pairs: each side is cut before tokenising, and the pair's tokens are
    those of the library's own longest-first truncation of the whole pair, for every mix of lengths
    (both sides short, one long, both long, equal lengths)."""
    clip = max_length * 20
    texts = [t[:clip] for t in texts_to_cut(seed=1)]
    words = ["what is the capital of China?", "", "Beijing", "a " * (max_length // 2), "b " * max_length]
    pairs = [(q, d) for q in words for d in words] + list(zip(texts[:25], texts[25:])) + \
        [(t, "what is the capital of China?") for t in texts[:10]] + [(t, t) for t in texts[:5]]
    got = tokenizer.encode_pairs(pairs, max_length)
    assert got == pairs_as_the_library_truncates(tokenizer, pairs, max_length)


def test_a_pair_of_long_sides_keeps_the_odd_token_on_the_longer_whole(tokenizer):
    """Both sides cut: the side longer as a whole keeps the odd token (an odd budget of 61), even
    where its cut holds fewer tokens than the other side's cut."""
    pair = ("international " * 2000, "7 " * 1500)  # 2,000 against 1,500 tokens; cut: 78 against 544
    rec = tokenizer._by_length[None] = Sides(tokenizer._by_length[None])
    try:
        got = tokenizer.encode_pairs([pair], 64)
    finally:
        tokenizer._by_length[None] = rec.tok
    assert got == pairs_as_the_library_truncates(tokenizer, [pair], 64)
    assert min(rec.lengths) < len(pair[1])  # the sides were cut before the whole ones were counted


def test_a_megabyte_document_in_a_pair_is_cut_before_it_is_tokenised(tokenizer):
    query, doc = "the quick brown fox", "jumps over the lazy dog " * 50_000
    rec = tokenizer._by_length[None] = Sides(tokenizer._by_length[None])
    try:
        (ids,), (cut,) = tokenizer.encode_pairs([(query, doc)], 512)
    finally:
        tokenizer._by_length[None] = rec.tok
    assert max(rec.lengths) <= 512 * CUT_CHARS_PER_TOKEN + CUT_MARGIN and cut
    assert ([ids], [cut]) == pairs_as_the_library_truncates(tokenizer, [(query, doc[:20_000])], 512)

# ----------------------------------------------------------------------------- the server
LIMITS = dict(served_model_name="test-model", max_client_batch_size=16, payload_limit=256 * 1024,
              tokenization_workers=2)


def test_a_long_text_is_cut_before_it_is_tokenised_on_embed_and_tokenize(embedder):
    long = "the quick brown fox jumps " * 9000  # 234 kB: 45,000 tokens whole
    with running(embedder, **LIMITS) as s:
        rec = record(s.state.tokenizer, MSL)
        try:
            r = s.http.post("/embed", json={"inputs": long})
            assert r.status_code == 200 and r.headers["x-truncated-inputs"] == "1"
            assert rec.lengths and max(rec.lengths) <= MSL * CUT_CHARS_PER_TOKEN + CUT_MARGIN
            r = s.http.post("/tokenize", json={"inputs": [long, "short one"]})
        finally:
            unrecord(s.state.tokenizer, MSL)
        assert r.status_code == 200
        toks = r.json()
        assert [len(t) for t in toks] == [MSL, 4]  # the tokens the model sees, not 45,000
        assert toks[0][-1]["special"] and len(r.content) < 10_000
        assert [t["id"] for t in toks[0]] == embedder.tokenize([long])[0][0]


def test_a_one_word_request_does_not_wait_behind_large_ones(embedder):
    """Six large requests hold their tokenising (every thread that takes them): a one-word request
    is answered within 1 s all the same, and the large ones complete afterwards."""
    # 16 texts of 1,000 characters (under the cut), the body padded past 64 kB: the large lane
    big = json.dumps({"inputs": ["the quick brown fox " * 50] * 16}) + " " * 70_000
    with running(embedder, **LIMITS) as s:
        rec = record(s.state.tokenizer, MSL, hold_over=10_000)
        try:
            async def main():
                async with httpx.AsyncClient(base_url=s.url, timeout=60) as http:
                    large = [asyncio.ensure_future(http.post("/embed", content=big)) for _ in range(6)]
                    lane = getattr(s.state, "large_pool", s.state.pool)  # (one pool for all, before)
                    for _ in range(lane._max_workers):  # every thread of the lane holds a large request
                        await asyncio.to_thread(rec.held.acquire)
                    t0 = time.perf_counter()
                    small = await asyncio.wait_for(_post(http, "/embed", {"inputs": "word"}), 5)
                    took = time.perf_counter() - t0
                    rec.gate.set()
                    return took, small, await asyncio.gather(*large)

            took, small, large = asyncio.run(main())
        finally:
            unrecord(s.state.tokenizer, MSL)
    assert small[0] == 200 and len(small[1][0]) == HIDDEN
    assert took < 1.0, f"a one-word request took {took:.2f} s behind large ones"
    assert [r.status_code for r in large] == [200] * 6


def test_max_concurrent_requests_on_every_route(embedder):
    with running(embedder, **LIMITS, max_concurrent_requests=2) as s:
        with spied(s) as spy:
            async def main():
                async with httpx.AsyncClient(base_url=s.url, timeout=60) as http:
                    first = await spy.hold(http)
                    second = asyncio.ensure_future(_post(http, "/embed", {"inputs": "queued"}))
                    while s.state.batcher.queued_requests < 1:
                        await asyncio.sleep(0.005)
                    refused = [await http.post("/embed", json={"inputs": "x"}), await http.get("/info"),
                               await http.post("/v1/embeddings", json={"input": "x"}),
                               await http.post("/tokenize", json={"inputs": "x"})]
                    public = [await http.get(p) for p in ("/health", "/ready", "/metrics")]
                    spy.gate.set()
                    return await first, await second, refused, public

            first, second, refused, public = asyncio.run(main())
        assert first[0] == 200 and second[0] == 200
        for r in refused:
            assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1, r.text
            assert "2 requests in flight, limit 2" in r.text
        assert [r.status_code for r in public] == [200, 200, 200]  # never refused: probes and scrapes
        assert s.http.post("/embed", json={"inputs": "x"}).status_code == 200  # room again
        info = s.http.get("/info").json()
        assert info["max_concurrent_requests"] == 2 and info["max_bytes_in_flight"] == 128 * 1024 * 1024


def test_bytes_in_flight_are_bounded_server_wide(embedder):
    body = {"inputs": ["the quick brown fox " * 520] * 15}  # 156 kB each: two are more than 300 KiB
    with running(embedder, **LIMITS, max_bytes_in_flight=300 * 1024) as s:
        with spied(s) as spy:
            async def main():
                async with httpx.AsyncClient(base_url=s.url, timeout=60) as http:
                    spy.gate.clear()
                    first = asyncio.ensure_future(_post(http, "/embed", body))  # held in the forward
                    await asyncio.to_thread(spy.entered.acquire)
                    second = await http.post("/embed", json=body)
                    small = asyncio.ensure_future(_post(http, "/embed", {"inputs": "small"}))
                    while s.state.batcher.queued_requests < 1:
                        await asyncio.sleep(0.005)
                    held = s.state.bytes_in_flight
                    spy.gate.set()
                    return await first, second, await small, held

            first, second, small, held = asyncio.run(main())
        assert first[0] == 200 and small[0] == 200
        check_error_shape(second, "/embed", 429, "bytes of requests and answers")
        assert int(second.headers["retry-after"]) >= 1
        assert 156_000 < held < 300 * 1024
        assert s.state.bytes_in_flight == 0  # all given back


def test_a_client_leaving_mid_body_is_a_499_and_one_log_line(embedder, caplog):
    with running(embedder, **LIMITS) as s:
        port = int(s.url.rsplit(":", 1)[1])
        with caplog.at_level(logging.INFO):
            for _ in range(3):
                with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                    sock.sendall(b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: 1000\r\n\r\n{\"inputs\": \"abc")
                    time.sleep(0.1)
            deadline = time.monotonic() + 10
            while s.metric("modernbert_embed_requests_total", route="/embed", status="499") < 3:
                assert time.monotonic() < deadline, "the disconnects were not counted as 499"
                time.sleep(0.05)
        assert s.metric("modernbert_embed_requests_total", route="/embed", status="500") == 0
        records = [r for r in caplog.records if r.name.startswith(("modernbert_embed", "uvicorn"))]
        assert not [r for r in records if r.levelno >= logging.ERROR or r.exc_info], [r.getMessage() for r in records]
        assert sum("left during POST /embed" in r.getMessage() for r in records) == 3


def test_no_redirect_on_a_trailing_slash(embedder):
    with running(embedder, **LIMITS) as s:
        for route in ("/embed/", "/v1/embeddings/"):
            r = s.http.post(route, json={"inputs": "x"}, headers={"Host": "evil.example"})
            assert "location" not in r.headers
            check_error_shape(r, route, 404, f"no route {route}")


def test_errors_quote_a_large_value_cut(embedder):
    with running(embedder, **LIMITS) as s:
        for route, body, name in (
                ("/v1/embeddings", {"input": "x", "encoding_format": "f" * 200_000}, "encoding_format"),
                ("/embed", {"inputs": "x", "prompt_name": "p" * 200_000}, "prompt_name"),
                ("/embed", {"inputs": "x", "truncation_direction": "l" * 200_000}, "truncation")):
            r = s.http.post(route, json=body)
            assert r.status_code in (400, 422) and len(r.content) < 1000, (route, len(r.content))
            assert "(cut; 200002 characters)" in r.text and name in r.text
        r = s.http.post("/" + "n" * 5000, json={})
        assert r.status_code == 404 and len(r.content) < 1000 and "(cut;" in r.text


# ----------------------------------------------------------------------------- timeouts and the drain
def _closed_within(sock, seconds) -> float:
    """Seconds until the server closes `sock` (reading what it sends); fails after `seconds`."""
    sock.settimeout(seconds)
    t0 = time.monotonic()
    data = b""
    try:
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:  # closed with unread data: a reset
                chunk = b""
            if not chunk:
                return time.monotonic() - t0, data
            data += chunk
    except socket.timeout:
        raise AssertionError(f"the server kept the connection open for {seconds} s; got {data[:200]!r}") from None


@pytest.mark.parametrize("http", ["h11", "httptools"])
def test_slow_headers_idle_connections_and_slow_bodies_time_out(embedder, http):
    if http == "httptools":
        pytest.importorskip("httptools", reason="httptools is not installed")
    with running(embedder, http=http, **LIMITS, read_timeout=1.0) as s:
        port = int(s.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as idle, \
                socket.create_connection(("127.0.0.1", port)) as slow_headers, \
                socket.create_connection(("127.0.0.1", port)) as slow_body:
            slow_headers.sendall(b"POST /embed HTTP/1.1\r\nHost: x\r\n")  # and never the rest
            slow_body.sendall(b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"inputs\"")
            took, _ = _closed_within(idle, 5)
            assert took < 2.5
            took, _ = _closed_within(slow_headers, 5)
            assert took < 2.5
            took, answer = _closed_within(slow_body, 5)
            assert answer.startswith(b"HTTP/1.1 408 ") and b"took longer than 1 s" in answer, answer[:300]
        with socket.create_connection(("127.0.0.1", port)) as many_headers:  # headers without end
            many_headers.sendall(b"POST /embed HTTP/1.1\r\nHost: x\r\n")
            try:
                for _ in range(100):
                    many_headers.sendall(b"X-Pad: " + b"p" * 1000 + b"\r\n")
            except OSError:  # the server closed it (h11: 431 or 400; httptools: closed)
                pass
            took, _ = _closed_within(many_headers, 5)
            assert took < 0.5
        assert s.http.post("/embed", json={"inputs": "x"}).status_code == 200
        assert s.metric("modernbert_embed_rejections_total", reason="request_timeout") == 1


def test_a_slow_body_does_not_hold_the_drain(embedder):
    """SIGTERM with a body arriving one byte a second: the server cuts it off (503) and exits in
    about a second, not at the end of its drain timeout (5 s here) or the read timeout (30 s)."""
    with running(embedder, **LIMITS) as s:
        port = int(s.url.rsplit(":", 1)[1])
        sock = socket.create_connection(("127.0.0.1", port))
        stop = threading.Event()

        def trickle():
            try:
                sock.sendall(b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")
                while not stop.wait(1.0):
                    sock.sendall(b" ")
            except OSError:
                pass

        sender = threading.Thread(target=trickle)
        sender.start()
        try:
            deadline = time.monotonic() + 10
            while s.state.in_flight < 1:
                assert time.monotonic() < deadline, "the slow request never arrived"
                time.sleep(0.02)
            t0 = time.monotonic()
            s.server.handle_exit(15, None)  # what SIGTERM calls
            while s.server.started and not s.server.should_exit:
                assert time.monotonic() - t0 < 10
                time.sleep(0.02)
            took = time.monotonic() - t0
        finally:
            stop.set()
            sender.join(10)
            sock.close()
        assert took < 2.0, f"the drain waited {took:.1f} s for a slow body"
        scraped = s.state.metrics.render().decode()
        assert 'modernbert_embed_requests_total{route="/embed",status="503"} 1.0' in scraped, scraped


def test_a_small_request_is_not_queued_behind_large_ones(embedder):
    """Two large requests (a forward each) and then a one-word request queue behind the forward in
    progress: the one-word request gets the next forward, and the large ones the two after."""
    big = {"inputs": ["the quick brown fox " * 20] * 16}  # 16 x 64 tokens: one forward of 1024
    with running(embedder, **LIMITS, max_batch_tokens=1024) as s:
        with spied(s) as spy:
            async def main():
                async with httpx.AsyncClient(base_url=s.url, timeout=60) as http:
                    first = await spy.hold(http)
                    large = []
                    for _ in range(2):
                        large.append(asyncio.ensure_future(_post(http, "/embed", big)))
                        while s.state.batcher.queued_requests < len(large):
                            await asyncio.sleep(0.005)
                    small = asyncio.ensure_future(_post(http, "/embed", {"inputs": "word"}))
                    while s.state.batcher.queued_requests < 3:
                        await asyncio.sleep(0.005)
                    spy.gate.set()
                    return await first, await asyncio.gather(*large), await small

            first, large, small = asyncio.run(main())
    assert first[0] == small[0] == 200 and [r[0] for r in large] == [200, 200]
    assert [len(call) for call in spy.calls] == [1, 1, 16, 16]  # held, the one word, then the large ones
