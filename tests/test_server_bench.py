"""benchmarks/bench_serve.py still runs: its --quick mode end to end (a small model served in a
subprocess, the load generator, the direct baseline, the results file), so that a broken serving
benchmark shows here rather than on a quiet machine booked for it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT, fixture_file

pytest.importorskip("starlette", reason="the serve extra is not installed")


@pytest.mark.slow
def test_bench_serve_quick(tmp_path):
    fixture_file("tokenizer.json")
    out = tmp_path / "serve.json"
    r = subprocess.run([sys.executable, "benchmarks/bench_serve.py", "--quick", "--out", str(out),
                        "--checkpoint", str(tmp_path / "ckpt")], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    record = json.loads(out.read_text())
    rows = {(row["workload"], row["concurrency"]): row for row in record["rows"]}
    assert set(rows) == {("short", 1), ("short", 4), ("batch16", 1), ("batch16", 4)}
    for (workload, c), row in rows.items():
        assert row["contender"] == "ours" and row["failed"] == 0 and row["requests"] == max(2 * c, 8)
        texts = 1 if workload == "short" else 16
        assert 30 * texts * row["requests"] <= row["tokens"] <= 70 * texts * row["requests"]
        assert row["tokens_per_s"] > 0 and row["cpu_ms_per_1k_tokens"] > 0
        assert row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
        assert row["mean_batch_inputs"] >= (16 if workload == "batch16" else 1)
    direct = record["direct"]
    assert direct["tokens_per_s"] > 0 and len(direct["throughput_runs"]) == 2 and direct["one_text_runs"] == 16
    paired = direct["paired_one_text"]  # each of the c=1 level's 8 texts: one request and one direct encode
    assert paired["pairs"] == 8 and paired["served_p50_ms"] > 0 and paired["direct_p50_ms"] > 0
    lo, hi = paired["ratio_p25_p75"]
    assert 0 < lo <= paired["ratio"] <= hi
    assert record["exit_codes"] == {"ours": 0}
    assert [g["goal"] for g in record["goals"]] == [
        "c=4 short tokens/s >= 0.8x direct encode",
        "c=1 short latency <= 1.2x direct encode of one text (median of paired ratios)"]
    assert "Concurrency 1, paired: 8 short texts" in r.stdout
    assert "| short | 4 | ours |" in r.stdout


def _serve_cmd(tmp_path, *args):
    return [sys.executable, "-P", "benchmarks/bench_serve.py", "--quick", "--out", str(tmp_path / "serve.json"),
            "--markdown", str(tmp_path / "serve.md"), "--checkpoint", str(tmp_path / "ckpt"), *args]


@pytest.mark.slow
def test_bench_serve_time_budget_records_the_levels_not_run(tmp_path):
    fixture_file("tokenizer.json")
    (tmp_path / "serve.md").write_text("# before\n")
    r = subprocess.run(_serve_cmd(tmp_path, "--time-budget", "0"), cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    record = json.loads((tmp_path / "serve.json").read_text())
    assert record["rows"] == [] and record["complete"] and record["exit_codes"] == {"ours": 0}
    assert record["not_run"] == ["short@1", "short@4", "batch16@1", "batch16@4"]
    text = (tmp_path / "serve.md").read_text()
    assert text.startswith("# before\n") and text.count("### bench_serve") == 1
    assert "Not run: short@1, short@4, batch16@1, batch16@4 (past the time budget of 0 s)" in text


@pytest.mark.slow
def test_bench_serve_stopped_mid_run_keeps_the_levels_it_measured(tmp_path):
    """SIGTERM (a caller's timeout) after the first level: the JSON and the markdown hold that
    level, say the run did not complete, and the server was stopped."""
    import signal
    import time

    fixture_file("tokenizer.json")
    proc = subprocess.Popen(_serve_cmd(tmp_path, "--workloads", "short,batch16", "--concurrency",
                                       "1,4,2,3"), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    out = tmp_path / "serve.json"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if out.is_file() and json.loads(out.read_text())["rows"]:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "finished before it could be stopped: " + proc.stdout.read()[-3000:]
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    record = json.loads(out.read_text())
    assert proc.returncode != 0
    assert 1 <= len(record["rows"]) < 8 and not record["complete"]
    assert record["error"].startswith("SystemExit") and record["exit_codes"]["ours"] is not None
    text = (tmp_path / "serve.md").read_text()
    assert "| short | 1 | ours |" in text and "(partial: the run had not finished" in text


@pytest.mark.slow
def test_bench_serve_rerank_quick(tmp_path):
    """The rerank mode end to end: a random reranker served, 1 query x 8 documents per request to
    /v1/rerank, the direct CrossEncoder.predict reference, the results file."""
    fixture_file("tokenizer.json")
    out = tmp_path / "serve.json"
    r = subprocess.run([sys.executable, "-P", "benchmarks/bench_serve.py", "--quick", "--mode", "rerank", "--out",
                        str(out), "--checkpoint", str(tmp_path / "rr")], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    record = json.loads(out.read_text())
    assert record["settings"]["mode"] == "rerank" and record["settings"]["route"].startswith("/v1/rerank")
    rows = {(row["workload"], row["concurrency"]): row for row in record["rows"]}
    assert set(rows) == {("rerank", 1), ("rerank", 4)}
    for (_, c), row in rows.items():
        assert row["contender"] == "ours" and row["failed"] == 0 and row["requests"] == max(2 * c, 8)
        # 8 pairs of a query of 8..16 tokens and a document of 30..70: q + d - 1 tokens each
        assert 8 * 37 * row["requests"] <= row["tokens"] <= 8 * 85 * row["requests"]
        assert row["tokens_per_s"] > 0 and row["mean_batch_inputs"] >= 8  # a request's 8 pairs in one forward
    direct = record["direct"]
    assert direct["mode"] == "rerank" and direct["texts"] == 8 * rows["rerank", 4]["requests"]
    assert direct["tokens"] == rows["rerank", 4]["tokens"]  # the same pairs, the same token count
    assert [g["goal"] for g in record["goals"]] == ["c=4 rerank tokens/s >= 0.8x direct CrossEncoder.predict"]
    assert "| rerank | 4 | ours |" in r.stdout and "Direct `CrossEncoder.predict`" in r.stdout
    # the embed mode's checkpoint is not taken for a reranker
    embed_ckpt = tmp_path / "emb"
    r = subprocess.run([sys.executable, "-P", "benchmarks/bench_serve.py", "--quick", "--time-budget", "0",
                        "--checkpoint", str(embed_ckpt)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([sys.executable, "-P", "benchmarks/bench_serve.py", "--quick", "--mode", "rerank",
                        "--checkpoint", str(embed_ckpt)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "holds an embedder" in r.stderr, r.stderr
