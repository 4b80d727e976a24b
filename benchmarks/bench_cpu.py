"""CPU throughput: our engine against transformers and sentence-transformers on the same random
full-size weights and the same token ids.

    python benchmarks/bench_cpu.py                    # ~7 minutes on 2 idle cores
    python benchmarks/bench_cpu.py --quick            # a short smoke run (about a minute)
    python benchmarks/bench_cpu.py --config small --quick --out /tmp/x.json   # seconds

Rows: transformers fp32 (SDPA, padded batches of 32 sorted by length; the baseline of every
ratio), transformers bf16, sentence-transformers fp32 (mixed corpus only: it is transformers plus
tokenisation), ours fp32 and bf16. Corpora: "mixed" (log-normal lengths, median ~100, up to 512)
and "long" (a few ~4k-token documents). Goals, as ratios to transformers fp32: ours fp32 mixed
>= 2x, ours bf16 mixed >= 3.5x, ours fp32 long >= 1.5x. MFU is over a large matmul measured on
this CPU in the same dtype.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as h  # noqa: E402
from modernbert_embed.config import ModernBertConfig  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=("base", "small"), default="base",
                   help="model shape: the full base model (default) or a small one for smoke runs")
    p.add_argument("--quick", action="store_true", help="a short smoke run: small corpora, one repeat")
    p.add_argument("--mixed-tokens", type=int, default=None, help="tokens in the mixed corpus (default 8000)")
    p.add_argument("--long-len", type=int, default=4096, help="tokens per long document (default 4096)")
    p.add_argument("--long-docs", type=int, default=None, help="long documents (default 2)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats on the mixed corpus (default 2)")
    p.add_argument("--long-repeats", type=int, default=None, help="timed repeats on the long corpus (default 1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--no-st", action="store_true", help="leave out sentence-transformers")
    p.add_argument("--no-hf-bf16", action="store_true", help="leave out transformers bf16")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="a folder to write the random checkpoint to (default: a temporary folder)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    h.add_output_args(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    mixed_tokens = args.mixed_tokens or (600 if args.quick else 8000)
    long_len = min(args.long_len, 1024) if args.quick else args.long_len
    long_docs = args.long_docs or (1 if args.quick else 2)
    repeats = {"mixed": args.repeats or (1 if args.quick else 2),
               "long": args.long_repeats or 1}
    # Warm up on a slice: on CPU a first call only pays one-off set-up, and a full extra pass of
    # the slow peers would double the run time.
    warmup_tokens = {"mixed": 256, "long": 256}

    with tempfile.TemporaryDirectory(prefix="mbe-bench-") as tmp:
        folder = args.checkpoint or Path(tmp) / "checkpoint"
        if not (folder / "config.json").is_file():
            h.write_checkpoint(folder, args.config, seed=args.seed)
        cfg = ModernBertConfig.from_file(folder / "config.json")
        vocab = h.Vocab.of(cfg)
        corpora = {
            "mixed": h.mixed_corpus(vocab, mixed_tokens, seed=0),
            "long": h.long_corpus(vocab, long_len, long_docs, seed=2),
        }
        settings = {"config": args.config, "quick": args.quick, "repeats": repeats,
                    "warmup_tokens": warmup_tokens, "seed": args.seed,
                    "transformers_batch_size": 32, "ours_max_batch_tokens": "library default"}
        results = h.Results("bench_cpu", device, settings, args.out, args.append, args.markdown)
        results.corpora = [c.summary() for c in corpora.values()]
        n = 512 if args.config == "small" else 2048
        results.peaks = {"fp32": h.matmul_tflops(device, torch.float32, n, repeats=5),
                         "bf16": h.matmul_tflops(device, torch.bfloat16, n, repeats=5)}
        results.settings["matmul_n"] = n
        print(f"bench_cpu: {h.machine_line(results.info)}")
        print("corpora: " + "; ".join(f"{c['name']} {c['docs']} docs {c['tokens']} tokens" for c in results.corpora))
        print("matmul peaks (TFLOP/s): " + ", ".join(f"{k} {v:.3g}" for k, v in results.peaks.items()))

        both = ["mixed", "long"]
        specs = [
            h.Spec("transformers", "fp32", "sdpa, batch 32",
                   lambda: h.Transformers(folder, device, torch.float32), both, baseline=True),
            h.Spec("ours", "fp32", "default", lambda: h.Ours(folder, device, torch.float32), both),
            h.Spec("ours", "bf16", "default", lambda: h.Ours(folder, device, torch.bfloat16), both),
        ]
        if not args.no_hf_bf16:
            specs.append(h.Spec("transformers", "bf16", "sdpa, batch 32",
                                lambda: h.Transformers(folder, device, torch.bfloat16), ["mixed"]))
        if not args.no_st:
            specs.append(h.Spec("sentence-transformers", "fp32", "batch 32",
                                lambda: h.SentenceTransformers(folder, device, torch.float32,
                                                               work_dir=Path(tmp) / "st"), ["mixed"]))
        goals = [
            h.Goal("ours", "fp32", "default", "mixed", "ratio", 2.0),
            h.Goal("ours", "bf16", "default", "mixed", "ratio", 3.5),
            h.Goal("ours", "fp32", "default", "long", "ratio", 1.5),
        ]
        h.run_plan(results, specs, corpora, cfg, device, warmup=1, repeats=repeats, goals=goals,
                   warmup_tokens=warmup_tokens)
        print()
        print(results.finish())
    failed = [r for r in results.rows if r.error and r.engine == "ours"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
