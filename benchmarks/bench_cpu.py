"""CPU throughput against every CPU runtime, in one process, alternated round by round so that a
noisy host cannot flatter the ratios.

    python benchmarks/bench_cpu.py                  # the full run (`make bench`): see the time below
    python benchmarks/bench_cpu.py --quick          # small model, tiny corpora, 2 rounds (under a minute)
    python benchmarks/bench_cpu.py --corpora mixed --contenders ours-bf16 openvino-bf16 transformers-fp32
    python benchmarks/bench_cpu.py --only rerank    # the rerank rows only (see below for the time)
    python benchmarks/bench_cpu.py --only rerank --rerank-docs 48 --rerank-queries 3 --rounds 3   # scaled down

All contenders run on the same random checkpoint (the real layout, base size) and the same token
ids: ours fp32 and bf16 (`Embedder.encode_tokens`, unpadded), transformers fp32 (the reference of
ratio (a)) and bf16, ONNX Runtime fp32 / bf16 and OpenVINO fp32 / bf16 on an ONNX export of the
checkpoint made here (the runtimes of ratio (b)), sentence-transformers fp32 (the text path,
through an id tokenizer that gives back the corpus ids), and int8 rows for ours (the int8-weight
experiment, `select_ops(..., int8_weights=True)`), ONNX Runtime (dynamic quantisation) and
OpenVINO (NNCF int8 weights). Peers get length-sorted padded batches of 32, as their users run
them (one document per batch on the long corpora, where the exported graph's attention scores fill
the memory). A contender that cannot run is a row that says why; one left
out of a corpus by the plan (PLAN) is a row that says why too. The mixed corpus has 96 documents
(median about 110 tokens, cap 512), so that the peers' length sorting has three batches of 32 to
sort into (with 32 documents, one padded batch held 2.8 times the real tokens; with 96, 1.6).

Each corpus: a warm-up of every contender, then `--rounds` rounds (at least 5 for a real run), each
preceded by a 2048^3 matmul in fp32 and bf16 (the measured peaks of the MFU column), each
running every contender once in a shuffled order. Goals (issue 11) are evaluated on the median
of the per-round ratios.

Rerank rows (issue: the ModernBERT family, item 6; their own table and goals, after the embedding
ones, or alone with `--only rerank`): a random cross-encoder (the base shape with a one-label
head, mean pooling: gte-reranker-modernbert-base's layout) on two workloads of (query, document)
pairs whose whole length `[CLS] q [SEP] d [SEP]` is log-normal (median ~120 tokens, cap 512):
one query x 200 documents (`--rerank-docs`) and 64 queries x 16 documents (`--rerank-queries`,
`--rerank-per-query`), each scored in one call. Contenders, alternated the same way: ours fp32 and
bf16 (`CrossEncoder.predict` on the pairs' text, through the id tokenizer: tokenisation and
packing included, as a user runs it); sentence-transformers' `CrossEncoder.predict` fp32 at its
default batch_size 32 (the reference of ratio (a), its tokenisation included too); ONNX Runtime
fp32 / bf16 and OpenVINO fp32 / bf16 on the ONNX export of the same cross-encoder (its logits),
given the token ids in length-sorted padded batches of 32 (no tokenisation in their time). Before
any round, every contender's logits on the warm-up pairs are checked against ours fp32 (fp32: max
|diff| <= 1e-3; bf16: centred cosine >= 0.99); one that disagrees is a row that says so and is
not timed. The table's parity columns compare round 1's logits on the whole workload with ours
fp32. Time: the default workloads hold 34k and 168k tokens; a round of both took about 30
minutes on the 2-core AMD EPYC of RESULTS.md (6 minutes for one query x 200, 24 for 64 x 16, all
six contenders), so five rounds take two and a half hours: `--rerank-docs`, `--rerank-queries`
scale them down (the length distribution kept), and the table names the shapes run.

Time: with 32 mixed documents, 4 x 512, 1 x 4096 and 1 x 8192 tokens, 5 rounds, the run took 66
minutes on a 2-core AMD EPYC shared with other work (1-minute load average 2-4.5 throughout);
RESULTS.md gives the time of the run recorded there with the defaults.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as h  # noqa: E402
from harness import onnx_peers, rerank, rounds_report  # noqa: E402
from harness.rounds import Contender, RoundGoal, RoundsRun  # noqa: E402
from modernbert_embed.config import ModernBertConfig  # noqa: E402

REFERENCE = "transformers-fp32"
CORPORA = ("mixed", "fixed", "long", "longer")
# The rerank workloads (issue: the ModernBERT family, item 6): one query and many documents, and
# many queries with a few documents each; their shapes come from --rerank-docs and
# --rerank-queries x --rerank-per-query (the table names the shape run).
RERANK = ("rerank-one", "rerank-many")
RERANK_REFERENCE = "sentence-transformers-fp32"  # what ratio (a) of the rerank rows is against
RERANK_PARITY = "ours-fp32"  # what every contender's scores are checked against, before timing
RERANK_BATCH = 32  # the peers' padded batch (sentence-transformers' default batch_size)
RERANK_CONTENDERS = ("ours-fp32", "ours-bf16", "sentence-transformers-fp32", "onnxruntime-fp32", "onnxruntime-bf16",
                     "openvino-fp32", "openvino-bf16")
# Padded peers' batch size per corpus: 32, as their users run them; one document per batch on the
# long corpora, where the exported graph's attention scores (heads x L^2) dominate the memory.
PEER_BATCH = {"mixed": 32, "fixed": 32, "long": 1, "longer": 1}
_MEMORY = ("the exported graph materialises the attention scores (heads x L^2): one 4,096-token document took "
           "+4.0 GB in ONNX Runtime, +7.1 GB in OpenVINO f32, +3.5 GB in bf16, kept after the call (measured); "
           "8,192 tokens need four times that (--everywhere runs it)")
_MEMORY_4K = ("memory: beside OpenVINO f32 and bf16 (+10.6 GB kept after a 4,096-token document), ONNX Runtime's "
              "arena (+4.0 GB) leaves a 24 GiB machine too little; OpenVINO f32 is the faster fp32 runtime there "
              "(171 vs 106 tokens/s on one 4,096-token document, each measured alone) "
              "(--everywhere runs it)")
_TIME = "left out to keep the run within its time budget; no goal reads it (--everywhere runs it)"
# Where each contender runs by default (corpora, why not elsewhere); --everywhere: on every corpus.
PLAN = {
    "ours-fp32": (None, ""), "ours-bf16": (None, ""), "transformers-fp32": (None, ""),
    "onnxruntime-fp32": (("mixed", "fixed"), _MEMORY_4K),
    "onnxruntime-bf16": (("mixed", "fixed", "long"), _MEMORY),
    "openvino-fp32": (("mixed", "fixed", "long"), _MEMORY), "openvino-bf16": (("mixed", "fixed", "long"), _MEMORY),
    "transformers-bf16": (("mixed", "fixed"), _TIME),
    "sentence-transformers-fp32": (("mixed",), "transformers plus its tokenisation: the mixed corpus says it"),
    "ours-int8": (("mixed",), "the int8 rows (issue 11, part 4) are measured on the mixed corpus"),
    "onnxruntime-int8": (("mixed",), "the int8 rows (issue 11, part 4) are measured on the mixed corpus"),
    "openvino-int8": (("mixed",), "the int8 rows (issue 11, part 4) are measured on the mixed corpus"),
}
GOALS = [
    RoundGoal("ours fp32 >= 1.5x the best CPU runtime in fp32, mixed", "ours-fp32", "vs_runtime", 1.5, ("mixed",)),
    RoundGoal("ours bf16 >= 1.5x the best CPU runtime in bf16, mixed", "ours-bf16", "vs_runtime", 1.5, ("mixed",)),
    RoundGoal("ours fp32 >= 2x transformers fp32, long (4k)", "ours-fp32", "vs_reference", 2.0, ("long",)),
    RoundGoal("ours bf16 >= 70% of the bf16 matmul rate, fixed 512", "ours-bf16", "mfu", 0.70, ("fixed",)),
    RoundGoal("parity: ours fp32 max abs <= 1e-4 vs transformers fp32 (pooled, L2-normalised embeddings; "
              "worst corpus)", "ours-fp32", "max_abs", 1e-4),
    RoundGoal("parity: ours bf16 min cosine >= 0.999 vs transformers fp32 (worst corpus)", "ours-bf16", "min_cos",
              0.999),
    RoundGoal("optional int8: ours int8 min cosine >= 0.995 vs transformers fp32, mixed (to be offered)",
              "ours-int8", "min_cos", 0.995, ("mixed",)),
    RoundGoal("optional int8: ours int8 faster than the best int8 runtime, mixed", "ours-int8", "vs_runtime", 1.0,
              ("mixed",)),
]

RERANK_GOALS = [goal for role, shape in (("rerank-one", "1 query"), ("rerank-many", "many queries")) for goal in (
    RoundGoal(f"rerank, {shape}: ours fp32 >= 2x sentence-transformers CrossEncoder fp32", "ours-fp32",
              "vs_reference", 2.0, (role,)),
    RoundGoal(f"rerank, {shape}: ours fp32 >= 1.5x the best CPU runtime in fp32", "ours-fp32", "vs_runtime", 1.5,
              (role,)),
    RoundGoal(f"rerank, {shape}: ours bf16 >= 1.5x the best CPU runtime in bf16", "ours-bf16", "vs_runtime", 1.5,
              (role,)),
)] + [
    RoundGoal("rerank parity: sentence-transformers fp32 logits max abs <= 1e-4 vs ours fp32 (worst workload)",
              "sentence-transformers-fp32", "max_abs", 1e-4),
    RoundGoal("rerank parity: ours bf16 centred cosine of the logits >= 0.999 vs ours fp32 (worst workload)",
              "ours-bf16", "min_cos", 0.999),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="a dry run: small model, tiny corpora, 2 rounds (the suite's test)")
    p.add_argument("--config", choices=("base", "small"), default=None,
                   help="model shape (default: base; --quick: small)")
    p.add_argument("--rounds", type=int, default=None, help="rounds per corpus (default 5; --quick: 2)")
    p.add_argument("--corpora", nargs="+", choices=CORPORA + RERANK, default=None,
                   help="the corpora and rerank workloads to run (default: all, or those of --only)")
    p.add_argument("--only", choices=("embed", "rerank"), default=None,
                   help="only the embedding corpora, or only the rerank workloads")
    contenders = list(dict.fromkeys(list(PLAN) + list(RERANK_CONTENDERS)))
    p.add_argument("--contenders", nargs="+", choices=contenders, default=contenders,
                   help="the contenders to run (each table keeps those it has)")
    p.add_argument("--everywhere", action="store_true", help="every contender on every corpus (not the default plan)")
    p.add_argument("--mixed-docs", type=int, default=None, help="documents of the mixed corpus (default 96)")
    p.add_argument("--fixed-docs", type=int, default=None, help="512-token documents (default 4)")
    p.add_argument("--long-len", type=int, default=None, help="tokens per long document (default 4096)")
    p.add_argument("--long-docs", type=int, default=None, help="long documents (default 2)")
    p.add_argument("--longer-len", type=int, default=None, help="tokens per longer document (default 8192)")
    p.add_argument("--longer-docs", type=int, default=None, help="longer documents (default 1)")
    p.add_argument("--rerank-docs", type=int, default=None, help="documents of the one query (default 200)")
    p.add_argument("--rerank-queries", type=int, default=None, help="queries of the many-queries workload (default 64)")
    p.add_argument("--rerank-per-query", type=int, default=None, help="documents per query there (default 16)")
    p.add_argument("--rerank-median", type=int, default=None,
                   help="median tokens of a pair, [CLS] query [SEP] document [SEP] (default 120; cap 512)")
    p.add_argument("--threads", type=int, default=None, help="torch and runtime threads (default: torch's choice)")
    p.add_argument("--matmul-n", type=int, default=None, help="size of the peak matmul (default 2048)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="a folder for the random checkpoint and its ONNX exports (kept and reused across runs)")
    p.add_argument("--rerank-checkpoint", type=Path, default=None,
                   help="a folder for the random cross-encoder and its ONNX exports (kept and reused across runs)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, the corpora and the round orders")
    h.add_output_args(p, append=False)
    args = p.parse_args(argv)
    quick = args.quick
    defaults = {"config": "small" if quick else "base", "rounds": 2 if quick else 5,
                "mixed_docs": 8 if quick else 96, "fixed_docs": 1 if quick else 4,
                "long_len": 384 if quick else 4096, "long_docs": 1 if quick else 2,
                "longer_len": 768 if quick else 8192, "longer_docs": 1, "matmul_n": 512 if quick else 2048,
                "rerank_docs": 12 if quick else 200, "rerank_queries": 3 if quick else 64,
                "rerank_per_query": 4 if quick else 16, "rerank_median": 60 if quick else 120}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.corpora is None:
        args.corpora = list({"embed": CORPORA, "rerank": RERANK, None: CORPORA + RERANK}[args.only])
    elif args.only:
        args.corpora = [c for c in args.corpora if c in {"embed": CORPORA, "rerank": RERANK}[args.only]]
        if not args.corpora:
            p.error(f"--only {args.only} leaves none of the --corpora given")
    for name in ("rerank_docs", "rerank_queries", "rerank_per_query", "rerank_median"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if not quick and args.rounds < 5:
        print(f"bench_cpu: note: {args.rounds} rounds; the issue's benchmark asks for at least 5", file=sys.stderr)
    return args


def build_corpora(args, cfg: ModernBertConfig) -> dict[str, h.Corpus]:
    vocab = h.Vocab.of(cfg)
    made = {
        "mixed": lambda: h.mixed_corpus(vocab, 0, seed=args.seed, median=110, docs=args.mixed_docs),
        "fixed": lambda: h.fixed_corpus(vocab, 512, args.fixed_docs, seed=args.seed + 1),
        "long": lambda: h.fixed_corpus(vocab, args.long_len, args.long_docs, seed=args.seed + 2,
                                       name=f"long{_k(args.long_len)}"),
        "longer": lambda: h.fixed_corpus(vocab, args.longer_len, args.longer_docs, seed=args.seed + 3,
                                         name=f"long{_k(args.longer_len)}"),
    }
    return {role: made[role]() for role in CORPORA if role in args.corpora}


def _k(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def build_contenders(args, folder: Path, work: Path, cfg: ModernBertConfig, threads: int) -> list[Contender]:
    pad = cfg.pad_token_id
    cpu = torch.device("cpu")
    def ort(dtype):
        return lambda role: onnx_peers.ort_engine(folder, dtype, pad, threads, PEER_BATCH[role])

    def openvino(dtype):
        return lambda role: onnx_peers.openvino_engine(folder, dtype, pad, threads, PEER_BATCH[role])

    def transformers(dtype):
        return lambda role: h.Transformers(folder, cpu, dtype, batch_size=PEER_BATCH[role])

    factories = {
        "ours-fp32": ("ours", "fp32", "ours", lambda role: h.Ours(folder, cpu, torch.float32)),
        "ours-bf16": ("ours", "bf16", "ours", lambda role: h.Ours(folder, cpu, torch.bfloat16)),
        "transformers-fp32": ("transformers", "fp32", "reference", transformers(torch.float32)),
        "transformers-bf16": ("transformers", "bf16", "other", transformers(torch.bfloat16)),
        "onnxruntime-fp32": ("onnxruntime", "fp32", "runtime", ort("fp32")),
        "onnxruntime-bf16": ("onnxruntime", "bf16", "runtime", ort("bf16")),
        "openvino-fp32": ("openvino", "fp32", "runtime", openvino("fp32")),
        "openvino-bf16": ("openvino", "bf16", "runtime", openvino("bf16")),
        "sentence-transformers-fp32": ("sentence-transformers", "fp32", "other",
                                       lambda role: h.SentenceTransformers(folder, cpu, torch.float32, PEER_BATCH[role],
                                                                           work_dir=work / "st")),
        "ours-int8": ("ours", "int8", "ours", lambda role: h.Ours(folder, cpu, torch.float32, int8_weights=True)),
        "onnxruntime-int8": ("onnxruntime", "int8", "runtime", ort("int8")),
        "openvino-int8": ("openvino", "int8", "runtime", openvino("int8")),
    }
    out = []
    for key, (corpora, why_not) in PLAN.items():
        if key in args.contenders:
            name, dtype, kind, factory = factories[key]
            out.append(Contender(key, name, dtype, kind, factory, None if args.everywhere else corpora,
                                 "" if args.everywhere else why_not))
    return out


def build_rerank(args, work: Path, threads: int) -> tuple[Path, ModernBertConfig, dict[str, h.Corpus],
                                                               list[Contender]]:
    """The random cross-encoder (the embedder's shape with a one-label head), its workloads and
    contenders."""
    folder = args.rerank_checkpoint or work / "cross-encoder"
    if not (folder / "config.json").is_file():
        rerank.write_cross_encoder(folder, args.config, seed=args.seed)
    cfg = ModernBertConfig.from_file(folder / "config.json")
    vocab = h.Vocab.of(cfg)
    made = {
        "rerank-one": lambda: rerank.rerank_corpus(vocab, 1, args.rerank_docs, seed=args.seed + 11,
                                                   median=args.rerank_median),
        "rerank-many": lambda: rerank.rerank_corpus(vocab, args.rerank_queries, args.rerank_per_query,
                                                    seed=args.seed + 12, median=args.rerank_median),
    }
    corpora = {role: made[role]() for role in RERANK if role in args.corpora}
    factories = rerank.factories(folder, rerank.text_folder(folder, work / "cross-encoder-text"), cfg.pad_token_id,
                                 threads, RERANK_BATCH)
    contenders = [Contender(key, *factories[key]) for key in RERANK_CONTENDERS if key in args.contenders]
    return folder, cfg, corpora, contenders


def run_rerank(args, work: Path, threads: int, out: Path | None) -> tuple[rounds_report.RoundsResults, list[str]]:
    """The rerank rows: their own rounds, table and goals (the reference is sentence-transformers'
    CrossEncoder, parity is against ours fp32)."""
    folder, cfg, corpora, contenders = build_rerank(args, work, threads)
    settings = _settings(args, threads, reference=RERANK_REFERENCE, parity=RERANK_PARITY,
                         peer_batch={role: RERANK_BATCH for role in corpora},
                         check_before_timing={"fp32_max_abs": rerank.CHECK_FP32_MAX_ABS,
                                              "other_min_centred_cos": rerank.CHECK_HALF_MIN_COS})
    run = rerank.ScoresRun(contenders, corpora, cfg, rounds=args.rounds, seed=args.seed,
                           warmup_tokens=256 if args.quick else 768, matmul_n=args.matmul_n,
                           reference=RERANK_REFERENCE, parity=RERANK_PARITY)
    results = rounds_report.RoundsResults("bench_cpu rerank", run, RERANK_GOALS, settings, out, args.markdown)
    _run_rounds(results, folder, contenders, threads, "workloads: " + "; ".join(
        f"{c.name} {c.num_docs} pairs {c.num_tokens} tokens (median pair {c.summary()['median_len']:.0f})"
        for c in corpora.values()))
    return results, _broken(run, contenders, corpora)


def _settings(args, threads: int, **extra) -> dict:
    """The run's settings as recorded: the arguments, the threads, ours' batch budget and `extra`."""
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    return {**settings, "threads": threads, "ours_max_batch_tokens": "library default", **extra}


def _run_rounds(results: rounds_report.RoundsResults, folder: Path, contenders: list[Contender], threads: int,
                corpora_line: str) -> None:
    """Every corpus of `results.run`, round by round, the record saved after each round (a cut keeps
    what it measured) and each corpus, the ONNX export first; the tables and goals printed last."""
    run = results.run
    run.after_round = lambda role, r: results.save()
    print(f"{results.script}: {h.machine_line(results.info)}; {threads} threads")
    print(corpora_line)
    _export(folder, contenders, results.settings)
    for role in run.corpora:
        run.run_corpus(role)
        results.save()
    print()
    print(results.finish())


def _export(folder: Path, contenders: list[Contender], settings: dict) -> None:
    """The fp32 ONNX export the runtimes load, made (and timed) before any round."""
    if any(c.name in ("onnxruntime", "openvino") for c in contenders):
        t0 = time.perf_counter()
        path = onnx_peers.onnx_paths(folder)["fp32"]
        path.parent.mkdir(exist_ok=True)
        onnx_peers.export_onnx(folder, path)
        settings["onnx_export_s"] = round(time.perf_counter() - t0, 1)
        print(f"ONNX export: {settings['onnx_export_s']} s")


def _broken(run: RoundsRun, contenders: list[Contender], corpora) -> list[str]:
    """Our contenders that failed somewhere (the run's exit status)."""
    broken = [c.key for c in contenders if c.kind == "ours" and c.error]
    broken += [f"{c.key} on {role}" for role in corpora for c in contenders
               if c.kind == "ours" and run.cells[role].get(c.key) and run.cells[role][c.key].error]
    return broken


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = onnx_peers.default_threads()
    try:  # a progress bar per model load would bury the rounds' lines
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    broken: list[str] = []
    embed_roles = [r for r in args.corpora if r in CORPORA]
    rerank_out = args.out
    if embed_roles and args.out is not None:  # both tables: the rerank record beside the embedding one
        rerank_out = args.out.with_name(args.out.stem + "_rerank" + args.out.suffix)
    with tempfile.TemporaryDirectory(prefix="mbe-bench-") as tmp:
        if embed_roles:
            folder = args.checkpoint or Path(tmp) / "checkpoint"
            if not (folder / "config.json").is_file():
                h.write_checkpoint(folder, args.config, seed=args.seed)
            cfg = ModernBertConfig.from_file(folder / "config.json")
            corpora = build_corpora(args, cfg)
            contenders = build_contenders(args, folder, Path(tmp), cfg, threads)
            settings = _settings(args, threads, reference=REFERENCE, peer_batch=PEER_BATCH)
            run = RoundsRun(contenders, corpora, cfg, rounds=args.rounds, seed=args.seed,
                            warmup_tokens=128 if args.quick else 512, matmul_n=args.matmul_n, reference=REFERENCE)
            results = rounds_report.RoundsResults("bench_cpu", run, GOALS, settings, args.out, args.markdown)
            _run_rounds(results, folder, contenders, threads, "corpora: " + "; ".join(
                f"{c.name} {c.num_docs} docs {c.num_tokens} tokens" for c in corpora.values()))
            broken += _broken(run, contenders, corpora)
        if any(r in RERANK for r in args.corpora):
            broken += run_rerank(args, Path(tmp), threads, rerank_out)[1]
    if broken:
        print(f"bench_cpu: our engine failed: {', '.join(broken)}", file=sys.stderr)
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
