"""The benchmark scripts still run: the harness's pieces (the alternating rounds on fake engines with
a fake clock), and bench_cpu end to end in --quick mode on a small random model (plus dry runs of
the GPU scripts' logic on the CPU), so that a broken benchmark shows in CI rather than on a rented
GPU. The end-to-end runs are marked slow (left out of `make test-fast`)."""

from __future__ import annotations

import importlib
import json
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


class _Clock:
    """A fake clock that the fake engines advance: the rounds' ratios come out exact."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _fake_engine(h, clock, costs, calls, name, docs_out=None, emb=None):
    """An engine that takes costs[i] seconds on its i-th timed call (warm-ups cost nothing)."""

    class Fake(h.Engine):
        label = f"fake {name}"

        def encode(self, corpus):
            if corpus.name.endswith("-head"):
                calls.append((name, "warm-up"))
            else:
                calls.append((name, len([c for c in calls if c[0] == name and c[1] == "timed"])))
                clock.now += costs[calls[-1][1]]
                calls[-1] = (name, "timed")
            n = corpus.num_docs if docs_out is None else docs_out
            return emb[:n].clone() if emb is not None else torch.nn.functional.normalize(torch.ones(n, 4), dim=-1)

    return Fake()


def test_rounds_ratios_goals_and_rows_that_cannot_run(bench):
    """Per-round ratios against the reference and against the faster runtime of the same dtype in
    that round; warm-up first; shuffled orders; a contender that cannot run, one left out of a
    corpus, one that breaks in a round: each a row that says so."""
    h = bench("harness")
    from harness.rounds import CannotRun, Contender, RoundGoal, RoundsRun
    from modernbert_embed.config import ModernBertConfig

    cfg = ModernBertConfig.from_dict(h.SMALL_CONFIG)
    vocab = h.Vocab.of(cfg)
    corpora = {"mixed": h.fixed_corpus(vocab, 64, 2, name="mixed"), "long": h.fixed_corpus(vocab, 300, 1, name="long")}
    clock, calls = _Clock(), []
    ref_emb = torch.nn.functional.normalize(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]), dim=-1)
    off = torch.nn.functional.normalize(torch.tensor([[1.0, 0.01, 0, 0], [0, 1.0, 0, 0]]), dim=-1)

    def cannot(role):
        raise CannotRun("no bfloat16 here")

    # times per timed call: mixed rounds 1-3, then long rounds 1-3
    plan = [
        Contender("ours-fp32", "ours", "fp32", "ours",
                  lambda role: _fake_engine(h, clock, [1, 1, 1, 2, 2, 2], calls, "ours", emb=off)),
        Contender("transformers-fp32", "transformers", "fp32", "reference",
                  lambda role: _fake_engine(h, clock, [5, 5, 5, 8, 8, 8], calls, "ref", emb=ref_emb)),
        Contender("runtime-a", "a", "fp32", "runtime", lambda role: _fake_engine(h, clock, [2, 4, 4], calls, "a"),
                  corpora=("mixed",)),
        Contender("runtime-b", "b", "fp32", "runtime", lambda role: _fake_engine(h, clock, [3, 3, 6], calls, "b"),
                  corpora=("mixed",)),
        Contender("runtime-bf16", "c", "bf16", "runtime", cannot),
        Contender("broken", "d", "fp32", "other", lambda role: _fake_engine(h, clock, [1] * 6, calls, "d", docs_out=1)),
    ]
    run = RoundsRun(plan, corpora, cfg, rounds=3, seed=0, warmup_tokens=32, matmul_n=32, log=lambda s: None,
                    clock=clock)
    for role in corpora:
        run.run_corpus(role)

    first_timed = next(i for i, c in enumerate(calls) if c[1] == "timed")
    assert {c[0] for c in calls[:first_timed]} == {"ours", "ref", "a", "b", "d"}  # all warmed up first
    assert all(c[1] == "warm-up" for c in calls[:first_timed])
    mixed_timed = [c[0] for c in calls if c[1] == "timed"][:13]  # 3 rounds x 4, then d's one failed call
    orders = [tuple(x for x in mixed_timed if x != "d")[4 * r:4 * r + 4] for r in range(3)]
    assert all(sorted(o) == ["a", "b", "ours", "ref"] for o in orders)
    assert len(set(orders)) > 1  # shuffled per round (seed 0)

    s = {(x["corpus"], x["contender"]): x for x in run.summaries()}
    ours = s[("mixed", "ours-fp32")]
    assert ours["vs_reference_rounds"] == [5.0, 5.0, 5.0]
    # the faster runtime of each round: a (2 s vs 3), b (3 s vs 4), a (4 s vs 6)
    assert ours["vs_runtime_rounds"] == [2.0, 3.0, 4.0]
    assert ours["vs_runtime"] == {"median": 3.0, "min": 2.0, "max": 4.0, "n": 3}
    assert ours["tokens_per_s"]["median"] == pytest.approx(128.0)
    assert s[("mixed", "runtime-b")]["vs_runtime_rounds"] == pytest.approx([2 / 3, 1.0, 4 / 6], abs=1e-4)
    assert ours["min_cos"] == pytest.approx(float(off[0] @ ref_emb[0]))
    assert ours["max_abs"] == pytest.approx(float((off - ref_emb).abs().max()))
    assert s[("long", "ours-fp32")]["vs_reference_rounds"] == [4.0, 4.0, 4.0]
    assert s[("long", "ours-fp32")]["vs_runtime"] is None  # no runtime ran on long
    assert s[("long", "runtime-a")]["not_run"] and not s[("long", "runtime-a")]["times_s"]
    assert s[("mixed", "runtime-bf16")]["error"] == "no bfloat16 here"
    assert s[("mixed", "broken")]["error"] == "round 1: RuntimeError: 1 embeddings for 2 documents"
    assert run.peaks["mixed"]["fp32"] and all(p > 0 for p in run.peaks["mixed"]["bf16"])

    summaries = run.summaries()
    goals = [RoundGoal("vs runtimes", "ours-fp32", "vs_runtime", 2.5, ("mixed",)),
             RoundGoal("vs reference", "ours-fp32", "vs_reference", 4.5, ("long",)),
             RoundGoal("long vs runtimes", "ours-fp32", "vs_runtime", 1.0, ("long",)),
             RoundGoal("parity", "ours-fp32", "max_abs", 1e-4),
             RoundGoal("cos", "ours-fp32", "min_cos", 0.99)]
    got = [g.evaluate(summaries) for g in goals]
    assert [(g["verdict"], g["rounds_passing"]) for g in got] == [
        ("PASS", "2/3"), ("FAIL", "0/3"), ("n/a", None), ("FAIL", None), ("PASS", None)]
    assert got[2]["why"] == "no ratio measured"

    from harness.rounds_report import RoundsResults

    text = RoundsResults("t", run, goals, {"peer_batch": {"mixed": 32, "long": 1}}).text()
    assert "batches of 32 on mixed, 1 on long" in text
    assert "| long | a | fp32 | - |" in text and "not run on this corpus: left out by the plan" in text
    assert "| mixed | c | bf16 | - |" in text and "cannot run: no bfloat16 here" in text
    assert "| vs runtimes | 3.00x (2.00-4.00) | 2/3 | **PASS** |" in text


@pytest.mark.slow
def test_bench_cpu_quick_every_contender(bench, tmp_path, one_thread):
    """bench_cpu --quick end to end: the ONNX export, every contender on its corpora, parity with
    transformers fp32, the goals, the JSON and markdown files; a peer that cannot run is a row
    with the reason."""
    bench_cpu = bench("bench_cpu")
    out, md = tmp_path / "bench_cpu.json", tmp_path / "results.md"
    rc = bench_cpu.main(["--quick", "--corpora", "mixed", "long", "--out", str(out), "--markdown", str(md)])
    assert rc == 0
    rec = json.loads(out.read_text())
    assert rec["machine"]["torch"] == torch.__version__ and rec["settings"]["rounds"] == 2
    peaks = rec["matmul_tflops"]
    assert set(peaks) == {"mixed", "long"} and all(len(v["bf16"]) == 2 for v in peaks.values())
    rows = {(r["corpus"], r["contender"]): r for r in rec["results"]}
    assert len(rows) == 2 * len(bench_cpu.PLAN)  # every contender has a row on every corpus
    missing = {name for name in ("onnxruntime", "openvino", "nncf", "sentence_transformers")
               if importlib.util.find_spec(name) is None}
    for (corpus, key), r in rows.items():
        if r["not_run"]:
            corpora, why_not = bench_cpu.PLAN[key]
            assert corpora is not None and corpus not in corpora and r["why_not"] == why_not
            continue
        if r["error"]:  # only a peer may fail, and only for a stated reason
            assert r["kind"] != "ours", (key, r["error"])
            assert ("bfloat16" in r["error"] and key == "onnxruntime-bf16") or "ModuleNotFoundError" in r["error"], r
            continue
        assert len(r["times_s"]) == 2 and r["tokens_per_s"]["median"] > 0, key
        if key != "transformers-fp32":
            assert r["vs_reference"]["n"] == 2
            floor = {"fp32": 0.99999, "bf16": 0.999, "int8": 0.99}[r["dtype"]]
            assert r["min_cos"] > floor, (key, r["min_cos"])
    ours = rows[("mixed", "ours-fp32")]
    assert ours["max_abs"] < 1e-4 and ours["mfu"] > 0
    if not missing & {"onnxruntime", "openvino"}:
        assert ours["vs_runtime"]["n"] == 2 and ours["best_runtime"] in ("onnxruntime-fp32", "openvino-fp32")
        assert rows[("mixed", "openvino-bf16")]["vs_runtime_rounds"]  # the bf16 pool holds OpenVINO at least
    goals = {g["goal"]: g for g in rec["goals"]}
    assert len(goals) == len(bench_cpu.GOALS)
    assert goals["parity: ours bf16 min cosine >= 0.999 vs transformers fp32 (worst corpus)"]["verdict"] == "PASS"
    fixed = [g for g in rec["goals"] if g["metric"] == "mfu"][0]
    assert fixed["verdict"] == "n/a" and fixed["why"] == "no such contender or corpus in this run"
    text = md.read_text()
    assert "| corpus | contender |" in text and "| goal | measured |" in text and "not run on this corpus" in text


@pytest.mark.slow
def test_gpu_scripts_dry_run_on_cpu(bench, tmp_path, one_thread):
    """The GPU scripts' logic on the CPU: rows, goals, error rows for a backend that cannot run."""
    bench_gpu = bench("bench_gpu")
    out = tmp_path / "bench_gpu.json"
    rc = bench_gpu.main(["--device", "cpu", "--config", "small", "--quick", "--mixed-tokens", "300",
                         "--fixed-docs", "1", "--long-len", "600", "--only", "default", "attn=torch-varlen", "text",
                         "rerank", "classify", "--out", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["corpus"] for r in rows} == {"mixed", "fixed512", "long", "rerank1x24", "rerank4x4", "classify"}
    scored = [r for r in rows if r["corpus"] in ("rerank1x24", "rerank4x4", "classify")]
    assert [(r["corpus"], r["engine"]) for r in scored] == [  # each against its own transformers baseline
        ("rerank1x24", "transformers"), ("rerank4x4", "transformers"), ("classify", "transformers"),
        ("rerank1x24", "ours"), ("rerank4x4", "ours"), ("classify", "ours")]
    for r in scored[3:]:
        assert not r["error"] and r["tokens_per_s"] > 0 and r["ratio"] > 0 and r["min_cos"] > 0.999, r
    rows = [r for r in rows if r not in scored]
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
                      "--cases", "fp32:auto", "bf16:auto", "bf16:attn=torch-varlen", "ce:fp32:auto", "ce:bf16:auto",
                      "--out", str(out)])
    assert rc == 0
    cases = {c["case"]: c for c in json.loads(out.read_text())["cases"]}
    ce = cases["ce:fp32:auto"]
    assert ce["status"] == "PASS" and ce["cross_encoder"] and max(ce["max_diff_crossing"], ce["max_diff_long_batch"]) < 1e-4
    assert cases["ce:bf16:auto"]["status"] == "PASS" and 0.999 <= cases["ce:bf16:auto"]["min_cos"] < 1
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


@pytest.mark.slow
def test_cpu_profile_parts_add_up_to_the_call(bench, tmp_path, one_thread):
    """profile_cpu on a small model: every part timed, the parts' shares add up to the call (the
    clocks are exclusive), the matmul and attention rates are positive, int8 included."""
    prof = bench("profile_cpu")
    out = tmp_path / "profile.json"
    rc = prof.main(["--config", "small", "--mixed-docs", "6", "--fixed-docs", "1", "--repeats", "1",
                    "--dtypes", "float32", "int8", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(out)])
    assert rc == 0
    rec = json.loads(out.read_text())
    layers = json.loads((tmp_path / "ckpt" / "config.json").read_text())["num_hidden_layers"]
    assert rec["peaks_gflops"]["float32"] > 0 and rec["peaks_gflops"]["int8"] == 0
    assert [(r["dtype"], r["corpus"]["name"]) for r in rec["results"]] == [
        ("float32", "mixed"), ("float32", "fixed512"), ("int8", "mixed"), ("int8", "fixed512")]
    for r in rec["results"]:
        parts = r["parts"]
        assert set(parts) == set(prof.PARTS)
        assert 0.97 < sum(p["share"] for p in parts.values()) < 1.03, parts
        assert parts["matmul"]["calls_per_call"] == 4 * layers  # Wqkv, Wo, Wi, Wo per layer
        assert parts["matmul"]["gflops"] > 0 and parts["attention"]["gflops"] > 0
        assert parts["pool"]["calls_per_call"] == 1


def test_markdown_section_is_rewritten_not_appended(bench, tmp_path):
    """A benchmark's table is rewritten as it grows (a run cut short leaves its latest table), after
    what the file held before the run, and once."""
    h = bench("harness")
    md = tmp_path / "results.md"
    md.write_text("# earlier\n")
    section = h.MarkdownSection(md, "bench_x")
    section.write("| row 1 |", partial=True)
    assert md.read_text() == "# earlier\n\n### bench_x\n\n| row 1 |\n\n(partial: the run had not finished when this was written)\n"
    section.write("| row 1 |\n| row 2 |")
    assert md.read_text() == "# earlier\n\n### bench_x\n\n| row 1 |\n| row 2 |\n"
    h.MarkdownSection(None, "nothing").write("x")  # no file asked for: nothing written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.md"]


def test_rerank_workload_pairs(bench):
    """The rerank workloads: [CLS] query [SEP] document [SEP] of log-normal whole lengths (median
    about the one asked for, capped), each query's documents together; the text spelling tokenises
    back to exactly those ids through the id tokenizer's pair template; the warm-up head keeps
    whole pairs."""
    pytest.importorskip("tokenizers")
    h = bench("harness")
    from harness import rerank
    from modernbert_embed.config import ModernBertConfig
    from modernbert_embed.tokenizer import TextTokenizer

    cfg = ModernBertConfig()
    v = h.Vocab.of(cfg)
    one = rerank.rerank_corpus(v, 1, 200, seed=11)
    many = rerank.rerank_corpus(v, 64, 16, seed=12)
    assert (one.name, one.num_docs, many.name, many.num_docs) == ("rerank1x200", 200, "rerank64x16", 1024)
    assert rerank.rerank_corpus(v, 1, 200, seed=11).ids == one.ids  # deterministic
    lengths = np.array(many.lengths)
    assert 105 <= np.median(lengths) <= 135 and lengths.max() <= 512 and (lengths == 512).any()
    assert 95 <= np.median(one.lengths) <= 145 and max(one.lengths) <= 512
    for seq, q, doc in zip(many.ids, many.query_of, many.docs):
        body = many.queries[q]
        assert seq == [v.cls] + body + [v.sep] + doc + [v.sep] and len(doc) >= 1
    assert many.query_of == [i // 16 for i in range(1024)]

    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        h.write_id_tokenizer(Path(tmp), cfg)
        tok = TextTokenizer(Path(tmp) / "tokenizer.json")
        got, truncated = tok.encode_pairs(many.texts()[:40])
    assert got == many.ids[:40] and not any(truncated)

    head = one.head(1000)
    assert head.ids == one.ids[:head.num_docs]
    assert head.num_tokens <= 1000 < head.num_tokens + one.lengths[head.num_docs]
    assert head.texts() == one.texts()[:head.num_docs]
    assert one.head(3).num_docs == 1  # at least one whole pair


def test_scores_run_checks_parity_before_timing(bench):
    """ScoresRun: a contender whose logits differ from ours fp32 on the warm-up pairs (fp32: max
    |diff|; bf16: the centred cosine) is not timed and says by how much; the others are timed,
    compared on round 1's scores, and their ratios taken against the reference."""
    h = bench("harness")
    from harness import rerank
    from harness.rounds import Contender
    from modernbert_embed.config import ModernBertConfig

    cfg = ModernBertConfig.from_dict(h.SMALL_CONFIG)
    corpus = rerank.rerank_corpus(h.Vocab.of(cfg), 1, 8, seed=0, median=40)
    scores = torch.linspace(-2, 2, 8).reshape(8, 1)
    clock, calls = _Clock(), []

    def fake(name, cost, out):
        class Fake(h.Engine):
            label = f"fake {name}"

            def encode(self, c):
                calls.append((name, c.name))
                if not c.name.endswith("-head"):
                    clock.now += cost
                return out[:c.num_docs].clone()

        return lambda role: Fake()

    noise = torch.tensor([0.3, -0.3] * 4).reshape(8, 1)
    plan = [
        Contender("ours-fp32", "ours", "fp32", "ours", fake("ours", 1.0, scores)),
        Contender("ours-bf16", "ours", "bf16", "ours", fake("ours16", 0.5, scores + 0.01)),
        Contender("st", "st", "fp32", "reference", fake("st", 4.0, scores + 2e-6)),
        Contender("rt-fp32", "rt", "fp32", "runtime", fake("rt", 2.0, scores + 5e-3)),  # off by 5e-3
        Contender("rt-bf16", "rt16", "bf16", "runtime", fake("rt16", 1.0, scores * 0.2 + noise)),  # another ranking
        Contender("rt2-bf16", "rt2", "bf16", "runtime", fake("rt2", 2.0, scores * 3.0 + 1.0)),  # same ranking
    ]
    run = rerank.ScoresRun(plan, {"rerank": corpus}, cfg, rounds=2, warmup_tokens=120, matmul_n=32,
                           reference="st", parity="ours-fp32", log=lambda s: None, clock=clock)
    run.run_corpus("rerank")
    s = {x["contender"]: x for x in run.summaries()}
    assert s["rt-fp32"]["error"].startswith("before timing: logits differ from ours-fp32's by up to 0.005")
    assert "centred cosine" in s["rt-bf16"]["error"] and "not timed" in s["rt-bf16"]["error"]
    assert not s["rt-fp32"]["times_s"] and not s["rt-bf16"]["times_s"]
    assert ("rt", "rerank1x8") not in calls and ("rt16", "rerank1x8") not in calls
    assert s["ours-fp32"]["vs_reference_rounds"] == [4.0, 4.0]
    assert s["ours-bf16"]["vs_runtime_rounds"] == [4.0, 4.0]  # against rt2-bf16, the one bf16 runtime timed
    assert s["ours-fp32"]["vs_runtime"] is None  # the fp32 runtime was refused
    assert s["st"]["max_abs"] == pytest.approx(2e-6, abs=1e-7) and s["st"]["min_cos"] == pytest.approx(1.0)
    assert s["rt2-bf16"]["min_cos"] == pytest.approx(1.0) and s["rt2-bf16"]["max_abs"] == pytest.approx(5.0)
    assert run.checks["rerank"]["ours-bf16"]["pairs"] == corpus.head(120).num_docs
    assert rerank.centred_cosine(scores, -scores) == pytest.approx(-1.0)


@pytest.mark.slow
def test_bench_cpu_quick_rerank_rows(bench, tmp_path, one_thread):
    """bench_cpu --quick --only rerank end to end: the cross-encoder's ONNX export, every rerank
    contender on both workloads, scores checked against ours fp32, ratios against
    sentence-transformers' CrossEncoder, the goals, the JSON and markdown; no embedding rows."""
    bench_cpu = bench("bench_cpu")
    out, md = tmp_path / "rerank.json", tmp_path / "results.md"
    rc = bench_cpu.main(["--quick", "--only", "rerank", "--out", str(out), "--markdown", str(md)])
    assert rc == 0
    rec = json.loads(out.read_text())
    assert rec["script"] == "bench_cpu rerank" and rec["settings"]["reference"] == "sentence-transformers-fp32"
    assert set(rec["corpora"]) == {"rerank-one", "rerank-many"}
    assert [(c["name"], c["docs"]) for c in rec["corpora"].values()] == [("rerank1x12", 12), ("rerank3x4", 12)]
    rows = {(r["corpus"], r["contender"]): r for r in rec["results"]}
    assert len(rows) == 2 * len(bench_cpu.RERANK_CONTENDERS)
    missing = {name for name in ("onnxruntime", "openvino") if importlib.util.find_spec(name) is None}
    for (corpus, key), r in rows.items():
        if r["error"]:  # only a peer may fail, and only for a stated reason
            assert r["kind"] != "ours", (key, r["error"])
            assert ("bfloat16" in r["error"] and key == "onnxruntime-bf16") or "ModuleNotFoundError" in r["error"], r
            continue
        assert len(r["times_s"]) == 2 and r["tokens_per_s"]["median"] > 0, key
        if key != "ours-fp32":
            bound = 1e-4 if r["dtype"] == "fp32" else 0.05
            assert r["max_abs"] < bound and r["min_cos"] > 0.999, (key, r["max_abs"], r["min_cos"])
        if key != "sentence-transformers-fp32":
            assert r["vs_reference"]["n"] == 2
    if not missing:
        ours = rows[("rerank-one", "ours-fp32")]
        assert ours["best_runtime"] in ("onnxruntime-fp32", "openvino-fp32") and ours["vs_runtime"]["n"] == 2
        assert rows[("rerank-many", "ours-bf16")]["best_runtime"] == "openvino-bf16"
    goals = {g["goal"]: g for g in rec["goals"]}
    assert len(goals) == len(bench_cpu.RERANK_GOALS) == 8
    assert all(g["verdict"] in ("PASS", "FAIL") for g in goals.values() if "runtime" not in g["goal"] or not missing)
    text = md.read_text()
    assert "### bench_cpu rerank" in text and "| x sentence-transformers fp32 |" in text
    assert "| goal | measured |" in text and "rerank, 1 query: ours fp32 >= 2x" in text
    assert "bench_cpu," not in text.replace("bench_cpu rerank", "")  # no embedding table
