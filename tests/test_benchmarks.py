"""The benchmark scripts still run: the harness's pieces, and bench_cpu end to end in --quick mode
on a small random model (plus dry runs of the GPU scripts' logic on the CPU), so that a broken
benchmark shows in CI rather than on a rented GPU. The end-to-end runs are marked slow (left out of
`make test-fast`)."""

from __future__ import annotations

import importlib
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    """The benchmarks folder on sys.path (its scripts import `harness` by name)."""
    sys.path.insert(0, str(BENCH))
    try:
        yield lambda name: importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture
def one_thread():
    # A tiny model on a busy machine runs fastest (and steadiest) on one thread.
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def test_vocab_and_corpora(bench):
    h = bench("harness")
    from modernbert_embed.config import ModernBertConfig

    base = h.Vocab.of(ModernBertConfig())
    assert (base.cls, base.sep, base.pad, base.unk, base.low, base.high) == (50281, 50282, 50283, 50280, 0, 50280)
    small = h.Vocab.of(ModernBertConfig.from_dict(h.SMALL_CONFIG))
    assert (small.cls, small.sep, small.low, small.high) == (1, 2, 4, 1024)

    mixed = h.mixed_corpus(base, 50_000, seed=0)
    again = h.mixed_corpus(base, 50_000, seed=0)
    assert mixed.ids == again.ids  # deterministic
    lengths = np.array(mixed.lengths)
    assert mixed.num_tokens >= 50_000 and lengths.min() >= 3 and lengths.max() <= 512
    assert 80 <= np.median(lengths) <= 120
    for seq in mixed.ids:
        assert seq[0] == base.cls and seq[-1] == base.sep
        assert all(base.low <= t < base.high for t in seq[1:-1])

    fixed = h.fixed_corpus(small, 512, 3)
    assert fixed.lengths == [512] * 3 and fixed.name == "fixed512"
    long = h.long_corpus(base, 4096, 2)
    assert long.lengths == [4096, 4096] and long.name == "long"
    head = long.head(300)
    assert head.lengths == [300] and head.ids[0][-1] == base.sep

    cfg = ModernBertConfig()
    assert fixed.flops(cfg) == pytest.approx(3 * 512 * cfg.flops_per_token(512))


def test_id_tokenizer_round_trip(bench, tmp_path):
    """sentence-transformers reads text: the id tokenizer must give back exactly the corpus ids."""
    pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    h = bench("harness")
    from modernbert_embed.config import ModernBertConfig

    cfg = ModernBertConfig()
    h.write_id_tokenizer(tmp_path, cfg)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"),
                                               pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]")
    corpus = h.mixed_corpus(h.Vocab.of(cfg), 2000, seed=3)
    for seq, text in zip(corpus.ids, h.id_texts(corpus.ids)):
        assert tok(text)["input_ids"] == seq
    assert tok.pad_token_id == cfg.pad_token_id


def test_timer_and_table(bench):
    h = bench("harness")
    calls = []
    timing, result = h.measure.measure(lambda: calls.append(1) or len(calls), "cpu", warmup=2, repeats=5,
                                       warmup_fn=lambda: calls.append(0))
    assert calls == [0, 0, 1, 1, 1, 1, 1] and result == 7 and len(timing.times) == 5
    assert timing.p20 <= timing.median <= timing.p80
    rows = [h.Row("ours", "fp32", "mixed", "default", tokens=1000, tokens_per_s=2500.0, seconds=0.4, p20=0.39,
                  p80=0.41, ratio=2.5, goal="2.50x (>= 2x): PASS"),
            h.Row("ours", "bf16", "mixed", "attn=x", tokens=1000, error="RuntimeError: a | b\nc")]
    table = h.markdown_table(rows, nominal=True)
    lines = table.splitlines()
    assert len(lines) == 4 and all(line.count("|") == lines[0].count("|") for line in lines)
    assert h.nominal_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert h.nominal_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert h.nominal_peak_tflops("NVIDIA H200") == 989.0
    assert h.nominal_peak_tflops("Some Other GPU") is None
    info = h.machine_info("cpu")
    assert info["torch"] == torch.__version__ and info["commit"]


@pytest.mark.slow
def test_bench_cpu_quick_small(bench, tmp_path, one_thread):
    bench_cpu = bench("bench_cpu")
    out = tmp_path / "bench_cpu.json"
    md = tmp_path / "results.md"
    rc = bench_cpu.main(["--config", "small", "--quick", "--mixed-tokens", "300", "--long-len", "300",
                         "--out", str(out), "--markdown", str(md)])
    assert rc == 0
    record = json.loads(out.read_text())
    assert record["machine"]["torch"] == torch.__version__ and record["peaks_tflops"]["fp32"] > 0
    rows = {(r["engine"], r["dtype"], r["corpus"]): r for r in record["rows"]}
    for key in [("transformers", "fp32", "mixed"), ("transformers", "fp32", "long"), ("ours", "fp32", "mixed"),
                ("ours", "bf16", "mixed"), ("ours", "fp32", "long"), ("ours", "bf16", "long")]:
        row = rows[key]
        assert not row["error"], (key, row["error"])
        assert row["tokens_per_s"] > 0 and row["docs_per_s"] > 0 and row["peak_mem_mb"] > 0
    assert rows[("ours", "fp32", "mixed")]["ratio"] > 0
    assert rows[("ours", "fp32", "mixed")]["min_cos"] > 0.99999  # same weights, same ids, fp32
    assert rows[("ours", "bf16", "mixed")]["min_cos"] > 0.999
    assert re.fullmatch(r"\d+\.\d\dx \(>= 2x\): (PASS|FAIL)", rows[("ours", "fp32", "mixed")]["goal"])
    st = rows[("sentence-transformers", "fp32", "mixed")]
    if importlib.util.find_spec("sentence_transformers") is None:  # a missing peer is a row's error
        assert st["error"].startswith("load: ModuleNotFoundError"), st["error"]
    else:
        assert not st["error"], st["error"]
        assert st["min_cos"] > 0.99999
    assert "| corpus |" in md.read_text()


@pytest.mark.slow
def test_gpu_scripts_dry_run_on_cpu(bench, tmp_path, one_thread):
    """The GPU scripts' logic on the CPU: rows, goals, error rows for a backend that cannot run."""
    bench_gpu = bench("bench_gpu")
    out = tmp_path / "bench_gpu.json"
    rc = bench_gpu.main(["--device", "cpu", "--config", "small", "--quick", "--mixed-tokens", "300",
                         "--fixed-docs", "1", "--long-len", "600", "--only", "default", "attn=torch-varlen", "text",
                         "--out", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["corpus"] for r in rows} == {"mixed", "fixed512", "long"}
    ours = [r for r in rows if r["engine"] == "ours" and r["variant"] == "default"]
    assert len(ours) == 3 and all(not r["error"] and r["tokens_per_s"] > 0 for r in ours)
    assert all(r["goal"] for r in ours)
    varlen = [r for r in rows if r["variant"] == "attn=torch-varlen"]
    assert len(varlen) == 3 and all(r["error"] for r in varlen)  # no flash attention on the CPU
    text = [r for r in rows if r["variant"].startswith("text in")]
    assert len(text) == 2 and all(not r["error"] and r["min_cos"] > 0.9999 for r in text)  # same ids as the corpus

    parity = bench("parity_gpu")
    out = tmp_path / "parity.json"
    rc = parity.main(["--device", "cpu", "--config", "small", "--long-len", "200",
                      "--cases", "fp32:auto", "bf16:auto", "bf16:attn=torch-varlen", "--out", str(out)])
    assert rc == 0
    cases = {c["case"]: c for c in json.loads(out.read_text())["cases"]}
    assert cases["fp32:auto"]["status"] == "PASS" and cases["fp32:auto"]["max_diff_crossing"] < 1e-4
    assert cases["bf16:auto"]["status"] == "PASS"
    assert cases["bf16:attn=torch-varlen"]["status"] == "N/A"  # optional and unavailable here


@pytest.mark.slow
def test_ops_benchmark_dry_run_on_cpu(bench, tmp_path, one_thread):
    """bench_ops_gpu's logic on the CPU (kernels under the interpreter): every op timed for both
    implementations, attention rows, a profile grouped by op, one best tile per sweep case."""
    ops = bench("bench_ops_gpu")
    out, md = tmp_path / "ops.json", tmp_path / "ops.md"
    rc = ops.main(["--device", "cpu", "--quick", "--dtype", "fp32", "--out", str(out), "--markdown", str(md)])
    assert rc == 0
    rec = json.loads(out.read_text())
    assert rec["bandwidth_gbs"]["copy"] > 0
    names = {r["op"] for r in rec["ops"]}
    assert names == {"layer_norm +residual", "layer_norm", "rotary (in place)", "geglu", "pool mean+L2"}
    for r in rec["ops"]:
        assert r["error"] is None and r["ms"] > 0 and r["gb_s"] > 0, r
        assert (r["speedup_vs_torch"] is not None) == (r["impl"] == "triton")
    impls = {(r["case"], r["impl"]) for r in rec["attention"] if r["error"] is None}
    assert {impl for _, impl in impls} == {"triton", "triton+rope", "torch (SDPA per sequence)"}
    profile = rec["profile"]["4x64"]
    assert profile["kernel_ms"] > 0 and "gemm" in profile["groups_ms"]
    sweep = rec["sweep"]
    for case in {r["case"] for r in sweep}:
        rows = [r for r in sweep if r["case"] == case]
        assert rows[0]["default"] and sum(r["best"] for r in rows) == 1
    assert "bench_ops_gpu" in md.read_text()


def test_visible_pairs_counts_the_window(bench):
    ops = bench("bench_ops_gpu")
    for lengths, w in [([1, 5, 200], 64), ([130], 64), ([129], 64), ([10], 0), ([70], None), ([300, 3], 16)]:
        brute = sum(1 for n in lengths for i in range(n) for j in range(n) if w is None or abs(i - j) <= w)
        assert ops.visible_pairs(lengths, w) == brute, (lengths, w)
    assert ops.group_of("_attention_kernel") == "attention"
    assert ops.group_of("sm90_xmma_gemm_bf16bf16_bf16f32") == "gemm"
    assert ops.group_of("_layer_norm_kernel") == "layer_norm"
