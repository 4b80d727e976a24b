"""Does the corpus command keep up with `Embedder.encode`? (I/O must not be the bottleneck.)

On a generated corpus (JSON Lines, mixed lengths), in fresh processes, alternating:
  encode: load the model, read the texts, time `Embedder.encode(texts, prompt_name=...)`;
  command: `python -m modernbert_embed embed corpus.jsonl -o OUT ...`, its own summary line
           (reading, parsing, tokenising, embedding, quantising and writing shards: everything
           but loading the model and the counting pass), and its whole wall time.
Best of --repeats for each; the command's documents/s should be within 10% of encode's.

    python benchmarks/bench_cli.py                      # random checkpoint, CPU, ~2 minutes on 2 cores
    python benchmarks/bench_cli.py --model PATH --docs 20000 --device cuda

Without --model it writes a random-weight checkpoint (a small ModernBERT with the real tokenizer,
kept with the tests, or from the HF cache) to a temporary folder: the numbers measure the engine,
the embeddings mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The real config and tokenizer, kept with the tests (harness.FIXTURES; this script runs without the harness).
FIXTURES = Path(os.environ.get("MODERNBERT_EMBED_FIXTURES", ROOT / "tests" / "data" / "modernbert-embed-base"))
BENCH_CONFIG = {
    "model_type": "modernbert", "architectures": ["ModernBertModel"], "vocab_size": 50368,
    "hidden_size": 256, "intermediate_size": 384, "num_hidden_layers": 6, "num_attention_heads": 4,
    "global_attn_every_n_layers": 3, "local_attention": 128, "global_rope_theta": 160000.0,
    "local_rope_theta": 10000.0, "norm_eps": 1e-5, "max_position_embeddings": 8192,
    "hidden_activation": "gelu", "attention_bias": False, "mlp_bias": False, "norm_bias": False,
    "pad_token_id": 50283, "cls_token_id": 50281, "sep_token_id": 50282, "bos_token_id": 50281,
    "eos_token_id": 50282,
}
WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which "
         "but have an they you were her she there all one their had been has more would when if its "
         "embedding corpus retrieval document search query vector model token window attention sparse "
         "dense index shard manifest resume kernel throughput latency benchmark encoder transformer").split()

ENCODE = r"""
import json, sys, time
from modernbert_embed import Embedder
model, corpus, prompt_name, device, mbt = sys.argv[1:6]
m = Embedder.from_pretrained(model, device=device or None)
texts = [json.loads(line)["text"] for line in open(corpus, encoding="utf-8")]
if m.device.type == "cuda":
    import torch; torch.cuda.synchronize()
t0 = time.perf_counter()
emb = m.encode(texts, prompt_name=prompt_name or None, max_batch_tokens=int(mbt))
if m.device.type == "cuda":
    torch.cuda.synchronize()
dt = time.perf_counter() - t0
print(json.dumps({"documents": len(texts), "seconds": dt, "shape": list(emb.shape), "device": str(m.device)}))
"""


def tokenizer_json() -> Path:
    if (FIXTURES / "tokenizer.json").is_file():
        return FIXTURES / "tokenizer.json"
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download("nomic-ai/modernbert-embed-base", "tokenizer.json", local_files_only=True))
    except Exception:
        sys.exit(f"needs the real tokenizer.json: none in {FIXTURES} nor in the HF cache")


def write_corpus(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            k = min(400, max(3, int(rng.lognormvariate(3.6, 0.8))))  # median ~37 words, a long tail
            f.write(json.dumps({"id": f"doc-{i}", "text": " ".join(rng.choices(WORDS, k=k))}) + "\n")


def run_encode(args, model, corpus) -> dict:
    r = subprocess.run([sys.executable, "-c", ENCODE, str(model), str(corpus), args.prompt_name or "",
                        args.device or "", str(args.max_batch_tokens)],
                       capture_output=True, text=True, cwd=ROOT)
    if r.returncode:
        sys.exit(f"encode run failed:\n{r.stderr}")
    d = json.loads(r.stdout.strip().splitlines()[-1])
    d["docs_per_s"] = d["documents"] / d["seconds"]
    return d


def run_command(args, model, corpus, out: Path) -> dict:
    cmd = [sys.executable, "-m", "modernbert_embed", "embed", str(corpus), "-o", str(out), "--model", str(model),
           "--shard-size", str(args.shard_size), "--max-batch-tokens", str(args.max_batch_tokens),
           "--precision", args.precision, "--no-progress"]
    if args.prompt_name:
        cmd += ["--prompt-name", args.prompt_name]
    if args.device:
        cmd += ["--device", args.device]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if r.returncode:
        sys.exit(f"command failed:\n{r.stderr}")
    summary = r.stdout.strip().splitlines()[-1]
    run = json.loads((out / "manifest.json").read_text())["runs"][-1]
    return {"summary": summary, "documents": run["documents"], "seconds": run["seconds"],
            "docs_per_s": run["documents_per_s"], "tokens_per_s": run["tokens_per_s"], "wall": wall,
            "load_seconds": run["load_seconds"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="checkpoint folder or Hub id (default: a random one)")
    p.add_argument("--docs", type=int, default=3000)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--max-batch-tokens", type=int, default=16384)
    p.add_argument("--precision", default="float32")
    p.add_argument("--prompt-name", default="search_document")
    p.add_argument("--device", default=None)
    p.add_argument("--max-seq-length", type=int, default=512, help="of the random checkpoint")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-cli-") as tmp:
        tmp = Path(tmp)
        model = args.model
        if model is None:
            from modernbert_embed.weights import write_random_checkpoint

            model = write_random_checkpoint(tmp / "ckpt", BENCH_CONFIG, seed=0, tokenizer_json=tokenizer_json(),
                                            max_seq_length=args.max_seq_length)
        corpus = tmp / "corpus.jsonl"
        write_corpus(corpus, args.docs)
        size = corpus.stat().st_size
        print(f"corpus: {args.docs} documents, {size / 1e6:.1f} MB JSON Lines; model: "
              f"{'random ' + json.dumps({k: BENCH_CONFIG[k] for k in ('hidden_size', 'num_hidden_layers')}) if args.model is None else model}"
              f", max_seq_length {args.max_seq_length if args.model is None else 'from the checkpoint'}; "
              f"cpu threads {os.cpu_count()}", flush=True)
        enc, cmd = [], []
        for r in range(args.repeats):
            enc.append(run_encode(args, model, corpus))
            print(f"  encode  #{r + 1}: {enc[-1]['docs_per_s']:.1f} documents/s "
                  f"({enc[-1]['seconds']:.2f} s)", flush=True)
            out = tmp / f"out-{r}"
            cmd.append(run_command(args, model, corpus, out))
            print(f"  command #{r + 1}: {cmd[-1]['summary']}  [process wall {cmd[-1]['wall']:.1f} s, "
                  f"model load {cmd[-1]['load_seconds']:.1f} s]", flush=True)
        be = max(enc, key=lambda d: d["docs_per_s"])
        bc = max(cmd, key=lambda d: d["docs_per_s"])
        ratio = bc["docs_per_s"] / be["docs_per_s"]
        median = statistics.median(d["docs_per_s"] for d in cmd) / statistics.median(d["docs_per_s"] for d in enc)
        verdict = "within 10%" if ratio >= 0.9 else "MORE THAN 10% SLOWER"
        print(f"best: Embedder.encode {be['docs_per_s']:.1f} documents/s; command {bc['docs_per_s']:.1f} "
              f"documents/s, {bc['tokens_per_s']:.0f} tokens/s on {be['device']}: "
              f"ratio {ratio:.3f} ({verdict}); ratio of medians {median:.3f}")
        if args.json:
            Path(args.json).write_text(json.dumps({"encode": enc, "command": cmd, "ratio": ratio,
                                                   "ratio_of_medians": median}, indent=1))
    return 0 if ratio >= 0.9 else 1


if __name__ == "__main__":
    sys.exit(main())
