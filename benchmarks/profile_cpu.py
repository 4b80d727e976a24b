"""Where the CPU forward's time goes, by part: matmuls, attention, norms, rotary, GeGLU, pooling,
the rest of the forward (embedding lookup, residual views, copies) and the Python around it
(planning, packing, scatter: `encode_tokens` less the forward).

    python benchmarks/profile_cpu.py                          # fp32, bf16 and int8; mixed and fixed-512
    python benchmarks/profile_cpu.py --dtypes bfloat16 --corpora fixed --threads 1

Each part is timed by wrapping the ops that `ops.py` chose (the model calls nothing else but its
`Linear` layers, which are timed by hooks) with a clock that stops its parent while it runs, so
that the parts add up to the call. On a CPU every op finishes before it returns, so wall time per
part is exact up to the clock's own cost (a few microseconds per call, about 0.5 ms per 22-layer
forward, shown in the totals). Reported per part: ms per 1,000 tokens, its share of the call and,
for the matmuls and attention, the GFLOP/s they reached, beside a 2048^3 matmul measured in the
same run before and after each profile, the best taken (the machine's practical peak for that
dtype): the matmul part's rate over the peak is the ceiling of the whole forward's MFU.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as h  # noqa: E402
from modernbert_embed import Checkpoint, Embedder  # noqa: E402
from modernbert_embed.config import ModernBertConfig  # noqa: E402
from modernbert_embed.model import Linear  # noqa: E402
from modernbert_embed.ops import OP_NAMES, select_ops  # noqa: E402

PARTS = ("matmul", "attention", "layer_norm", "rotary", "geglu", "pool", "forward, rest", "outside the forward")


class Clock:
    """Exclusive time per part: entering a part pauses the one it is nested in."""

    def __init__(self):
        self.total = defaultdict(float)
        self.calls = defaultdict(int)
        self.stack: list[list] = []  # [part, start]

    def enter(self, part: str) -> None:
        now = time.perf_counter()
        if self.stack:
            outer = self.stack[-1]
            self.total[outer[0]] += now - outer[1]
        self.stack.append([part, now])
        self.calls[part] += 1

    def leave(self) -> None:
        now = time.perf_counter()
        part, start = self.stack.pop()
        self.total[part] += now - start
        if self.stack:
            self.stack[-1][1] = now

    def timed(self, part: str, fn):
        def wrapper(*args, **kwargs):
            self.enter(part)
            try:
                return fn(*args, **kwargs)
            finally:
                self.leave()
        return wrapper


def instrument(engine, clock: Clock) -> None:
    """Wrap the engine's and the model's ops and time the Linear layers and the forward."""
    model = engine.model
    timed_ops = dataclasses.replace(model.ops, **{name: clock.timed(name, getattr(model.ops, name))
                                                 for name in OP_NAMES})
    engine.ops = timed_ops
    for module in model.modules():
        if hasattr(module, "ops"):
            module.ops = timed_ops
        if isinstance(module, Linear):
            module.register_forward_pre_hook(lambda *_: clock.enter("matmul"))
            module.register_forward_hook(lambda *_: clock.leave())
    model.register_forward_pre_hook(lambda *_: clock.enter("forward, rest"))
    model.register_forward_hook(lambda *_: clock.leave())


def attention_flops(cfg: ModernBertConfig, lengths) -> float:
    """QK^T and PV over the keys each query sees (the window in local layers)."""
    return sum(4.0 * cfg.hidden_size * h.visible_pairs(lengths, cfg.window(layer))
               for layer in range(cfg.num_hidden_layers))


def matmul_flops(model) -> float:
    """Per token: 2 x the Linear weights' sizes."""
    return 2.0 * sum(m.weight.numel() for m in model.modules() if isinstance(m, Linear))


def profile(folder: Path, dtype: str, corpus, repeats: int) -> dict:
    if dtype == "int8":  # the int8-weight experiment: float32 with int8 Linear layers
        emb = Embedder.from_checkpoint(Checkpoint(folder), device="cpu", ops=select_ops("cpu", int8_weights=True))
    else:
        emb = Embedder.from_pretrained(folder, device="cpu", dtype=dtype)
    model = emb.model
    cfg = model.config
    emb.encode_tokens(corpus.ids)  # warm-up: the corpus's shapes
    # One plain call (no clocks) to see what the instrumentation costs.
    t0 = time.perf_counter()
    emb.encode_tokens(corpus.ids)
    plain = time.perf_counter() - t0
    clock = Clock()
    instrument(emb.engine, clock)
    clock.total.clear()
    clock.calls.clear()
    walls = []
    for _ in range(repeats):
        clock.enter("outside the forward")
        t0 = time.perf_counter()
        emb.encode_tokens(corpus.ids)
        walls.append(time.perf_counter() - t0)
        clock.leave()
    tokens = corpus.num_tokens
    wall = sum(walls)
    mm_flops = matmul_flops(model) * tokens * repeats
    att_flops = attention_flops(cfg, corpus.lengths) * repeats
    parts = {}
    for part in PARTS:
        secs = clock.total.get(part, 0.0)
        row = {"ms_per_1k_tokens": 1000 * secs / (tokens * repeats) * 1000, "share": secs / wall,
               "calls_per_call": clock.calls.get(part, 0) / repeats}
        if part == "matmul" and secs:
            row["gflops"] = mm_flops / secs / 1e9
        if part == "attention" and secs:
            row["gflops"] = att_flops / secs / 1e9
        parts[part] = row
    model_flops = corpus.flops(cfg) * repeats
    return {"dtype": dtype, "corpus": corpus.summary(), "repeats": repeats,
            "tokens_per_s": tokens * repeats / wall, "tokens_per_s_plain": tokens / plain,
            "model_gflops": model_flops / wall / 1e9, "parts": parts}


def markdown(results: list[dict], peaks: dict[str, float]) -> str:
    lines = []
    for r in results:
        peak = peaks[r["dtype"]]
        c = r["corpus"]
        of_peak = f" = {r['model_gflops'] / peak:.0%} of the {peak:.0f} GFLOP/s matmul" if peak else ""
        lines.append(f"**{r['dtype']}, {c['name']}** ({c['docs']} documents, {c['tokens']:,} tokens; "
                     f"{r['tokens_per_s']:,.0f} tokens/s instrumented, {r['tokens_per_s_plain']:,.0f} plain; "
                     f"model {r['model_gflops']:.0f} GFLOP/s{of_peak})")
        lines.append("")
        lines.append("| part | ms / 1k tokens | share | calls per call | GFLOP/s | of the matmul peak |")
        lines.append("|---|---|---|---|---|---|")
        for part, p in r["parts"].items():
            g = p.get("gflops")
            lines.append(f"| {part} | {p['ms_per_1k_tokens']:.1f} | {p['share']:.1%} | {p['calls_per_call']:.0f} | "
                         f"{f'{g:.0f}' if g else '-'} | {f'{g / peak:.0%}' if g and peak else '-'} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "int8"],
                   choices=["float32", "bfloat16", "int8"])
    p.add_argument("--corpora", nargs="+", default=["mixed", "fixed"], choices=["mixed", "fixed"])
    p.add_argument("--mixed-docs", type=int, default=96)
    p.add_argument("--fixed-docs", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--config", choices=["base", "small"], default="base")
    p.add_argument("--checkpoint", type=Path, default=None, help="folder for the random checkpoint (reused)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    p.add_argument("--markdown", type=Path, default=None, help="append the tables to this markdown file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.checkpoint or Path(tmp) / "checkpoint"
        if not (folder / "config.json").exists():
            h.write_checkpoint(folder, args.config)
        cfg = ModernBertConfig.from_file(folder / "config.json")
        vocab = h.Vocab.of(cfg)
        corpora = {"mixed": h.mixed_corpus(vocab, 0, seed=0, median=110, docs=args.mixed_docs),
                   "fixed": h.fixed_corpus(vocab, 512, args.fixed_docs, seed=1)}
        # The peak of each dtype: the best of 2048^3 matmuls measured before and after every
        # profile (a neighbour's load pulls single measurements down, never up).
        peaks = dict.fromkeys(args.dtypes, 0.0)

        def measure_peaks():
            for d in args.dtypes:
                if d != "int8":  # int8: the GEMM rates in the table stand alone
                    peaks[d] = max(peaks[d], 1000 * h.matmul_tflops("cpu", getattr(torch, d), 2048))

        measure_peaks()
        results = []
        for d in args.dtypes:
            for c in args.corpora:
                results.append(profile(folder, d, corpora[c], args.repeats))
                measure_peaks()
    info = h.machine_info("cpu")
    text = markdown(results, peaks)
    print(h.machine_line(info))
    print(f"threads {torch.get_num_threads()}; commit {h.git_commit()}")
    print(text)
    if args.out:
        h.write_json(args.out, {"machine": info, "threads": torch.get_num_threads(), "peaks_gflops": peaks,
                                "results": results})
    if args.markdown:
        h.append_markdown(args.markdown, f"CPU profile by part, commit {h.git_commit()}", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
