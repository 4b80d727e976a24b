"""Late-interaction (ColBERT) speed on the CPU: our `MultiVectorEncoder` against PyLate's
`ColBERT.encode` and sentence-transformers 6's `MultiVectorEncoder`, alternated round by round as
bench_cpu alternates its contenders; with --device cuda, the GPU rows.

    python benchmarks/bench_multivector.py                 # the full CPU run (`make bench`)
    python benchmarks/bench_multivector.py --quick         # small model, a few texts, 2 rounds (seconds)
    python benchmarks/bench_multivector.py --device cuda   # the GPU rows (the device check's bench step)

All contenders run the same random ColBERT folder in GTE-ModernColBERT-v1's layout (the base
backbone of modernbert-embed-base: hidden 768, 12 heads, 22 layers; `1_Dense` 768 -> 128;
ModernBERT's tokenizer with PyLate's `[Q] ` / `[D] `; query_length 32 with [MASK] expansion,
document_length 300) on the same texts. Workloads: "documents", the harness's mixed corpus
(log-normal lengths, median 110, up to 512) spelled as one-token words with a few commas and
periods (skiplist tokens), truncated to 300 tokens by every contender as ColBERT does; "queries",
5-30 words, which query expansion pads to 32 tokens. Token counts (rates, FLOPs) are the tokens the
model computes: prefix, truncation and expansion included.

Contenders: ours fp32 and bf16 (`encode_document` / `encode_query`, packed unpadded), PyLate 1.6
fp32 (`ColBERT.encode`, batches of 32) and sentence-transformers fp32 (`MultiVectorEncoder`,
batches of 32). PyLate pins older sentence-transformers and transformers than ours, so it runs in
its own virtual environment (`make pylate-venv`) as a long-lived worker process
(harness/pylate_worker.py): the texts are sent once at start, each round sends it one command and
it reports its own time around `encode` alone, so the rounds still alternate it with the
in-process contenders and the pipe is not in its time. Before any timing, every contender's vectors
of the whole workload are compared with ours fp32 text by text (same number of vectors per text;
per-token max abs difference, min cosine): a contender whose vectors do not line up with ours does
not run. That pass is also the warm-up.

Rounds: as bench_cpu (harness.rounds): each workload, `--rounds` rounds (at least 5 for a real
run), each preceded by a matmul in fp32 and bf16, every contender once in an order shuffled per
round; ratios are taken inside a round and reported as the median of the per-round ratios with
their min-max. "x faster peer" is the ratio to the faster of PyLate and sentence-transformers fp32
in that round (the peers have no faster CPU dtype: fp32 is how their users run them on a CPU), for
ours bf16 as for ours fp32. Goals (issue "The ModernBERT family, part 2", item 6): documents >= 2x
the faster peer in fp32 and in bf16; queries >= 1.5x.

Time: the full run (`make bench`'s second part) is an estimate, not a measurement: 96 documents
(about 13k tokens after truncation) and 256 queries (8,192 tokens) per contender per round, and the
parity pass before the rounds costs one more round. bench_cpu's mixed corpus ran ours at about 800
(fp32) and 1,200 (bf16) tokens/s on 2 threads; a small run here (8 documents, one thread) put each
peer at 3.5x below ours fp32. So a documents round takes near 100 s, a queries round near 60 s, and
the whole run with 5 rounds (plus writing the checkpoint and loading the base model four times per
workload) 15-20 minutes on a 2-core machine.

GPU rows (--device cuda, ours bf16 against sentence-transformers bf16, `measure`: a warm-up, then
the median of `--repeats` calls; 2,048 documents and 4,096 queries). Predictions, written before
any GPU run: the backbone's Linear layers hold about 110M weights (149M less the 38.6M embedding
table), 0.22 GFLOP per token, and attention adds little at these lengths (0.228 GFLOP per token at
110 tokens, 0.234 at 300, 0.223 at 32: `ModernBertConfig.flops_per_token`); the 768 -> 128
projection and the L2 norm add 0.2 MFLOP per token, nothing. So the documents workload runs at
the rate of bench_gpu's mixed corpus at the same budget: on an H100, 800k-1.1M tokens/s for ours
bf16 (bench_gpu's goal is 1M tokens/s at 512 tokens; 1M x 0.23 GFLOP = 230 TFLOP/s, 23% of the
989 TFLOP/s dense peak, as a 768-wide model's thin GEMMs allow), the per-text output being views
of one packed tensor on the device (as sentence-transformers returns tensors there).
sentence-transformers bf16 pads each batch of 32 to its longest (truncation to 300 keeps that to
about 1.6x the real tokens) and runs transformers' SDPA: 150k-250k tokens/s, so ours >= 4x.
Queries are 32 tokens each after expansion (uniform: no padding waste for either), short sequences
where launches dominate: sentence-transformers runs ~1k tokens per forward (a batch of 32), a few
hundred microseconds of GEMM against 22 layers of kernel launches, 100k-200k tokens/s; ours packs
thousands of queries per forward, 300k-600k tokens/s, ours >= 2.5x.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as h  # noqa: E402
from harness import multivector as mv  # noqa: E402
from harness import onnx_peers  # noqa: E402
from harness.rounds import Contender, RoundGoal, RoundsRun  # noqa: E402
from harness.rounds_report import RoundsResults, _ratio, _spread_text  # noqa: E402
from modernbert_embed.config import ModernBertConfig  # noqa: E402

WORKLOADS = ("documents", "queries")
# The GPU rows' predicted tokens/s on an H100 (the module docstring's reasoning), written before any run;
# each row's goal column says where the measurement fell.
GPU_PREDICTIONS = {("ours", "documents"): (800e3, 1.1e6), ("sentence-transformers", "documents"): (150e3, 250e3),
                   ("ours", "queries"): (300e3, 600e3), ("sentence-transformers", "queries"): (100e3, 200e3)}
CHECK_AGAINST = "ours-fp32"  # every contender's vectors are compared with these
REFERENCE = "pylate-fp32"  # the "x PyLate" column
PEER_BATCH = 32
CONTENDERS = ("ours-fp32", "ours-bf16", "pylate-fp32", "sentence-transformers-fp32")
GOALS = [
    RoundGoal("ours fp32 >= 2x the faster of PyLate and sentence-transformers (fp32), documents", "ours-fp32",
              "vs_runtime", 2.0, ("documents",)),
    RoundGoal("ours bf16 >= 2x the faster of PyLate and sentence-transformers (fp32), documents", "ours-bf16",
              "vs_runtime", 2.0, ("documents",)),
    RoundGoal("ours fp32 >= 1.5x the faster of PyLate and sentence-transformers (fp32), queries", "ours-fp32",
              "vs_runtime", 1.5, ("queries",)),
    RoundGoal("ours bf16 >= 1.5x the faster of PyLate and sentence-transformers (fp32), queries", "ours-bf16",
              "vs_runtime", 1.5, ("queries",)),
    RoundGoal("parity: PyLate fp32 per-token max abs <= 1e-4 vs ours fp32 (worst workload)", "pylate-fp32",
              "max_abs", 1e-4),
    RoundGoal("parity: sentence-transformers fp32 per-token max abs <= 1e-4 vs ours fp32 (worst workload)",
              "sentence-transformers-fp32", "max_abs", 1e-4),
    RoundGoal("parity: ours bf16 per-token min cosine >= 0.99 vs ours fp32 (worst workload)", "ours-bf16",
              "min_cos", 0.99),
]


class MultiVectorRounds(RoundsRun):
    """`RoundsRun` for per-token outputs: a self-timed engine's own `seconds` replaces the clock's,
    the vectors are checked against ours fp32 once before the rounds (and a contender whose vectors
    do not line up is dropped), and the peer ratio is to the faster fp32 peer (kind "runtime")."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.checks: dict[str, dict[str, tuple[float, float]]] = {role: {} for role in self.corpora}

    def load(self, role: str) -> None:
        super().load(role)
        corpus = self.corpora[role]
        active = [c for c in self.contenders if c.engine is not None and not c.error and c.runs_on(role)]
        base_c = next((c for c in active if c.key == CHECK_AGAINST), None)
        if base_c is None:
            self.log(f"  {role}: {CHECK_AGAINST} is not running: no parity check")
            return
        base = base_c.engine.vectors(corpus)
        for c in active:
            if c is base_c:
                continue
            try:
                self.checks[role][c.key] = mv.compare_vectors(c.engine.vectors(corpus), base)
                worst, cos = self.checks[role][c.key]
                self.log(f"  {role}: {c.key} vs {CHECK_AGAINST}: max abs {worst:.2e}, min cos {cos:.6f}")
            except Exception as e:
                c.error = f"parity check: {type(e).__name__}: {e}"[:500]
                self.log(f"  {c.key}: does not run: {c.error}")

    def _encode(self, c: Contender, corpus) -> tuple[float, Any]:
        t0 = self.clock()
        out = c.engine.encode(corpus)
        seconds = self.clock() - t0
        own = getattr(c.engine, "seconds", None)
        if own is not None:
            seconds = own
        if out is not None:
            if len(out) != corpus.num_docs:
                raise RuntimeError(f"{len(out)} outputs for {corpus.num_docs} texts")
            last = out[-1]
            if not np.isfinite(np.asarray(last.float().cpu() if isinstance(last, torch.Tensor) else last)).all():
                raise RuntimeError("non-finite vectors")
        return seconds, None

    def _round_ratios(self, role: str, r: int) -> None:
        cells = self.cells[role]
        now = {key: cell.times[r] for key, cell in cells.items() if len(cell.times) == r + 1}
        ref = now.get(self.reference)
        by_key = {c.key: c for c in self.contenders}
        peers = {k: v for k, v in now.items() if by_key[k].kind == "runtime" and by_key[k].dtype == "fp32"}
        best = min(peers, key=peers.get) if peers else None
        for key, t in now.items():
            if ref is not None:
                cells[key].vs_reference.append(ref / t)
            if best is not None:
                cells[key].vs_runtime.append(peers[best] / t)
                cells[key].best_runtime.append(best)

    def _compare(self, role: str) -> None:
        for key, (worst, cos) in self.checks[role].items():
            cell = self.cells[role].get(key)
            if cell is not None:
                cell.max_abs, cell.min_cos = worst, cos
        for cell in self.cells[role].values():
            cell.embeddings = None


class MultiVectorResults(RoundsResults):
    def contender_table(self, summaries) -> str:
        head = ["workload", "contender", "dtype", "tokens/s", "texts/s", "x PyLate fp32",
                "x faster peer (fp32)", "model TFLOP/s", "MFU (matmul)", "min cos vs ours fp32",
                "max abs vs ours fp32", "note"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for s in summaries:
            note = (("cannot run: " if not s["times_s"] else "") + s["error"]) if s["error"] else ""
            peer = _ratio(s["vs_runtime"])
            if s["vs_runtime"] and s["kind"] != "runtime":
                peer += f" vs {s['best_runtime']}"
            cells = [s["corpus"], s["name"], s["dtype"], _spread_text(s["tokens_per_s"]),
                     h.fmt_num(s["docs_per_s"]["median"]) if s["docs_per_s"] else "-",
                     "-" if s["contender"] == self.run.reference else _ratio(s["vs_reference"]), peer,
                     "-" if s["model_tflops"] is None else f"{s['model_tflops']:.3g}", h.fmt_pct(s["mfu"]),
                     "-" if s["min_cos"] is None else f"{s['min_cos']:.6f}",
                     "-" if s["max_abs"] is None else f"{s['max_abs']:.2e}", note.replace("|", "/").replace("\n", " ")]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu (default: the alternated rounds), or cuda for the GPU rows")
    p.add_argument("--gpu-rows", action="store_true",
                   help="the GPU rows' plan on --device (with --device cpu: a dry run of its logic)")
    p.add_argument("--quick", action="store_true", help="small model, a few texts, 2 rounds (the suite's test)")
    p.add_argument("--config", choices=("base", "small"), default=None, help="model shape (default: base; --quick: small)")
    p.add_argument("--rounds", type=int, default=None, help="rounds per workload (default 5; --quick: 2)")
    p.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    p.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    p.add_argument("--docs", type=int, default=None, help="documents (default 96; --quick 6; GPU rows 2048)")
    p.add_argument("--queries", type=int, default=None, help="queries (default 256; --quick 8; GPU rows 4096)")
    p.add_argument("--repeats", type=int, default=None, help="GPU rows: timed calls per row (default 3)")
    p.add_argument("--threads", type=int, default=None, help="torch threads, here and in PyLate's worker")
    p.add_argument("--matmul-n", type=int, default=None, help="size of the peak matmul (default 2048)")
    p.add_argument("--checkpoint", type=Path, default=None, help="a folder for the random ColBERT checkpoint (kept)")
    p.add_argument("--seed", type=int, default=0)
    h.add_output_args(p, append=False)
    args = p.parse_args(argv)
    gpu = args.gpu_rows or args.device != "cpu"
    defaults = {"config": "small" if args.quick else "base", "rounds": 2 if args.quick else 5,
                "docs": 6 if args.quick else (2048 if gpu else 96),
                "queries": 8 if args.quick else (4096 if gpu else 256),
                "repeats": 1 if args.quick else 3, "matmul_n": 256 if args.quick else 2048}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if not args.quick and not gpu and args.rounds < 5:
        print(f"bench_multivector: note: {args.rounds} rounds; the issue's benchmark asks for at least 5",
              file=sys.stderr)
    return args


def build_contenders(args, folder: Path, workloads, threads: int) -> list[Contender]:
    cpu = torch.device("cpu")
    factories = {
        "ours-fp32": ("ours", "fp32", "ours", lambda role: mv.OursMultiVector(folder, cpu, torch.float32)),
        "ours-bf16": ("ours", "bf16", "ours", lambda role: mv.OursMultiVector(folder, cpu, torch.bfloat16)),
        "pylate-fp32": ("PyLate", "fp32", "runtime",
                        lambda role: mv.PyLateWorker(folder, {role: workloads[role]}, threads, PEER_BATCH)),
        "sentence-transformers-fp32": ("sentence-transformers", "fp32", "runtime",
                                       lambda role: mv.SentenceTransformersMultiVector(folder, cpu, torch.float32,
                                                                                       PEER_BATCH)),
    }
    out = []
    for key in CONTENDERS:
        if key in args.contenders:
            name, dtype, kind, factory = factories[key]
            out.append(Contender(key, name, dtype, kind, factory))
    return out


def cpu_main(args, folder: Path, workloads) -> int:
    threads = onnx_peers.default_threads()
    contenders = build_contenders(args, folder, workloads, threads)
    cfg = ModernBertConfig.from_file(folder / "config.json")
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    settings.update({"threads": threads, "reference": REFERENCE, "check_against": CHECK_AGAINST,
                     "peer_batch": {role: PEER_BATCH for role in workloads}, "ours_max_batch_tokens": "library default"})
    run = MultiVectorRounds(contenders, workloads, cfg, rounds=args.rounds, seed=args.seed,
                            warmup_tokens=128 if args.quick else 512, matmul_n=args.matmul_n, reference=REFERENCE)
    results = MultiVectorResults("bench_multivector", run, GOALS, settings, args.out, args.markdown)
    print(f"bench_multivector: {h.machine_line(results.info)}; {threads} threads")
    print("workloads: " + "; ".join(f"{c.name} {c.num_docs} texts {c.num_tokens} tokens" for c in workloads.values()))
    for role in workloads:
        run.run_corpus(role)
        results.save()
    print()
    print(results.finish())
    broken = [c.key for c in contenders if c.kind == "ours" and c.error]
    broken += [f"{c.key} on {role}" for role in workloads for c in contenders
               if c.kind == "ours" and run.cells[role].get(c.key) and run.cells[role][c.key].error]
    if broken:
        print(f"bench_multivector: our engine failed: {', '.join(broken)}", file=sys.stderr)
    return 1 if broken else 0


def gpu_main(args, folder: Path, workloads) -> int:
    """Ours bf16 against sentence-transformers bf16 on the GPU: `measure` per row (a warm-up call,
    then the median of `--repeats`), ratios over sentence-transformers, vectors compared."""
    device = torch.device(args.device)
    cfg = ModernBertConfig.from_file(folder / "config.json")
    settings = {"config": args.config, "quick": args.quick, "repeats": args.repeats, "docs": args.docs,
                "queries": args.queries, "st_batch_size": PEER_BATCH, "seed": args.seed}
    results = h.Results("bench_multivector (GPU)", device, settings, args.out, None, args.markdown)
    results.corpora = [c.summary() for c in workloads.values()]
    n = 8192 if device.type == "cuda" else 256
    results.peaks = {"nominal": h.nominal_peak_tflops(results.info.get("gpu")),
                     "bf16": h.matmul_tflops(device, torch.bfloat16, n, repeats=10 if device.type == "cuda" else 2)}
    results.settings["matmul_n"] = n
    print(f"bench_multivector: {h.machine_line(results.info)}")
    specs = [("sentence-transformers", "batch 32", lambda: mv.SentenceTransformersMultiVector(
                 folder, device, torch.bfloat16, PEER_BATCH)),
             ("ours", "default", lambda: mv.OursMultiVector(folder, device, torch.bfloat16))]
    base: dict[str, tuple[h.Row, list | None]] = {}
    for engine_name, variant, factory in specs:
        t0 = time.perf_counter()
        try:
            engine = factory()
        except Exception as e:
            for role in workloads:
                results.rows.append(h.Row(engine_name, "bf16", role, variant, error=f"{type(e).__name__}: {e}"[:400]))
            continue
        load_s = time.perf_counter() - t0
        for role, corpus in workloads.items():
            row = h.Row(engine_name, "bf16", role, variant, docs=corpus.num_docs, tokens=corpus.num_tokens,
                        load_s=round(load_s, 2))
            try:
                h.free_memory(device)
                h.reset_peak_memory(device)
                timing, _ = h.measure.measure(lambda: engine.encode(corpus), device, 1, args.repeats,
                                              warmup_fn=lambda: engine.encode(corpus.head(4096)))
                row.seconds, row.p20, row.p80, row.repeats = timing.median, timing.p20, timing.p80, len(timing.times)
                row.tokens_per_s, row.docs_per_s = corpus.num_tokens / timing.median, corpus.num_docs / timing.median
                row.model_tflops = corpus.flops(cfg) / timing.median / 1e12
                row.peak_mem_mb, _ = h.peak_memory_mb(device)
                fpt = corpus.flops(cfg) / corpus.num_tokens
                row.mfu_nominal = h.mfu(row.tokens_per_s, fpt, results.peaks.get("nominal"))
                row.mfu_measured = h.mfu(row.tokens_per_s, fpt, results.peaks.get("bf16"))
                low, high = GPU_PREDICTIONS[(engine_name, role)]
                where = "below" if row.tokens_per_s < low else "above" if row.tokens_per_s > high else "inside"
                row.goal = f"predicted {h.fmt_num(low)}-{h.fmt_num(high)} tok/s on an H100: {where}"
                vecs = engine.vectors(corpus)
                if engine_name != "ours":
                    base[role] = (row, vecs)
                elif role in base:
                    st_row, st_vecs = base[role]
                    row.baseline = "sentence-transformers bf16"
                    if st_row.tokens_per_s:
                        row.ratio = row.tokens_per_s / st_row.tokens_per_s
                    worst, row.min_cos = mv.compare_vectors(vecs, st_vecs)
                    row.extra["max_abs_vs_st"] = worst
            except Exception as e:
                row.error = f"{type(e).__name__}: {e}"[:400]
            results.rows.append(row)
            results.save()
            print(f"  {role} {engine_name} bf16: {h.fmt_num(row.tokens_per_s)} tokens/s"
                  + (f" {row.ratio:.2f}x" if row.ratio else "") + (f" ERROR {row.error}" if row.error else ""))
        engine.close()
        h.free_memory(device)
    print()
    print(results.finish())
    return 1 if any(r.error for r in results.rows if r.engine == "ours") else 0


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if h.cuda_missing(device, "bench_multivector"):
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    try:  # a progress bar per model load would bury the rounds' lines
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    from modernbert_embed import MultiVectorEncoder

    with tempfile.TemporaryDirectory(prefix="mbe-bench-mv-") as tmp:
        folder = args.checkpoint or Path(tmp) / "colbert"
        if not (folder / "config.json").is_file():
            mv.write_colbert_checkpoint(folder, args.config, seed=args.seed)
        tokenizing = MultiVectorEncoder.from_pretrained(str(folder), device="cpu")
        workloads = mv.text_workloads(tokenizing, args.docs, args.queries, seed=args.seed)
        workloads = {k: v for k, v in workloads.items() if k in args.workloads}
        del tokenizing
        if device.type == "cpu" and not args.gpu_rows:
            return cpu_main(args, folder, workloads)
        return gpu_main(args, folder, workloads)


if __name__ == "__main__":
    sys.exit(main())
