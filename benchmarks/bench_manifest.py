"""Does recording a shard cost the same at the end of a large corpus as at its start?

Embeds a corpus of one-row shards (2,000 by default) with a tiny random checkpoint on the CPU
through `CorpusJob`, and times every shard two ways:
  per shard: from one shard's record to the next (`CorpusJob(on_shard=...)`): the whole pipeline;
  record:    `Manifest.add_shard` alone (the journal append and its fsync).
It prints the medians over the first and the last 10% of the shards and their ratio; the goal is a
ratio within 2x (the folder's bookkeeping must not grow with the shards already written).

`--rewrite-manifest` also runs the corpus the way manifest format 1 did, rewriting the whole
manifest.json after every shard (a `Manifest.save` per shard), to show what the journal removes.

    python benchmarks/bench_manifest.py                    # 2,000 shards, ~1-2 minutes on 2 cores
    python benchmarks/bench_manifest.py --shards 500 --rewrite-manifest
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


from bench_cli import tokenizer_json  # noqa: E402  (the real tokenizer, kept with the tests)

# The smallest ModernBERT that still has a global and a local layer: the model's time per shard is
# small, so that the folder's bookkeeping shows.
TINY_CONFIG = {
    "model_type": "modernbert", "architectures": ["ModernBertModel"], "vocab_size": 50368,
    "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 2,
    "global_attn_every_n_layers": 2, "local_attention": 64, "global_rope_theta": 160000.0,
    "local_rope_theta": 10000.0, "norm_eps": 1e-5, "max_position_embeddings": 512,
    "hidden_activation": "gelu", "attention_bias": False, "mlp_bias": False, "norm_bias": False,
    "pad_token_id": 50283, "cls_token_id": 50281, "sep_token_id": 50282, "bos_token_id": 50281,
    "eos_token_id": 50282,
}


def run_corpus(model, corpus: Path, out: Path, shards: int, rewrite: bool) -> dict:
    from modernbert_embed.corpus import CorpusJob, EmbedOptions, Manifest

    stamps: list[float] = []
    records: list[float] = []
    real_add = Manifest.add_shard

    def add_shard(self, entry):
        t = time.perf_counter()
        real_add(self, entry)
        if rewrite:
            self.save()
        records.append(time.perf_counter() - t)

    Manifest.add_shard = add_shard
    try:
        opts = EmbedOptions([str(corpus)], str(out), shard_size=1, progress=False, quiet=True, meta_format="jsonl")
        t0 = time.perf_counter()
        CorpusJob(opts, embedder=model, on_shard=lambda entry: stamps.append(time.perf_counter())).run()
        seconds = time.perf_counter() - t0
    finally:
        Manifest.add_shard = real_add
    per_shard = [b - a for a, b in zip(stamps, stamps[1:])]
    k = max(1, shards // 10)
    first, last = statistics.median(per_shard[:k]), statistics.median(per_shard[-k:])
    rec_first, rec_last = statistics.median(records[:k]), statistics.median(records[-k:])
    return {"mode": "rewrite manifest per shard" if rewrite else "journal", "shards": shards,
            "seconds": seconds, "per_shard_first_ms": first * 1e3, "per_shard_last_ms": last * 1e3,
            "per_shard_ratio": last / first, "record_first_ms": rec_first * 1e3, "record_last_ms": rec_last * 1e3,
            "record_ratio": rec_last / rec_first, "manifest_bytes": (out / "manifest.json").stat().st_size}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", type=int, default=2000)
    p.add_argument("--rewrite-manifest", action="store_true",
                   help="also run with a whole-manifest rewrite per shard (format 1's cost), for comparison")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)

    import torch

    from modernbert_embed import Embedder
    from modernbert_embed.weights import write_random_checkpoint

    torch.set_num_threads(1)  # a tiny model runs steadiest on one thread
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-manifest-") as tmp:
        tmp = Path(tmp)
        ckpt = write_random_checkpoint(tmp / "ckpt", TINY_CONFIG, seed=0, tokenizer_json=tokenizer_json(),
                                       max_seq_length=64)
        model = Embedder.from_pretrained(ckpt, device="cpu")
        corpus = tmp / "corpus.txt"
        corpus.write_text("".join(f"document number {i} of the corpus\n" for i in range(args.shards)))
        print(f"{args.shards} one-row shards, a tiny random model (hidden 64, 2 layers) on the CPU, 1 thread; "
              f"torch {torch.__version__}, {os.cpu_count()} cpus", flush=True)
        modes = [False, True] if args.rewrite_manifest else [False]
        for rewrite in modes:
            r = run_corpus(model, corpus, tmp / f"out-{int(rewrite)}", args.shards, rewrite)
            results.append(r)
            verdict = "within 2x" if r["per_shard_ratio"] <= 2 else "MORE THAN 2x"
            print(f"  {r['mode']}: {r['seconds']:.1f} s; per shard {r['per_shard_first_ms']:.2f} ms (first 10%) "
                  f"-> {r['per_shard_last_ms']:.2f} ms (last 10%), ratio {r['per_shard_ratio']:.2f} ({verdict}); "
                  f"recording a shard {r['record_first_ms']:.2f} -> {r['record_last_ms']:.2f} ms, ratio "
                  f"{r['record_ratio']:.2f}; manifest.json at the end {r['manifest_bytes'] / 1e3:.0f} kB",
                  flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0 if results[0]["per_shard_ratio"] <= 2 else 1


if __name__ == "__main__":
    sys.exit(main())
