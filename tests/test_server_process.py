"""The real command, `python -m modernbert_embed serve`, in a subprocess: it starts, serves, and on
SIGTERM under load drains (readiness 503, new work refused with 503, requests in flight answered)
and exits 0 within the drain timeout. Also its refusals of bad options."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

pytest.importorskip("starlette", reason="the serve extra is not installed")
httpx = pytest.importorskip("httpx", reason="httpx is not installed (the test extra)")

from conftest import ROOT, fixture_file  # noqa: E402
from helpers import REAL_VOCAB  # noqa: E402

DRAIN_TIMEOUT = 20
WORDS = "the a of server batch embedding model request queue token window vector search".split()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from modernbert_embed.weights import write_random_checkpoint

    return write_random_checkpoint(tmp_path_factory.mktemp("serve-proc"), REAL_VOCAB, seed=5,
                                   tokenizer_json=fixture_file("tokenizer.json"), max_seq_length=256)


def start(ckpt, *extra):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MODERNBERT_EMBED_API_KEY", None)
    proc = subprocess.Popen([sys.executable, "-m", "modernbert_embed", "serve", "--model", str(ckpt), "--port", "0",
                             "--device", "cpu", *map(str, extra)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    return proc, lines


def wait_url(proc, lines, timeout=120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in list(lines):
            m = re.search(r"serving on (http://127\.0\.0\.1:\d+)", line)
            if m:
                return m[1]
        assert proc.poll() is None, "the server exited:\n" + "".join(lines)
        time.sleep(0.05)
    raise AssertionError("the server did not start:\n" + "".join(lines))


def wait_ready(url, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if httpx.get(url + "/ready").status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError("the server never became ready")


def tokens_in_flight(url) -> float:
    return float(re.search(r"^modernbert_embed_tokens_in_flight (\S+)$", httpx.get(url + "/metrics").text, re.M)[1])


@pytest.mark.slow
def test_sigterm_under_load_drains_and_exits_0(ckpt):
    from modernbert_embed import Embedder

    proc, lines = start(ckpt, "--drain-timeout", DRAIN_TIMEOUT, "--max-batch-tokens", 4096)
    try:
        url = wait_url(proc, lines)
        wait_ready(url)
        assert httpx.get(url + "/health").json() == {"status": "ok"}
        rng = np.random.default_rng(0)
        texts = {c: [" ".join(rng.choice(WORDS, 120)) for _ in range(8)] for c in range(6)}
        log: list[tuple] = []  # (client, sent, answered, status or exception name, body)
        stop = threading.Event()

        def client(c):
            with httpx.Client(base_url=url, timeout=60) as http:
                while not stop.is_set():
                    sent = time.monotonic()
                    try:
                        r = http.post("/embed", json={"inputs": texts[c]})
                        log.append((c, sent, time.monotonic(), r.status_code, r.json()))
                        if r.status_code == 503:
                            time.sleep(0.05)
                    except httpx.TransportError as e:  # after the drain the port is closed
                        log.append((c, sent, time.monotonic(), type(e).__name__, None))
                        return

        threads = [threading.Thread(target=client, args=(c,)) for c in range(6)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while tokens_in_flight(url) < 2 * 8 * 120:  # at least two requests admitted
            assert time.monotonic() < deadline, "the load never built up"
            time.sleep(0.02)
        sigterm = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        ready_after = []
        while proc.poll() is None and time.monotonic() - sigterm < DRAIN_TIMEOUT + 5:
            try:
                ready_after.append(httpx.get(url + "/ready", timeout=5).status_code)
            except httpx.TransportError:
                break
            time.sleep(0.02)
        rc = proc.wait(timeout=DRAIN_TIMEOUT + 10)
        exited = time.monotonic()
        stop.set()
        for t in threads:
            t.join(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = "".join(lines)
    assert rc == 0, out
    assert exited - sigterm <= DRAIN_TIMEOUT + 1, f"took {exited - sigterm:.1f} s to exit"
    assert 503 in ready_after and 200 not in ready_after, ready_after
    assert "Traceback" not in out, out

    model = Embedder.from_pretrained(ckpt, device="cpu")
    want = {c: model.encode(texts[c]) for c in texts}
    in_flight_answered = 0
    for c, sent, answered, status, body in log:
        if answered < sigterm:
            assert status == 200, (status, body)
        if status == 200:
            got = np.asarray(body)
            cos = (got * want[c]).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want[c], axis=1)
            assert got.shape == want[c].shape and cos.min() >= 0.99999, f"client {c}: wrong rows"
            in_flight_answered += sent < sigterm < answered
        elif status == 503:
            assert sent > sigterm - 1 and body["error_type"] == "unhealthy" and "shutting down" in body["error"]
        else:  # the port closed after the drain
            assert status in ("ConnectError", "RemoteProtocolError", "ReadError") and answered > sigterm, status
    assert in_flight_answered >= 2, "no request was in flight at SIGTERM"


def test_refused_invocations(ckpt, tmp_path, capsys):
    from modernbert_embed.cli import main

    def run(*args):
        try:
            rc = main(["serve", *map(str, args)])
        except SystemExit as e:  # argparse
            rc = e.code
        return rc, capsys.readouterr().err

    rc, err = run("--model", ckpt, "--max-input-tokens", 100000, "--port", 0)
    assert rc == 2 and "max_input_tokens must be in 2..8192" in err, err
    rc, err = run("--model", ckpt, "--max-queued-tokens", 100, "--port", 0)  # max_seq_length 256
    assert rc == 2 and "max_queued_tokens (100) must hold at least one input of max_input_tokens (256)" in err, err
    rc, err = run("--model", tmp_path / "nothing-here", "--port", 0)
    assert rc == 2 and "cannot load the model" in err, err
    rc, err = run("--model", ckpt, "--max-batch-tokens", 0)
    assert rc == 2 and "expected a number >= 1" in err, err


@pytest.mark.slow
def test_the_command_line_works_without_the_serve_extra(ckpt):
    """Without starlette, uvicorn and prometheus-client, `embed` still parses and `serve` says
    what to install (exit 2), rather than the whole command failing to import."""
    code = ("import sys\n"
            "for name in ('starlette', 'uvicorn', 'prometheus_client'):\n"
            "    sys.modules[name] = None\n"
            "from modernbert_embed.cli import build_parser, main\n"
            "assert build_parser().parse_args(['embed', 'x', '-o', 'y']).command == 'embed'\n"
            f"sys.exit(main(['serve', '--model', {str(ckpt)!r}]))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "pip install 'modernbert-embed[serve]'" in r.stderr, r.stderr

