"""GPU throughput: our engine (per dtype and attention backend) against transformers and
sentence-transformers on the same random full-size weights and the same token ids.

    python benchmarks/bench_gpu.py --out bench_gpu.json             # ~3 minutes on an H100
    python benchmarks/bench_gpu.py --device cpu --config small --quick   # dry run of the logic

Rows: transformers bf16 (SDPA, padded batches of 32 sorted by length, 8 for the long corpus; the
baseline of every ratio), sentence-transformers bf16, ours bf16 (default backends; attention
forced to "torch-varlen", to "triton-rope" (rotary inside the attention kernel), to
"torch-varlen-global" (torch's for global layers, ours for windowed ones) and to "triton"; a
larger token budget; text in through `encode` with the tokenisation first or beside the GPU; with
--torch-ops also the torch ops instead of the kernels) and ours fp16. Corpora: "mixed"
(log-normal lengths, median ~100, up to 512), "fixed512" and "long" (~8k-token documents). Goals: ours bf16 >= 3x transformers on mixed, >= 1M tokens/s at
fixed 512, long-document rate >= 0.5x the 512 rate. MFU over the card's dense bf16 peak (known
cards) and over a large bf16 matmul measured in the same run. A row that fails (a backend that
is missing, an out-of-memory) is recorded with its error; the run goes on, and past
`--time-budget` seconds the remaining rows are recorded as skipped.

Rerank and classify rows (issue: the ModernBERT family, item 6): a random cross-encoder (the base
shape with a one-label head, mean pooling: gte-reranker-modernbert-base's layout) on the rerank
workloads "rerank1x200" (one query, 200 documents, pair lengths log-normal, median ~120, cap 512)
and "rerank64x16"; a three-label classifier (CLS pooling) on single texts ("classify", the mixed
corpus's lengths). Ours: the `CrossEncoder`'s engine on token ids (`engine.score`, packed, bf16);
the baseline of each: transformers' `ModernBertForSequenceClassification` bf16 on length-sorted
padded batches of 32. The "min cos" column of a one-label row is the centred cosine of the two
score vectors (bf16 parity against transformers fp32 is in parity_gpu.py's cross-encoder cases).

Predictions for those rows, written before any GPU run (H100 SXM, bf16; `flops_per_token`):
  - FLOPs: 228.7 MFLOP per token at 120 tokens, 232.4 on average over rerank1x200 (34,132 tokens),
    232.1 over rerank64x16 (167,953 tokens); the head adds 2 x H^2 per pair (1.2 MFLOP), nothing.
  - rerank1x200 is one call of 34k tokens: about 7.9 TFLOP, ~13 ms of matmuls at 600 TFLOP/s,
    ~7 ms of memory-bound ops (558 KB per token at ~2.8 TB/s), and a few ms of planning, packing
    and launches for 3 forwards of <=16k tokens: 25-30 ms, i.e. 1.1-1.4 M tokens/s (MFU 25-33%).
    transformers: 7 padded batches (1.23 x the real tokens, computed from the lengths), each an
    eager forward of several hundred launches (host-bound at ~5k tokens per batch): 0.4-0.6 M
    tokens/s; ratio 2-3x.
  - rerank64x16, 168k tokens: the fixed costs amortise: 1.4-1.6 M tokens/s, as the embedding
    rows' mixed corpus (padding 1.04x; transformers 0.5-0.6 M tokens/s: ratio 2.5-3x).
  - classify (the mixed corpus, 200k tokens, 3 labels): the embedding "default" mixed row's rate
    within 5% (the head and CLS pooling are negligible): 1.4-1.6 M tokens/s, ~3x transformers.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as h  # noqa: E402
from harness import rerank  # noqa: E402
from modernbert_embed.config import ModernBertConfig  # noqa: E402


# In the order they run (the most telling first, in case the time budget runs out); torch-ops
# only with --torch-ops or --only.
ROW_SETS = ("default", "rerank", "classify", "attn=torch-varlen", "attn=triton-rope", "attn=torch-varlen-global", "st", "fp16", "text",
            "attn=triton", "big-budget", "torch-ops")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default), or cpu for a dry run of the logic")
    p.add_argument("--config", choices=("base", "small"), default="base")
    p.add_argument("--quick", action="store_true", help="small corpora, one repeat")
    p.add_argument("--mixed-tokens", type=int, default=None, help="tokens in the mixed corpus (default 200k)")
    p.add_argument("--fixed-docs", type=int, default=None, help="512-token documents (default 512)")
    p.add_argument("--long-len", type=int, default=None, help="tokens per long document (default 8192)")
    p.add_argument("--long-docs", type=int, default=None, help="long documents (default 16)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per row (default 3)")
    p.add_argument("--max-batch-tokens", type=int, default=None,
                   help="token budget of ours' default rows (default: the library's)")
    p.add_argument("--big-batch-tokens", type=int, default=65536, help="token budget of the 'large budget' row")
    p.add_argument("--time-budget", type=float, default=170.0,
                   help="seconds after which the remaining rows are skipped (default 170)")
    p.add_argument("--no-st", action="store_true", help="leave out sentence-transformers")
    p.add_argument("--torch-ops", action="store_true",
                   help="add ours with the torch ops instead of the kernels (slow: a loop over sequences)")
    p.add_argument("--only", nargs="*", default=None, choices=ROW_SETS,
                   help="run only these row sets (the transformers baseline always runs)")
    p.add_argument("--seed", type=int, default=0)
    h.add_output_args(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if h.cuda_missing(device, "bench_gpu"):
        return 2
    small = args.quick or device.type == "cpu"
    mixed_tokens = args.mixed_tokens or (2000 if small else 200_000)
    fixed_docs = args.fixed_docs or (4 if small else 512)
    long_len = args.long_len or (1024 if small else 8192)
    long_docs = args.long_docs or (1 if small else 16)
    reps = args.repeats or (1 if small else 3)
    repeats = {"mixed": reps, "fixed512": reps, "long": reps}

    with tempfile.TemporaryDirectory(prefix="mbe-bench-") as tmp:
        folder = Path(tmp) / "checkpoint"
        h.write_checkpoint(folder, args.config, seed=args.seed)
        cfg = ModernBertConfig.from_file(folder / "config.json")
        vocab = h.Vocab.of(cfg)
        corpora = {
            "mixed": h.mixed_corpus(vocab, mixed_tokens, seed=0),
            "fixed512": h.fixed_corpus(vocab, 512, fixed_docs, seed=1),
            "long": h.long_corpus(vocab, long_len, long_docs, seed=2),
        }
        scores = {"rerank", "classify"} & set(args.only if args.only else ROW_SETS)
        if scores:  # the cross-encoder and classifier checkpoints, and their workloads
            ce = rerank.write_cross_encoder(Path(tmp) / "cross-encoder", args.config, seed=args.seed)
            clf = rerank.write_cross_encoder(Path(tmp) / "classifier", args.config, seed=args.seed + 1,
                                             num_labels=3, pooling="cls")
            rr = [rerank.rerank_corpus(vocab, 1, 24 if small else 200, seed=11),
                  rerank.rerank_corpus(vocab, 4 if small else 64, 4 if small else 16, seed=12)]
            corpora.update({c.name: c for c in rr})
            corpora["classify"] = h.Corpus("classify", corpora["mixed"].ids,
                                           "the mixed corpus's documents, single texts")
        repeats.update({name: reps for name in corpora if name not in repeats})
        hf_long_batch = max(1, min(32, 65536 // long_len))
        settings = {"config": args.config, "quick": args.quick, "repeats": repeats, "warmup": 1,
                    "seed": args.seed, "transformers_batch_size": {"mixed": 32, "fixed512": 32, "long": hf_long_batch},
                    "ours_max_batch_tokens": args.max_batch_tokens or "library default",
                    "big_batch_tokens": args.big_batch_tokens, "time_budget_s": args.time_budget}
        results = h.Results("bench_gpu", device, settings, args.out, args.append, args.markdown)
        results.corpora = [c.summary() for c in corpora.values()]
        n = 8192 if device.type == "cuda" else 512
        results.peaks = {"nominal": h.nominal_peak_tflops(results.info.get("gpu")),
                         "bf16": h.matmul_tflops(device, torch.bfloat16, n, repeats=10 if device.type == "cuda" else 2),
                         "fp16": h.matmul_tflops(device, torch.float16, n, repeats=10 if device.type == "cuda" else 2)}
        results.settings["matmul_n"] = n
        results.save()
        print(f"bench_gpu: {h.machine_line(results.info)}")
        print("corpora: " + "; ".join(f"{c['name']} {c['docs']} docs {c['tokens']} tokens" for c in results.corpora))
        print("peaks (TFLOP/s): " + ", ".join(f"{k} {v:.4g}" for k, v in results.peaks.items() if v))

        all3 = ["mixed", "fixed512", "long"]
        mbt = args.max_batch_tokens

        def ours(dtype, backend="auto", attention="auto", max_batch_tokens=mbt):
            return lambda: h.Ours(folder, device, dtype, backend=backend, attention=attention,
                                  max_batch_tokens=max_batch_tokens)

        bf16, fp16 = torch.bfloat16, torch.float16
        specs = {
            "transformers": h.Spec("transformers", "bf16", "sdpa, batch 32", lambda: h.Transformers(folder, device, bf16),
                                   all3, encode_kwargs={"long": {"batch_size": hf_long_batch}},
                                   corpus_variant={"long": f"sdpa, batch {hf_long_batch}"}, baseline=True),
            "default": h.Spec("ours", "bf16", "default", ours(bf16), all3),
            "attn=torch-varlen": h.Spec("ours", "bf16", "attn=torch-varlen", ours(bf16, attention="torch-varlen"), all3),
            "attn=triton-rope": h.Spec("ours", "bf16", "attn=triton-rope (rotary inside attention)",
                                       ours(bf16, attention="triton-rope"), all3),
            "attn=torch-varlen-global": h.Spec("ours", "bf16", "attn=torch-varlen-global (torch's for global layers)",
                                               ours(bf16, attention="torch-varlen-global"), ["fixed512", "long"]),
            "st": h.Spec("sentence-transformers", "bf16", "batch 32",
                         lambda: h.SentenceTransformers(folder, device, bf16, work_dir=Path(tmp) / "st"),
                         ["mixed", "fixed512"]),
            "fp16": h.Spec("ours", "fp16", "default", ours(fp16), all3),
            "text": h.Spec("ours", "bf16", "text in, tokenised first",
                           lambda: h.OursText(folder, device, bf16, work_dir=Path(tmp) / "st",
                                              tokenize_chunk=10**9), ["mixed"]),
            "text-ahead": h.Spec("ours", "bf16", "text in, tokenised beside the GPU (chunks of 256)",
                                 lambda: h.OursText(folder, device, bf16, work_dir=Path(tmp) / "st",
                                                    tokenize_chunk=256), ["mixed"]),
            "attn=triton": h.Spec("ours", "bf16", "attn=triton", ours(bf16, attention="triton"), all3),
            "big-budget": h.Spec("ours", "bf16", f"max_batch_tokens={args.big_batch_tokens}",
                                 ours(bf16, max_batch_tokens=args.big_batch_tokens), ["mixed", "fixed512"]),
            "torch-ops": h.Spec("ours", "bf16", "torch ops", ours(bf16, backend="torch"), ["mixed"]),
        }
        if scores:
            names = [c.name for c in rr]
            specs.update({
                "rerank-transformers": h.Spec(
                    "transformers", "bf16", "ForSequenceClassification, sdpa, batch 32",
                    lambda: rerank.TransformersScores(ce, device, bf16), names, baseline=True),
                "rerank": h.Spec("ours", "bf16", "CrossEncoder, token ids", lambda: rerank.OursScores(ce, device, bf16),
                                 names),
                "classify-transformers": h.Spec(
                    "transformers", "bf16", "ForSequenceClassification (3 labels, cls), sdpa, batch 32",
                    lambda: rerank.TransformersScores(clf, device, bf16), ["classify"], baseline=True),
                "classify": h.Spec("ours", "bf16", "CrossEncoder (3 labels, cls), token ids",
                                   lambda: rerank.OursScores(clf, device, bf16), ["classify"]),
            })
        # specs that belong to a row set of another name
        row_set = {"text-ahead": "text", "rerank-transformers": "rerank", "classify-transformers": "classify"}
        chosen = [k for k in specs if k == "transformers" or (
            (not args.only or row_set.get(k, k) in args.only) and not (k == "st" and args.no_st)
            and not (k == "torch-ops" and not args.torch_ops and not args.only))]
        chosen.sort(key=lambda k: -1 if k == "transformers" else ROW_SETS.index(row_set.get(k, k)))  # ROW_SETS order
        specs = [specs[k] for k in chosen]
        goals = [
            h.Goal("ours", "bf16", "default", "mixed", "ratio", 3.0),
            h.Goal("ours", "bf16", "default", "fixed512", "rate", 1e6),
            h.Goal("ours", "bf16", "default", "long", "vs_corpus", 0.5, other_corpus="fixed512"),
        ]
        h.run_plan(results, specs, corpora, cfg, device, warmup=1, repeats=repeats, goals=goals,
                   time_budget=args.time_budget)
        print()
        print(results.finish())
    failed = [r for r in results.rows if r.error and r.engine == "ours" and r.variant == "default"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
