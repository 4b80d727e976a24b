"""The late-interaction benchmark (benchmarks/bench_multivector.py): its rounds on fake engines with a
fake clock (a self-timed engine's own time, the ratio to the faster fp32 peer for every dtype, the
parity check that drops a contender whose vectors do not line up), its workloads, and the whole
script in --quick mode with PyLate's worker (slow; skipped, saying why, without PyLate's virtual
environment), plus the GPU rows' logic on the CPU."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from test_benchmarks import BENCH, bench, one_thread  # noqa: F401  (the benchmarks folder on sys.path, one thread)


@pytest.fixture(scope="module")
def small_folder(bench, tmp_path_factory):
    mv = bench("harness.multivector")
    if not mv.TOKENIZER_JSON.is_file():
        pytest.skip(f"needs ModernBERT's tokenizer.json ({mv.TOKENIZER_JSON})")
    return mv.write_colbert_checkpoint(tmp_path_factory.mktemp("mv") / "colbert", "small", seed=1)


def test_workloads_are_what_colbert_computes(bench, small_folder):
    mv = bench("harness.multivector")
    from modernbert_embed import MultiVectorEncoder

    enc = MultiVectorEncoder.from_pretrained(str(small_folder), device="cpu")
    w = mv.text_workloads(enc, docs=40, queries=30, seed=3)
    docs, queries = w["documents"], w["queries"]
    assert (docs.num_docs, queries.num_docs) == (40, 30) and not docs.is_query and queries.is_query
    assert docs.ids == [list(s) for s in enc.tokenize(docs.texts, is_query=False)[0]]
    assert max(docs.lengths) <= enc.document_length == 300 and max(docs.lengths) == 300  # some truncated
    assert queries.lengths == [enc.query_length] * 30  # expansion: every query computes 32 positions
    words = [len(t.split()) for t in queries.texts]
    assert min(words) >= 5 and max(words) <= 30
    # one-token words: a text's real tokens are its words and marks, plus [CLS] [D] [SEP]
    short = next(i for i, n in enumerate(docs.lengths) if n < 300)
    text = docs.texts[short]
    assert docs.lengths[short] == len(text.split()) + text.count(",") + text.count(".") + 3
    assert mv.text_workloads(enc, docs=40, queries=30, seed=3)["documents"].texts == docs.texts  # deterministic
    head = docs.head(200)
    assert head.texts == docs.texts[:head.num_docs] and head.num_tokens <= max(200, docs.lengths[0])


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _corpus(mv, n=3):
    return mv.TextCorpus("documents", [[1, 2, 3]] * n, "", [f"t{i}" for i in range(n)], False, "documents")


def test_rounds_use_own_time_faster_fp32_peer_and_drop_mismatched_vectors(bench):
    mv = bench("harness.multivector")
    bmv = bench("bench_multivector")
    from harness.rounds import Contender
    from modernbert_embed.config import ModernBertConfig
    from modernbert_embed.weights import small_config

    clock = _Clock()
    vecs = [torch.ones(2, 4), torch.ones(1, 4)] + [torch.ones(3, 4)]

    class Fake(mv.Engine):
        def __init__(self, cost, own=None, out=vecs):
            self.cost, self.own, self.out = cost, own, out
            self.seconds = None
            self.label = "fake"

        def encode(self, corpus):
            clock.now += self.cost
            if self.own is not None:
                self.seconds = self.own
            return None if self.own is not None else self.out

        def vectors(self, corpus):
            return self.out

    bad = [torch.ones(2, 4), torch.ones(2, 4), torch.ones(3, 4)]  # text 1: a vector too many
    near = [v + 1e-3 for v in vecs]
    engines = {"ours-fp32": Fake(1.0), "ours-bf16": Fake(0.5, out=near),
               "pylate-fp32": Fake(50.0, own=4.0),  # the pipe's 46 s are not its time
               "sentence-transformers-fp32": Fake(2.0), "broken-fp32": Fake(0.1, out=bad)}
    kinds = {"ours-fp32": ("ours", "fp32", "ours"), "ours-bf16": ("ours", "bf16", "ours"),
             "pylate-fp32": ("PyLate", "fp32", "runtime"), "sentence-transformers-fp32": ("st", "fp32", "runtime"),
             "broken-fp32": ("broken", "fp32", "runtime")}
    contenders = [Contender(k, *kinds[k], (lambda role, e=e: e)) for k, e in engines.items()]
    cfg = ModernBertConfig.from_dict(small_config())
    run = bmv.MultiVectorRounds(contenders, {"documents": _corpus(mv)}, cfg, rounds=3, matmul_n=16,
                                reference="pylate-fp32", clock=clock, log=lambda s: None)
    run.run_corpus("documents")
    s = {x["contender"]: x for x in run.summaries()}
    assert s["pylate-fp32"]["times_s"] == [4.0] * 3
    assert s["broken-fp32"]["error"].startswith("parity check: RuntimeError: text 1") and not s["broken-fp32"]["times_s"]
    # the faster fp32 peer is sentence-transformers (2 s) in every round, for ours fp32 and bf16 alike
    assert s["ours-fp32"]["vs_runtime_rounds"] == [2.0] * 3 and s["ours-bf16"]["vs_runtime_rounds"] == [4.0] * 3
    assert s["ours-fp32"]["vs_reference_rounds"] == [4.0] * 3
    assert s["ours-bf16"]["max_abs"] == pytest.approx(1e-3, rel=1e-3) and s["pylate-fp32"]["max_abs"] == 0.0
    goals = {g["contender"] + g["goal"][-9:]: g for g in (goal.evaluate(run.summaries()) for goal in bmv.GOALS)}
    assert goals["ours-bf16documents"]["verdict"] == "PASS" and goals["ours-bf16documents"]["rounds_passing"] == "3/3"


def test_compare_vectors_and_missing_pylate(bench, tmp_path):
    mv = bench("harness.multivector")
    from harness.rounds import CannotRun

    a = [torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.zeros(0, 2)]
    b = [torch.tensor([[1.0, 0.0], [0.6, 0.8]]), torch.zeros(0, 2)]
    worst, cos = mv.compare_vectors(a, b)
    assert worst == pytest.approx(0.6) and cos == pytest.approx(0.8)
    with pytest.raises(RuntimeError, match="1 outputs for 2 texts"):
        mv.compare_vectors(a[:1], b)
    with pytest.raises(CannotRun, match="make pylate-venv"):
        mv.PyLateWorker(tmp_path, {}, 1, python=tmp_path / "no-python")


@pytest.mark.slow
def test_quick_run_end_to_end_with_pylate(bench, tmp_path, one_thread):
    """bench_multivector --quick: every contender on both workloads, PyLate in its worker."""
    mv = bench("harness.multivector")
    if not mv.PYLATE_PYTHON.is_file():
        pytest.skip(f"PyLate's virtual environment is absent ({mv.PYLATE_PYTHON}): `make pylate-venv` makes it")
    bmv = bench("bench_multivector")
    out, md = tmp_path / "mv.json", tmp_path / "results.md"
    assert bmv.main(["--quick", "--threads", "1", "--out", str(out), "--markdown", str(md)]) == 0
    rec = json.loads(out.read_text())
    rows = {(r["corpus"], r["contender"]): r for r in rec["results"]}
    assert set(rows) == {(w, c) for w in bmv.WORKLOADS for c in bmv.CONTENDERS}
    for (workload, key), r in rows.items():
        assert not r["error"], (workload, key, r["error"])
        assert len(r["times_s"]) == 2 and all(t > 0 for t in r["times_s"])
        assert key == "ours-fp32" or r["max_abs"] is not None
    for workload in bmv.WORKLOADS:
        assert rows[(workload, "pylate-fp32")]["max_abs"] < 1e-4
        assert rows[(workload, "sentence-transformers-fp32")]["max_abs"] < 1e-4
        assert rows[(workload, "ours-bf16")]["min_cos"] > 0.99
        assert len(rows[(workload, "ours-fp32")]["vs_runtime_rounds"]) == 2
        assert "own process" in rows[(workload, "pylate-fp32")]["label"]
    assert [g["verdict"] in ("PASS", "FAIL") for g in rec["goals"]] == [True] * len(bmv.GOALS)
    assert "x faster peer (fp32)" in md.read_text()


@pytest.mark.slow
def test_gpu_rows_dry_run_on_cpu(bench, tmp_path, one_thread):
    bmv = bench("bench_multivector")
    out = tmp_path / "gpu.json"
    assert bmv.main(["--gpu-rows", "--quick", "--docs", "3", "--queries", "3", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["engine"], r["corpus"]) for r in rows] == [
        ("sentence-transformers", "documents"), ("sentence-transformers", "queries"), ("ours", "documents"),
        ("ours", "queries")]
    assert all(not r["error"] and r["tokens_per_s"] > 0 and "predicted" in r["goal"] for r in rows)
    assert all(r["ratio"] > 0 and r["min_cos"] > 0.99 for r in rows if r["engine"] == "ours")


def test_device_check_runs_the_late_interaction_rows_after_bench_gpu(tmp_path):
    """Parts of a step start together, except one with `after`, which waits for that part to end
    (two GPU benchmarks never overlap); one still waiting when the budget is spent is not run."""
    import importlib.util
    import time

    spec = importlib.util.spec_from_file_location("device_check", BENCH / "device_check.py")
    dc = importlib.util.module_from_spec(spec)
    sys.modules["device_check"] = dc
    try:
        spec.loader.exec_module(dc)

        def stamp(name, sleep):
            return [sys.executable, "-c", f"import time; t0 = time.time(); time.sleep({sleep}); "
                    f"open({str(tmp_path / name)!r}, 'w').write(f'{{t0}} {{time.time()}}')"]

        parts = [dc.Part("first", stamp("first", 1.0)), dc.Part("second", stamp("second", 0.1), after="first"),
                 dc.Part("beside", stamp("beside", 0.1))]
        dc.run_parts(parts, tmp_path, dict(__import__("os").environ), time.monotonic() + 60, "bench")
        (f0, f1), (s0, _), (b0, _) = [map(float, (tmp_path / n).read_text().split())
                                      for n in ("first", "second", "beside")]
        assert s0 >= f1 and b0 < f1 and [p.status for p in parts] == ["ok"] * 3
        late = [dc.Part("slow", stamp("slow", 30)), dc.Part("then", stamp("then", 0), after="slow")]
        dc.run_parts(late, tmp_path, dict(__import__("os").environ), time.monotonic() + dc.GRACE_S + 1, "bench")
        assert late[0].status.startswith("CUT") and late[1].status.startswith("not run (slow used")
        assert not (tmp_path / "then").exists()
    finally:
        sys.modules.pop("device_check", None)
