"""Serving benchmark: `modernbert-embed serve` under closed-loop HTTP load, against a direct
`Embedder.encode` of the same texts and, when its environment is given, Infinity serving the same
checkpoint, driven by the same load generator.

    python benchmarks/bench_serve.py --infinity-python /path/to/infinity-venv/bin/python
    python benchmarks/bench_serve.py --quick --out /tmp/serve.json     # a small model, seconds
    python benchmarks/bench_serve.py --mode rerank --infinity-python ...  # a reranker: /v1/rerank vs /rerank

Workloads (texts of common words, of exact token counts with [CLS] and [SEP], made with the real
tokenizer): "short" one text of about 50 tokens (30 to 70, uniformly) per request, "batch16" 16
such texts per request, "long512" one 512-token text per request; each at concurrency 1, 8, 32
and 64 (closed loop: every client sends its next request when the last is answered). Requests go
to the OpenAI route with `encoding_format=base64` (the official client's default). Every request
carries texts of its own, so nothing can be served from a cache.

Reported per row: tokens/s and requests/s over the wall time of the level, p50/p95/p99 latency,
failures, our mean batch size (inputs per forward, from the server's metrics), and the server
process's CPU time per 1000 tokens (on a shared machine the wall-time figures move with the
neighbours' load; the CPU time per token moves much less). Goals: at
concurrency 64 with one short text per request, >= 80% of the tokens/s of one direct `encode` over
the same texts; at concurrency 1, a median latency within 1.2x of a direct `encode` of one text
(measured in pairs: each text of the level sent once to the server and encoded once directly, back to
back, the median of the per-pair ratios, so that the host's drift between two separate
measurements cannot decide it); against Infinity at concurrency 64 (short), >= 2x its tokens/s and
a lower p99.

Rerank mode (`--mode rerank`): a random one-label cross-encoder of the same shape, served alone;
each request is one query (8 to 16 tokens) and `--documents` documents (30 to 70 tokens each,
default 32), sent to our `/v1/rerank` and to Infinity's `/rerank` (the same Cohere-shaped body),
at concurrency 16 by default; tokens are the pairs' (`[CLS] q [SEP] d [SEP]`). The reference is
one direct `CrossEncoder.predict` over the top level's pairs; the goal, >= 0.8x its tokens/s.

The load generator is a bounded asyncio HTTP/1.1 client of its own (one keep-alive connection per
client, pre-serialised bodies, no JSON decoding of the embeddings), so that the client takes as
little of the machine as it can. Contenders alternate level by level (which one goes first flips
each level) to spread the host's drift over both. Every server but the one being measured is
frozen (SIGSTOP) for the level, and all of them during the direct `encode`: an idle Infinity
process kept most of one core busy on this 2-core machine, which would be charged to the others.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

# The harness beside this script; modernbert_embed is the installed package (an editable install of
# this checkout), for the server and the direct reference alike.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as h  # noqa: E402
from modernbert_embed.ops import default_max_batch_tokens  # noqa: E402

ROOT = h.ROOT
FIXTURES = h.FIXTURES
# What transformers' AutoTokenizer needs beside tokenizer.json (the real checkpoint ships it).
TOKENIZER_CONFIG = {"clean_up_tokenization_spaces": True, "cls_token": "[CLS]", "mask_token": "[MASK]",
                    "model_max_length": 8192, "pad_token": "[PAD]", "sep_token": "[SEP]", "unk_token": "[UNK]",
                    "tokenizer_class": "PreTrainedTokenizerFast", "model_input_names": ["input_ids", "attention_mask"]}
WORDS = ("the of and a to in is that for it as was with be by on not he this are or his from at which but have an "
         "they you were her she there been one all we their has would when if so no will can more who time year "
         "people way day man thing woman life child world school state family student group country problem hand "
         "part place case week company system program question work government number night point home water "
         "room mother area money story fact month lot right study book eye job word business issue side kind head "
         "house service friend father power hour game line end member law car city community name president team "
         "minute idea kid body information back parent face others level office door health person art war history "
         "party result change morning reason research girl guy moment air teacher force education").split()
# texts per request, and the range their token counts are drawn from (uniformly, [CLS] and [SEP] included)
WORKLOADS = {"short": (1, (30, 70)), "batch16": (16, (30, 70)), "long512": (1, (512, 512))}
# rerank mode: the query's and each document's token counts ([CLS] and [SEP] included)
RERANK_QUERY, RERANK_DOCUMENT = (8, 16), (30, 70)


# ----------------------------------------------------------------------------- texts
def text_of_tokens(tok, rng: np.random.Generator, n: int) -> str:
    """A text of random common words that tokenises to exactly `n` tokens with [CLS] and [SEP]."""
    words = " ".join(rng.choice(WORDS, size=2 * n))
    enc = tok.encode(words, add_special_tokens=False)
    text = words[:enc.offsets[n - 3][1]]  # the first n - 2 tokens
    while len(tok.encode(text).ids) > n:
        text = text[:text.rfind(" ")]
    while len(tok.encode(text).ids) < n:
        text += " a"
    assert len(tok.encode(text).ids) == n, (n, text)
    return text


def make_requests(tok, workload: str, count: int, seed: int) -> list[tuple[list[str], int]]:
    """`count` requests of `workload`: (texts, their tokens)."""
    per, (low, high) = WORKLOADS[workload]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        lengths = rng.integers(low, high + 1, size=per)
        out.append(([text_of_tokens(tok, rng, int(n)) for n in lengths], int(lengths.sum())))
    return out


def make_rerank_requests(tok, count: int, documents: int, seed: int) -> list[tuple[list[str], int]]:
    """`count` rerank requests: ([query, *documents], the tokens of their pairs, `[CLS] q [SEP] d
    [SEP]` each, q + d - 1 for texts of q and d tokens with their own [CLS] and [SEP])."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        q = int(rng.integers(RERANK_QUERY[0], RERANK_QUERY[1] + 1))
        lengths = rng.integers(RERANK_DOCUMENT[0], RERANK_DOCUMENT[1] + 1, size=documents)
        texts = [text_of_tokens(tok, rng, q)] + [text_of_tokens(tok, rng, int(n)) for n in lengths]
        out.append((texts, int(sum(q + int(n) - 1 for n in lengths))))
    return out


# ----------------------------------------------------------------------------- load generator
@dataclass
class Shot:
    sent: float
    latency: float
    status: int


async def _read_response(reader) -> tuple[int, bytes]:
    status = int((await reader.readline()).split()[1])
    length, chunked = 0, False
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        if name.lower() == "content-length":
            length = int(value)
        elif name.lower() == "transfer-encoding" and "chunked" in value.lower():
            chunked = True
    if not chunked:
        return status, await reader.readexactly(length)
    body = b""
    while True:
        size = int((await reader.readline()).split(b";")[0], 16)
        body += await reader.readexactly(size + 2)
        if size == 0:
            return status, body


class Connection:
    """One keep-alive HTTP/1.1 connection, opened on first use and again after a failure."""

    def __init__(self, host: str, port: int, path: str, timeout: float):
        self.host, self.port, self.path, self.timeout = host, port, path, timeout
        self.reader = self.writer = None

    async def post(self, body: bytes) -> Shot:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = (f"POST {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json"
                f"\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        sent = time.perf_counter()
        try:
            self.writer.write(head + body)
            await self.writer.drain()
            status, _ = await asyncio.wait_for(_read_response(self.reader), self.timeout)
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError, IndexError):
            status = 0
            self.close()
        return Shot(sent, time.perf_counter() - sent, status)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def closed_loop(host: str, port: int, path: str, bodies: list[bytes], concurrency: int,
                      timeout: float) -> tuple[list[Shot], float]:
    """Send every body once, `concurrency` clients each on its own keep-alive connection, each
    sending its next request when the last is answered. Returns the shots and the wall time."""
    todo = iter(range(len(bodies)))
    shots: list[Shot | None] = [None] * len(bodies)

    async def client():
        conn = Connection(host, port, path, timeout)
        for i in todo:
            shots[i] = await conn.post(bodies[i])
        conn.close()

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(min(concurrency, len(bodies)))))
    return [s for s in shots if s is not None], time.perf_counter() - start


# ----------------------------------------------------------------------------- servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server in a subprocess: started, waited for, scraped, stopped."""

    def __init__(self, name: str, cmd: list[str], port: int, path: str, ready: str, env=None, log=None,
                 body=None):
        self.name, self.port, self.path, self.ready = name, port, path, ready
        self.body = body or body_of  # a request's texts -> its JSON body
        self.log = open(log, "w") if log else subprocess.DEVNULL
        # PYTHONSAFEPATH: `python -m` in ROOT must not put the checkout's top-level kernels/ (installed as
        # modernbert_embed.kernels) on sys.path, where it would shadow PyPI's `kernels`, which transformers imports.
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONSAFEPATH": "1", **(env or {})},
                                     stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} before it was ready")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{self.ready}", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"{self.name} was not ready within {timeout:.0f} s")

    def metric_sums(self) -> dict[str, float]:
        """Our server's batch histograms (sum and count of inputs and tokens per forward, over its
        models)."""
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as r:
            text = r.read().decode()
        sums: dict[str, float] = {}
        for m in re.finditer(r"^modernbert_embed_(batch_\w+_(?:sum|count))(?:\{[^}]*\})? (\S+)$", text, re.M):
            sums[m[1]] = sums.get(m[1], 0.0) + float(m[2])  # summed over the served models
        return sums

    def cpu_seconds(self) -> float | None:
        """CPU time the server process has used (user + system, all its threads): on a shared
        machine, CPU seconds per token say more about a server's cost than wall time does."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def pause(self) -> None:
        """Freeze the server (SIGSTOP to its process group) while another contender is measured:
        an idle server may still spin (Infinity's idle process kept most of a core busy here), and
        on a 2-core machine that would be charged to whoever is measured."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGCONT)

    def stop(self) -> int | None:
        self.resume()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.log is not subprocess.DEVNULL:
            self.log.close()
        return self.proc.returncode


# ----------------------------------------------------------------------------- rows
@dataclass
class Row:
    contender: str
    workload: str
    concurrency: int
    requests: int
    failed: int
    tokens: int
    wall_s: float
    tokens_per_s: float
    requests_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_batch_inputs: float | None = None
    mean_batch_tokens: float | None = None
    cpu_ms_per_1k_tokens: float | None = None  # the server process's CPU time
    notes: list[str] = field(default_factory=list)


def percentile(values, q) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def body_of(texts: list[str]) -> bytes:
    return json.dumps({"input": texts, "model": "modernbert-embed", "encoding_format": "base64"}).encode()


def rerank_body_of(texts: list[str]) -> bytes:
    """A rerank request ([query, *documents]) in the Cohere shape both servers take."""
    return json.dumps({"query": texts[0], "documents": texts[1:], "model": "modernbert-embed"}).encode()


def run_level(server: Server, workload: str, c: int, reqs: list[tuple[list[str], int]],
              warmup: list[tuple[list[str], int]], timeout: float) -> Row:
    """One level on `server`, the only server not frozen while it runs."""
    server.resume()
    try:
        return _run_level(server, workload, c, reqs, warmup, timeout)
    finally:
        server.pause()


def _run_level(server: Server, workload: str, c: int, reqs: list[tuple[list[str], int]],
               warmup: list[tuple[list[str], int]], timeout: float) -> Row:
    asyncio.run(closed_loop("127.0.0.1", server.port, server.path, [server.body(t) for t, _ in warmup], c, timeout))
    before = server.metric_sums() if server.name == "ours" else {}
    cpu = server.cpu_seconds()
    shots, wall = asyncio.run(closed_loop("127.0.0.1", server.port, server.path, [server.body(t) for t, _ in reqs],
                                          c, timeout))
    cpu_after = server.cpu_seconds()
    cpu = cpu_after - cpu if cpu is not None and cpu_after is not None else None
    ok = [i for i, s in enumerate(shots) if s.status == 200]
    tokens = sum(reqs[i][1] for i in ok)
    lat = [shots[i].latency * 1000 for i in ok]
    row = Row(server.name, workload, c, len(shots), len(shots) - len(ok), tokens, round(wall, 3), tokens / wall,
              len(ok) / wall, percentile(lat, 50), percentile(lat, 95), percentile(lat, 99))
    if cpu is not None and row.tokens:
        row.cpu_ms_per_1k_tokens = 1e6 * cpu / row.tokens
    if before:
        after = server.metric_sums()
        d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
        if d.get("batch_inputs_count"):
            row.mean_batch_inputs = d["batch_inputs_sum"] / d["batch_inputs_count"]
            row.mean_batch_tokens = d["batch_tokens_sum"] / d["batch_tokens_count"]
    return row


def fmt(x, digits=3) -> str:
    return "-" if x is None or (isinstance(x, float) and x != x) else h.fmt_num(x, digits)


def table(rows: list[Row], direct: dict, top: int) -> str:
    lines = ["| workload | concurrency | contender | tokens/s | requests/s | p50 ms | p95 ms | p99 ms | "
             "mean batch (inputs / tokens) | server CPU ms / 1k tokens | failed |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        batch = f"{r.mean_batch_inputs:.1f} / {r.mean_batch_tokens:.0f}" if r.mean_batch_inputs else "-"
        lines.append(f"| {r.workload} | {r.concurrency} | {r.contender} | {fmt(r.tokens_per_s)} | "
                     f"{fmt(r.requests_per_s)} | {fmt(r.p50_ms)} | {fmt(r.p95_ms)} | {fmt(r.p99_ms)} | {batch} | "
                     f"{fmt(r.cpu_ms_per_1k_tokens)} | {r.failed} |")
    lines.append("")
    if direct.get("tokens_per_s") and direct.get("mode") == "rerank":
        lines.append(f"Direct `CrossEncoder.predict` (in the load generator's process, same dtype, measured before "
                     f"and after the levels it is compared with): {fmt(direct['tokens_per_s'])} tokens/s (best of "
                     f"{direct['throughput_runs']}) over the {direct['texts']} pairs of the c={top} rerank level in "
                     f"one call ({fmt(direct['cpu_ms_per_1k_tokens'])} CPU ms per 1k tokens).")
    elif direct.get("tokens_per_s"):
        lines.append(f"Direct `Embedder.encode` (in the load generator's process, same dtype, measured before and "
                     f"after the levels it is compared with): {fmt(direct['tokens_per_s'])} tokens/s (best of "
                     f"{direct['throughput_runs']}) over the {direct['texts']} texts of the c={top} short level in "
                     f"one call ({fmt(direct['cpu_ms_per_1k_tokens'])} CPU ms per 1k tokens); "
                     f"{fmt(direct['one_text_ms'])} ms median over {direct['one_text_runs']} encodes of one short "
                     "text.")
    paired = direct.get("paired_one_text") or {}
    if paired.get("pairs"):
        lo, hi = paired["ratio_p25_p75"]
        lines.append(f"Concurrency 1, paired: {paired['pairs']} short texts each sent once to our server and encoded "
                     f"once directly, back to back: served {fmt(paired['served_p50_ms'])} ms, direct "
                     f"{fmt(paired['direct_p50_ms'])} ms (medians); per-pair ratio median {fmt(paired['ratio'])} "
                     f"(quartiles {fmt(lo)}-{fmt(hi)}).")
    return "\n".join(lines)


def paired_one_text(server: Server, direct: "Direct", texts: list[str], timeout: float) -> dict:
    """Concurrency 1, one short text: each text once through `server` and once through a direct
    `encode` in this process, back to back (which goes first alternates), so that both halves of a
    pair meet the same moment of the host's load; the ratio is the median of the per-pair ratios.
    The other servers stay frozen; `server` idles while the direct encode runs."""

    def encode(text: str) -> float:
        t0 = time.perf_counter()
        direct.model.encode([text])
        h.synchronize(direct.device)
        return time.perf_counter() - t0

    async def pairs() -> list[tuple[float, float]]:
        conn = Connection("127.0.0.1", server.port, server.path, timeout)
        await conn.post(body_of(texts[:1]))  # the connection and the first forward, not measured
        out = []
        for i, text in enumerate(texts):
            if i % 2:
                alone = encode(text)
                shot = await conn.post(body_of([text]))
            else:
                shot = await conn.post(body_of([text]))
                alone = encode(text)
            if shot.status == 200:
                out.append((shot.latency, alone))
        conn.close()
        return out

    server.resume()
    try:
        got = asyncio.run(pairs())
    finally:
        server.pause()
    if not got:
        return {"pairs": 0}
    ratios = [a / b for a, b in got]
    return {"pairs": len(got), "served_p50_ms": statistics.median(a for a, _ in got) * 1000,
            "direct_p50_ms": statistics.median(b for _, b in got) * 1000, "ratio": statistics.median(ratios),
            "ratio_p25_p75": [percentile(ratios, 25), percentile(ratios, 75)]}


def goals(rows: list[Row], direct: dict) -> list[dict]:
    def row(contender, workload, c):
        return next((r for r in rows if (r.contender, r.workload, r.concurrency) == (contender, workload, c)), None)

    out = []
    top = max(r.concurrency for r in rows) if rows else 64
    if direct.get("mode") == "rerank":
        ours = row("ours", "rerank", top)
        if ours and direct.get("tokens_per_s"):
            ratio = ours.tokens_per_s / direct["tokens_per_s"]
            out.append({"goal": f"c={top} rerank tokens/s >= 0.8x direct CrossEncoder.predict",
                        "value": round(ratio, 3), "pass": ratio >= 0.8})
        return out
    c64, c1 = row("ours", "short", top), row("ours", "short", 1)
    if c64 and top > 1 and direct.get("tokens_per_s"):  # batching across requests needs concurrency
        ratio = c64.tokens_per_s / direct["tokens_per_s"]
        out.append({"goal": f"c={top} short tokens/s >= 0.8x direct encode", "value": round(ratio, 3),
                    "pass": ratio >= 0.8})
    paired = direct.get("paired_one_text") or {}
    if paired.get("pairs"):  # each request beside a direct encode of its text: the host's drift cancels
        ratio = paired["ratio"]
        out.append({"goal": "c=1 short latency <= 1.2x direct encode of one text (median of paired ratios)",
                    "value": round(ratio, 3), "pass": ratio <= 1.2})
    elif c1 and direct.get("one_text_runs"):
        ratio = c1.p50_ms / direct["one_text_ms"]
        out.append({"goal": "c=1 short p50 <= 1.2x direct encode of one text", "value": round(ratio, 3),
                    "pass": ratio <= 1.2})
    inf = row("infinity", "short", top)
    if c64 and inf and inf.tokens_per_s > 0:
        ratio = c64.tokens_per_s / inf.tokens_per_s
        out.append({"goal": f"c={top} short tokens/s >= 2x Infinity", "value": round(ratio, 3), "pass": ratio >= 2})
        out.append({"goal": f"c={top} short p99 below Infinity's", "value": f"{c64.p99_ms:.0f} vs {inf.p99_ms:.0f} ms",
                    "pass": c64.p99_ms < inf.p99_ms})
    return out


# ----------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a small model, concurrency 1 and 4, a few requests")
    p.add_argument("--mode", choices=("embed", "rerank"), default="embed",
                   help="embed: an embedder on /v1/embeddings; rerank: a one-label cross-encoder on /v1/rerank "
                        "(Infinity's /rerank), one query and --documents documents per request")
    p.add_argument("--documents", type=int, default=None, help="rerank mode: documents per request (default 32; "
                   "--quick 8)")
    p.add_argument("--config", choices=("base", "small"), default=None, help="model shape (default: base; "
                   "small with --quick)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default=None, help="our server's and the direct encode's dtype (default: the "
                   "library's: float32 on CPU)")
    p.add_argument("--concurrency", default=None, help="comma-separated (default 1,8,32,64, rerank mode 16; "
                   "--quick 1,4)")
    p.add_argument("--workloads", default=None, help=f"comma-separated from {list(WORKLOADS)} (default: all; "
                   "--quick short,batch16)")
    p.add_argument("--rounds", type=int, default=None,
                   help="requests per level = max(rounds x concurrency, --min-requests) (default: 2 for short, "
                        "1 for the others)")
    p.add_argument("--min-requests", type=int, default=None, help="at least this many requests per level "
                   "(default 16; --quick 8)")
    p.add_argument("--infinity-python", default=None, metavar="PYTHON",
                   help="the python of a virtual environment with infinity-emb[server,torch]: adds Infinity")
    p.add_argument("--infinity-dtype", default=None, help="Infinity's --dtype (default: its own, float32 on CPU)")
    p.add_argument("--checkpoint", type=Path, default=None, help="folder for the random checkpoint (reused)")
    p.add_argument("--timeout", type=float, default=600, help="seconds one request may take")
    p.add_argument("--logs", type=Path, default=None, help="folder for the servers' logs")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="start no level after this many seconds from the start (the servers' start counts); "
                        "the levels left are recorded as not run. Results are written after every level, so a "
                        "run cut short still leaves what it measured (default: no limit)")
    h.add_output_args(p)
    return p.parse_args(argv)


class Output:
    """The results files, rewritten after every level: the JSON whole, the markdown as what the file
    held before this run plus this run's section, so that a run cut short leaves the levels it
    measured and nothing twice."""

    def __init__(self, out: Path | None, markdown: Path | None):
        self.out = out
        self.section = h.MarkdownSection(markdown, "bench_serve")

    def write(self, record: dict, text: str) -> None:
        if self.out:
            h.write_json(self.out, record)
        self.section.write(text)


def report_text(info: dict, rows: list, direct: dict, top: int, record: dict) -> str:
    text = f"bench_serve on {h.machine_line(info)}\n\n" + table(rows, direct, top) + "\n\n" + "\n".join(
        f"- {g['goal']}: {g['value']} ({'PASS' if g['pass'] else 'FAIL'})" for g in record.get("goals", []))
    if record.get("not_run"):
        text += ("\n\nNot run: " + ", ".join(record["not_run"]) + f" (past the time budget of "
                 f"{record['settings']['time_budget_s']:g} s)")
    if not record.get("complete"):
        text += "\n\n(partial: the run had not finished when this was written)"
    return text


def write_bench_checkpoint(folder: Path, config: str, seed: int = 0, reranker: bool = False) -> Path:
    """A random checkpoint of the `config` shape in `folder` (reused when there), an embedder or
    (`reranker`) a one-label cross-encoder."""
    from modernbert_embed.weights import classifier_config, small_config, write_random_checkpoint

    if (folder / "config.json").is_file():
        is_reranker = "ForSequenceClassification" in str(json.loads((folder / "config.json").read_text())
                                                         .get("architectures"))
        if is_reranker != reranker:
            raise SystemExit(f"bench_serve: {folder} holds {'a reranker' if is_reranker else 'an embedder'}; "
                             f"give --checkpoint a folder of its own for the {'rerank' if reranker else 'embed'} mode")
        return folder
    tok = FIXTURES / "tokenizer.json"
    if not tok.is_file():
        raise SystemExit(f"bench_serve: needs the real tokenizer.json in {FIXTURES} (or MODERNBERT_EMBED_FIXTURES)")
    cfg = h.config_dict("base") if config == "base" else small_config(
        vocab_size=50368, pad_token_id=50283, cls_token_id=50281, sep_token_id=50282, bos_token_id=50281,
        eos_token_id=50282)
    if reranker:
        cfg = classifier_config(cfg, num_labels=1)
    write_random_checkpoint(folder, cfg, seed=seed, tokenizer_json=tok)
    (folder / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=1))
    return folder


class Direct:
    """`Embedder.encode` in this process, on the same checkpoint and dtype: the reference the
    server is held to. Measured right beside the levels it is compared with (before and after
    them), since the host's load drifts."""

    def __init__(self, folder: Path, device: str, dtype, mode: str = "embed"):
        from modernbert_embed import CrossEncoder, Embedder

        self.device, self.mode = device, mode
        if mode == "rerank":  # inputs are (query, document) pairs
            self.model = CrossEncoder.from_pretrained(folder, device=device, dtype=dtype)
            self.run = self.model.predict
        else:
            self.model = Embedder.from_pretrained(folder, device=device, dtype=dtype)
            self.run = self.model.encode
        self.run([("warm", "up")] * 8 if mode == "rerank" else ["warm up"] * 8)
        self.throughputs: list[dict] = []
        self.singles: list[float] = []

    def throughput(self, texts: list) -> None:
        """One `encode` over all `texts` (rerank mode: one `predict` over all pairs)."""
        tokens = sum(len(s) for s in self.model.tokenize(texts)[0])
        h.synchronize(self.device)
        t0, c0 = time.perf_counter(), time.process_time()
        self.run(texts)
        h.synchronize(self.device)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        self.throughputs.append({"texts": len(texts), "tokens": tokens, "seconds": wall,
                                 "tokens_per_s": tokens / wall, "cpu_ms_per_1k_tokens": 1e6 * cpu / tokens})

    def one_text(self, texts: list[str]) -> None:
        """`encode([t])` for each of `texts`, one by one."""
        for t in texts:
            t0 = time.perf_counter()
            self.model.encode([t])
            h.synchronize(self.device)
            self.singles.append(time.perf_counter() - t0)

    def summary(self) -> dict:
        best = max(self.throughputs, key=lambda r: r["tokens_per_s"]) if self.throughputs else {}
        return {**best, "mode": self.mode, "throughput_runs": [round(r["tokens_per_s"], 1) for r in self.throughputs],
                "one_text_ms": statistics.median(self.singles) * 1000 if self.singles else float("nan"),
                "one_text_runs": len(self.singles)}


def _exit_on_sigterm(signum, frame):
    # A caller's timeout (the device check's step budget) stops the run by SIGTERM: leave through
    # the `finally` that stops the servers (their own process groups, which that signal misses).
    raise SystemExit(128 + signum)


def main(argv=None) -> int:
    args = parse_args(argv)
    from tokenizers import Tokenizer

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_sigterm)

    config = args.config or ("small" if args.quick else "base")
    rerank = args.mode == "rerank"
    levels = [int(c) for c in (args.concurrency or ("1,4" if args.quick else "16" if rerank else "1,8,32,64"))
              .split(",")]
    workloads = (args.workloads or ("short,batch16" if args.quick else ",".join(WORKLOADS))).split(",")
    documents = args.documents or (8 if args.quick else 32)
    if rerank:
        if args.workloads:
            raise SystemExit("bench_serve: --workloads is for the embed mode; rerank mode has one (--documents)")
        workloads = ["rerank"]
    min_requests = args.min_requests or (8 if args.quick else 16)
    started = time.monotonic()
    deadline = started + args.time_budget if args.time_budget is not None else float("inf")
    output = Output(args.out, args.markdown)
    with tempfile.TemporaryDirectory(prefix="mbe-serve-bench-") as tmp:
        folder = write_bench_checkpoint(args.checkpoint or Path(tmp) / "checkpoint", config, reranker=rerank)
        logs = args.logs or Path(tmp)
        logs.mkdir(parents=True, exist_ok=True)
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        plan = {}
        seed = 0
        for w in workloads:
            for c in levels:
                rounds = args.rounds or (2 if w == "short" else 1)
                n = max(rounds * c, min_requests)
                seed += 1
                if rerank:
                    plan[w, c] = (make_rerank_requests(tok, n, documents, seed),
                                  make_rerank_requests(tok, min(c, 8), documents, 1000 + seed))
                else:
                    plan[w, c] = (make_requests(tok, w, n, seed), make_requests(tok, w, min(c, 8), 1000 + seed))
        top = max(levels)
        short = "short" if "short" in workloads else workloads[0]
        info = h.machine_info(args.device)
        info["infinity_emb"] = None
        record = {"script": "bench_serve", "machine": info, "settings": {
            "config": config, "device": args.device, "dtype": args.dtype or "library default",
            "infinity_dtype": args.infinity_dtype or "its default",
            "mode": args.mode, "levels": levels,
            "workloads": ({"rerank": {"query_tokens": RERANK_QUERY, "document_tokens": RERANK_DOCUMENT,
                                      "documents": documents}} if rerank else {w: WORKLOADS[w] for w in workloads}),
            "requests_per_level": {f"{w}@{c}": len(plan[w, c][0]) for w, c in plan},
            "tokens_per_level": {f"{w}@{c}": sum(n for _, n in plan[w, c][0]) for w, c in plan},
            "route": ("/v1/rerank (ours), /rerank (Infinity)" if rerank else
                      "/v1/embeddings (ours), /embeddings (Infinity); encoding_format base64"),
            "server_defaults": f"ours: max_batch_tokens {default_max_batch_tokens(args.device)} (the engine's "
                               "default on this device); infinity: batch_size 32",
            "time_budget_s": args.time_budget}, "complete": False, "not_run": []}
        print(f"bench_serve: {h.machine_line(info)}")

        servers: list[Server] = []
        rows: list[Row] = []
        direct = None
        paired = {}

        def save(complete: bool = False) -> None:
            summary = {**direct.summary(), "paired_one_text": paired} if direct is not None else {}
            ordered = sorted(rows, key=lambda r: (workloads.index(r.workload), r.concurrency, r.contender != "ours"))
            record.update(direct=summary, rows=[asdict(r) for r in ordered], goals=goals(ordered, summary),
                          complete=complete, elapsed_s=round(time.monotonic() - started, 1))
            output.write(record, report_text(info, ordered, summary, top, record))

        try:
            port = free_port()
            cmd = [sys.executable, "-m", "modernbert_embed", "serve", "--model", str(folder), "--port", str(port),
                   "--device", args.device, "--log-level", "warning"]
            if args.dtype:
                cmd += ["--dtype", args.dtype]
            body = rerank_body_of if rerank else body_of
            servers.append(Server("ours", cmd, port, "/v1/rerank" if rerank else "/v1/embeddings", "/ready",
                                  log=logs / "ours.log", body=body))
            if args.infinity_python:
                port = free_port()
                exe = str(Path(args.infinity_python).parent / "infinity_emb")
                info["infinity_emb"] = subprocess.run(
                    [args.infinity_python, "-c", "import importlib.metadata as m; print(m.version('infinity_emb'))"],
                    capture_output=True, text=True).stdout.strip()
                servers.append(Server("infinity", [exe, "v2", "--model-id", str(folder), "--port", str(port),
                                                   "--engine", "torch", "--device", args.device,
                                                   "--no-bettertransformer", "--log-level", "warning"]
                                      + (["--dtype", args.infinity_dtype] if args.infinity_dtype else []),
                                      port, "/rerank" if rerank else "/embeddings", "/health",
                                      log=logs / "infinity.log", body=body,
                                      env={"INFINITY_ANONYMOUS_USAGE_STATS": "0", "DO_NOT_TRACK": "1",
                                           "HF_HUB_OFFLINE": "1"}))
            for s in servers:
                s.wait_ready(600)  # not cut by --time-budget: no level would run without the server
            for s in servers:  # frozen but while measured (Server.pause), also during the direct encodes
                s.pause()
            direct = Direct(folder, args.device, args.dtype, args.mode)
            for k, (w, c) in enumerate(plan):
                if time.monotonic() >= deadline:
                    record["not_run"] = [f"{w2}@{c2}" for w2, c2 in list(plan)[k:]]
                    print(f"bench_serve: time budget of {args.time_budget:g} s spent; not run: "
                          + ", ".join(record["not_run"]), flush=True)
                    break
                reqs, warm = plan[w, c]
                # the direct reference, before and after the levels it is compared with

                def measure():
                    if rerank:
                        direct.throughput([(t[0], d) for t, _ in reqs for d in t[1:]])
                        return
                    if w == short and c == 1:
                        direct.one_text([t[0] for t, _ in reqs][:10])
                    if w == short and c == top:
                        direct.throughput([x for t, _ in reqs for x in t])

                measured = c == top if rerank else w == short and c in (1, top)
                if measured:
                    measure()
                order = servers if k % 2 == 0 else servers[::-1]
                for s in order:
                    row = run_level(s, w, c, reqs, warm, args.timeout)
                    rows.append(row)
                    print(f"{w:8s} c={c:<3d} {s.name:9s} {row.tokens_per_s:9.1f} tok/s {row.requests_per_s:8.2f} "
                          f"req/s p50 {row.p50_ms:8.1f} p99 {row.p99_ms:8.1f} ms  batch "
                          f"{row.mean_batch_inputs or 0:.1f} cpu/1k {row.cpu_ms_per_1k_tokens or 0:.0f} ms "
                          f"failed {row.failed}", flush=True)
                if measured:
                    measure()
                    print(f"direct   c={c:<3d} {direct.summary()}", flush=True)
                if w == short and c == 1 and not rerank:
                    paired = paired_one_text(servers[0], direct, [t[0] for t, _ in reqs], args.timeout)
                    print(f"paired   c=1   {paired}", flush=True)
                save()  # level by level: a run cut short keeps what it measured
            rows.sort(key=lambda r: (workloads.index(r.workload), r.concurrency, r.contender != "ours"))
        except BaseException as e:  # the servers stop below; what was measured is kept, with why it ended
            record["error"] = f"{type(e).__name__}: {e}"[:400]
            raise
        finally:
            codes = {s.name: s.stop() for s in servers}
            record["exit_codes"] = codes
            save(complete="error" not in record)
        direct = record["direct"]
    text = report_text(info, rows, direct, top, record)
    print()
    print(text)
    if args.append:
        with args.append.open("a") as f:
            f.write(json.dumps(record, default=str) + "\n")
    failed = sum(r.failed for r in rows if r.contender == "ours")
    return 1 if failed or codes.get("ours") not in (0, None) else 0


if __name__ == "__main__":
    sys.exit(main())
