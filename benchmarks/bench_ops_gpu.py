"""Where the GPU time goes, op by op: each Triton kernel against its torch reference at the model's
shapes, attention against torch's own kernels, a profile of whole forwards grouped by op, and a
sweep of attention tiles.

    python benchmarks/bench_ops_gpu.py --out ops.json --markdown results.md     # about a minute
    python benchmarks/bench_ops_gpu.py --device cpu --quick                       # dry run (interpreter)

Sections, in the order they run (the sweep last, cut by --time-budget):
1. memory-bound ops (LayerNorm with and without the residual, rotary, GeGLU, pooling) on
   --tokens tokens (default 65536: each [T, 768] bf16 tensor is 96 MiB, twice an H100's L2, so
   repeats do not run from cache): milliseconds, achieved GB/s from the bytes each op must move,
   and that as a share of a device-to-device copy measured in the same run (the practical peak);
2. attention, full and windowed (w = 64), on 32 x 512 and 2 x 8192 tokens: our kernel, torch's
   varlen flash attention where the installed torch has it, and the per-sequence SDPA of the
   torch ops; TFLOP/s counted on the score entries the model needs (4 * head_dim * heads per
   visible query-key pair), so the window's skipped work is not counted as work done;
3. a torch.profiler trace of whole model forwards (32 x 512 and 2 x 8192 tokens): kernel time by
   op group (GEMMs, attention, norms, ...) and the share of the wall time the GPU was busy;
4. our attention kernel over a list of (BLOCK_M, BLOCK_N, warps, stages) tiles, per case, with
   the best marked: the data from which the defaults in kernels/attention.py are chosen.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as h  # noqa: E402
from harness.measure import visible_pairs  # noqa: E402

FULL_TILES = [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3),
              (128, 64, 4, 4), (128, 64, 4, 2), (64, 128, 4, 3)]
LOCAL_TILES = [(64, 64, 4, 3), (64, 32, 4, 3), (32, 64, 4, 3), (64, 64, 4, 2), (128, 64, 8, 3),
               (64, 64, 8, 3), (128, 64, 4, 3), (64, 128, 4, 3)]

# profiler kernel names -> op group; the first group whose pattern is in the name wins
GROUPS = [
    ("attention", ("_attention_kernel", "flash", "fmha", "attention", "softmax")),
    ("layer_norm", ("_layer_norm_kernel", "layer_norm")),
    ("rotary", ("_rotary_kernel",)),
    ("geglu", ("_geglu_kernel", "gelu")),
    ("pool", ("_pool_kernel",)),
    ("gemm", ("gemm", "xmma", "nvjet", "cutlass", "cublas", "aten::mm", "aten::addmm", "aten::linear", "matmul",
              "_linear_pointwise")),  # the last: oneDNN's packed linear, the CPU's (dry runs)
    ("embedding", ("index", "embedding", "gather")),
    ("copy", ("memcpy", "memset", "copy", "fill")),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default), or cpu for a dry run of the logic")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--quick", action="store_true", help="small shapes, the small model, few tiles")
    p.add_argument("--tokens", type=int, default=None, help="tokens for the memory-bound ops (default 65536)")
    p.add_argument("--time-budget", type=float, default=90.0,
                   help="seconds after which the remaining sweep entries are skipped (default 90)")
    p.add_argument("--no-sweep", action="store_true", help="leave out the attention tile sweep")
    p.add_argument("--no-profile", action="store_true", help="leave out the profile of whole forwards")
    h.add_output_args(p, append=False)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- timing
def time_ms(fn, device, min_total_s=0.03, max_reps=100):
    """Median milliseconds of `fn()` after one untimed call (compiles, warms caches). On CUDA each
    repeat is timed by events and enough repeats are run to fill about `min_total_s`."""
    fn()
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    one = time.perf_counter() - t0
    reps = max(3, min(max_reps, int(min_total_s / max(one, 1e-6))))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def copy_bandwidth(numel, dtype, device) -> float:
    """GB/s of a device-to-device copy of `numel` elements (read + write): the practical peak."""
    src = torch.empty(numel, dtype=dtype, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def batch_of(lengths, device):
    from modernbert_embed.batching import pack

    return pack([[0] * n for n in lengths], list(range(len(lengths))), device)


# ----------------------------------------------------------------------------- sections
def memory_bound_ops(cfg, T, dtype, device, ops_triton, ops_ref, bw_copy, bw_nominal):
    """Rows for the elementwise / reduction ops: ms, GB/s, share of the copy bandwidth."""
    from modernbert_embed.rope import rope_tables

    H, I, heads, d = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.head_dim
    b = torch.finfo(dtype).bits // 8
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(T, H, device=device, generator=g).to(dtype)
    r = torch.randn(T, H, device=device, generator=g).to(dtype)
    w = torch.ones(H, device=device, dtype=dtype)
    qkv = torch.randn(T, 3, heads, d, device=device, generator=g).to(dtype)
    u = torch.randn(T, 2 * I, device=device, generator=g).to(dtype)
    seq = min(512, T)
    lengths = [seq] * (T // seq) + ([T % seq] if T % seq else [])
    batch = batch_of(lengths, device)
    cos, sin = rope_tables(cfg.global_rope_theta, d, cfg.max_position_embeddings, device)
    eps = cfg.norm_eps
    cases = [
        ("layer_norm +residual", 4 * T * H * b, lambda o: o.layer_norm(x, w, eps, residual=r)),
        ("layer_norm", 2 * T * H * b, lambda o: o.layer_norm(x, w, eps)),
        ("rotary (in place)", 4 * T * H * b + T * (d // 2) * 8 + T * 8, lambda o: o.rotary(qkv, batch.positions, cos, sin)),
        ("geglu", 3 * T * I * b, lambda o: o.geglu(u)),
        ("pool mean+L2", T * H * b + len(lengths) * H * 4, lambda o: o.pool(x, batch, "mean", None, True)),
    ]
    rows = []
    for name, nbytes, fn in cases:
        times = {}
        for impl, ops in (("triton", ops_triton), ("torch", ops_ref)):
            try:
                times[impl] = time_ms(lambda: fn(ops), device)
                err = None
            except Exception as e:  # noqa: BLE001 - recorded in the row, the run goes on
                times[impl], err = None, f"{type(e).__name__}: {e}"
            ms = times[impl]
            gbs = nbytes / (ms * 1e-3) / 1e9 if ms else None
            rows.append({"op": name, "impl": impl, "tokens": T, "bytes": nbytes, "ms": ms, "gb_s": gbs,
                         "of_copy": gbs / bw_copy if gbs and bw_copy else None,
                         "of_nominal": gbs / bw_nominal if gbs and bw_nominal else None,
                         "speedup_vs_torch": None, "error": err})
        if times.get("triton") and times.get("torch"):
            rows[-2]["speedup_vs_torch"] = times["torch"] / times["triton"]
    return rows


def attention_impls(device, dtype, tables):
    from modernbert_embed import ops_torch
    from modernbert_embed.kernels.attention import attention

    def attention_rope(qkv, batch, window, scale):
        return attention(qkv, batch, window, scale, rope=tables)

    impls = [("triton", attention), ("triton+rope", attention_rope)]
    if device.type == "cuda" and dtype != torch.float32:
        from modernbert_embed.torch_varlen import varlen_attention, varlen_available

        if varlen_available():
            impls.append(("torch-varlen", varlen_attention))
    impls.append(("torch (SDPA per sequence)", ops_torch.attention))
    return impls


def attention_cases(quick):
    if quick:
        return [("full", [40] * 3, None), ("window", [200, 90], 16)]
    # the long global case first: it decides the long-document goal, and the sweep may be cut short
    return [("full", [8192] * 2, None), ("full", [512] * 32, None), ("window", [512] * 32, 64), ("window", [8192] * 2, 64)]


def attention_inputs(cfg, cases, dtype, device):
    """Per case: (name, window, batch, random qkv, FLOPs of the work the model needs, scale)."""
    heads, d = cfg.num_attention_heads, cfg.head_dim
    for kind, lengths, window in cases:
        qkv = torch.randn(sum(lengths), 3, heads, d, device=device).to(dtype)
        flops = 4 * d * heads * visible_pairs(lengths, window)
        yield f"{kind} {len(lengths)}x{lengths[0]}", window, batch_of(lengths, device), qkv, flops, d**-0.5


def attention_rows(cfg, cases, dtype, device):
    """Each implementation per case. "triton+rope" takes q and k unrotated and rotates
    them itself: compare it with "triton" plus the rotary op's time (the memory-bound table)."""
    from modernbert_embed.rope import rope_tables

    tables = rope_tables(cfg.global_rope_theta, cfg.head_dim, cfg.max_position_embeddings, device)
    rows = []
    for name, window, batch, qkv, flops, scale in attention_inputs(cfg, cases, dtype, device):
        base = None
        for impl, fn in attention_impls(device, dtype, tables):
            try:
                ms = time_ms(lambda: fn(qkv, batch, window, scale), device)
                err = None
            except Exception as e:  # noqa: BLE001
                ms, err = None, f"{type(e).__name__}: {str(e)[:300]}"
            if impl == "triton":
                base = ms
            rows.append({"case": name, "window": window, "impl": impl, "ms": ms,
                         "tflops": flops / (ms * 1e-3) / 1e12 if ms else None,
                         "vs_triton": ms / base if ms and base else None, "error": err})
    return rows


def sweep_rows(cfg, cases, dtype, device, deadline, quick):
    from modernbert_embed.kernels._arch import device_arch
    from modernbert_embed.kernels.attention import _config, attention

    rows = []
    for name, window, batch, qkv, flops, scale in attention_inputs(cfg, cases, dtype, device):
        default = _config(dtype, cfg.head_dim, window, arch=device_arch(qkv.device))
        tiles = FULL_TILES if window is None else LOCAL_TILES
        tiles = [default] + [t for t in tiles if t != default]
        case_rows = []
        for tile in tiles[:3] if quick else tiles:
            row = {"case": name, "tile": list(tile), "default": tile == default,
                   "ms": None, "tflops": None, "best": False, "error": None}
            if time.perf_counter() > deadline:
                row["error"] = "skipped: time budget spent"
            else:
                try:
                    row["ms"] = time_ms(lambda: attention(qkv, batch, window, scale, config=tile), device)
                    row["tflops"] = flops / (row["ms"] * 1e-3) / 1e12
                except Exception as e:  # noqa: BLE001 - a tile that does not fit is a finding
                    row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            case_rows.append(row)
        timed = [r for r in case_rows if r["ms"]]
        if timed:
            min(timed, key=lambda r: r["ms"])["best"] = True
        rows += case_rows
    return rows


def group_of(name: str) -> str:
    low = name.lower()
    for group, patterns in GROUPS:
        if any(p.lower() in low for p in patterns):
            return group
    return "other"


def profile_forward(model, batch, device, reps=3):
    """{group: ms per forward}, wall ms per forward, busy share: kernel time over wall time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    for _ in range(2):
        model(batch)
    h.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        model(batch)
    h.synchronize(device)
    wall = (time.perf_counter() - t0) * 1e3 / reps
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(reps):
            model(batch)
        h.synchronize(device)
    groups: dict[str, float] = {}
    top: dict[str, float] = {}
    for e in prof.key_averages():
        if cuda:
            if e.device_type == DeviceType.CPU:  # CPU ops: their kernels are counted as kernels
                continue
            us = getattr(e, "self_device_time_total", None)
            if us is None:
                us = getattr(e, "self_cuda_time_total", 0)
        else:
            us = e.self_cpu_time_total
        if us <= 0:
            continue
        ms = us / 1e3 / reps
        groups[group_of(e.key)] = groups.get(group_of(e.key), 0.0) + ms
        top[e.key] = top.get(e.key, 0.0) + ms
    busy = sum(groups.values())
    return {"wall_ms": wall, "kernel_ms": busy, "busy_share": busy / wall if cuda and wall else None,
            "groups_ms": dict(sorted(groups.items(), key=lambda kv: -kv[1])),
            "top_kernels_ms": dict(sorted(top.items(), key=lambda kv: -kv[1])[:12])}


# ----------------------------------------------------------------------------- tables
def _f(x, fmt="{:.3g}"):
    return "-" if x is None else fmt.format(x)


def markdown(record) -> str:
    out = [f"bench_ops_gpu on {h.machine_line(record['machine'])}",
           f"dtype {record['settings']['dtype']}; copy bandwidth {_f(record['bandwidth_gbs']['copy'], '{:.0f}')} GB/s "
           f"(nominal {_f(record['bandwidth_gbs']['nominal'], '{:.0f}')})", ""]
    out += ["| op | impl | tokens | ms | GB/s | of copy | of nominal | triton speedup |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in record["ops"]:
        out.append(f"| {r['op']} | {r['impl']} | {r['tokens']} | {_f(r['ms'])} | {_f(r['gb_s'], '{:.0f}')} | "
                   f"{_f(r['of_copy'], '{:.0%}')} | {_f(r['of_nominal'], '{:.0%}')} | {_f(r['speedup_vs_torch'], '{:.2f}x')} |"
                   + (f" {r['error']}" if r["error"] else ""))
    out += ["", "| attention | impl | ms | TFLOP/s (needed work) | ms / triton ms |", "|---|---|---:|---:|---:|"]
    for r in record["attention"]:
        out.append(f"| {r['case']} | {r['impl']} | {_f(r['ms'])} | {_f(r['tflops'])} | {_f(r['vs_triton'], '{:.2f}')} |"
                   + (f" {r['error']}" if r["error"] else ""))
    for name, p in record.get("profile", {}).items():
        if "error" in p:
            out += ["", f"profile {name}: {p['error']}"]
            continue
        out += ["", f"profile {name}: wall {p['wall_ms']:.2f} ms per forward, kernels {p['kernel_ms']:.2f} ms"
                + (f" (GPU busy {p['busy_share']:.0%})" if p["busy_share"] is not None else ""), "",
                "| group | ms | share of kernel time |", "|---|---:|---:|"]
        for g, ms in p["groups_ms"].items():
            out.append(f"| {g} | {ms:.3f} | {ms / p['kernel_ms']:.0%} |")
    if record.get("sweep"):
        out += ["", "| attention tiles | (BLOCK_M, BLOCK_N, warps, stages) | ms | TFLOP/s | |", "|---|---|---:|---:|---|"]
        for r in record["sweep"]:
            mark = " ".join(m for m, on in (("default", r["default"]), ("BEST", r["best"])) if on)
            out.append(f"| {r['case']} | {tuple(r['tile'])} | {_f(r['ms'])} | {_f(r['tflops'])} | {mark} |"
                       + (f" {r['error']}" if r["error"] else ""))
    return "\n".join(out)


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if h.cuda_missing(device, "bench_ops_gpu"):
        return 2
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels import triton
    quick = args.quick or device.type == "cpu"
    started = time.perf_counter()
    deadline = started + args.time_budget
    dtype = h.dtype_of(args.dtype)

    from modernbert_embed import Embedder
    from modernbert_embed.config import ModernBertConfig
    from modernbert_embed.ops import select_ops

    ops_triton = select_ops(device, "triton")
    ops_ref = select_ops(device, "torch")
    T = args.tokens or (256 if quick else 65536)
    info = h.machine_info(device)
    record = {"script": "bench_ops_gpu", "machine": info,
              "settings": {"dtype": args.dtype, "tokens": T, "quick": quick, "time_budget_s": args.time_budget},
              "bandwidth_gbs": {}, "ops": [], "attention": [], "profile": {}, "sweep": []}

    def save():
        record["elapsed_s"] = round(time.perf_counter() - started, 1)
        if args.out:
            h.write_json(args.out, record)

    with tempfile.TemporaryDirectory(prefix="mbe-ops-") as tmp:
        folder = h.write_checkpoint(Path(tmp) / "checkpoint", "small" if quick else "base", seed=0)
        cfg = ModernBertConfig.from_file(folder / "config.json")
        print(f"bench_ops_gpu: {h.machine_line(info)}", flush=True)

        record["bandwidth_gbs"] = {"copy": copy_bandwidth(T * cfg.hidden_size, dtype, device),
                                   "nominal": h.nominal_bandwidth_gbs(info.get("gpu"))}
        record["ops"] = memory_bound_ops(cfg, T, dtype, device, ops_triton, ops_ref,
                                         record["bandwidth_gbs"]["copy"], record["bandwidth_gbs"]["nominal"])
        save()
        cases = attention_cases(quick)
        record["attention"] = attention_rows(cfg, cases, dtype, device)
        save()
        if not args.no_profile:
            model = Embedder.from_pretrained(folder, device=device, dtype=dtype).model
            shapes = [[64] * 4] if quick else [[512] * 32, [8192] * 2]
            for lengths in shapes:
                name = f"{len(lengths)}x{lengths[0]}"
                try:
                    record["profile"][name] = profile_forward(model, batch_of(lengths, device), device)
                except Exception as e:  # noqa: BLE001
                    record["profile"][name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                save()
            del model
            h.free_memory(device)
        if not args.no_sweep:
            record["sweep"] = sweep_rows(cfg, cases, dtype, device, deadline, quick)
        save()
    text = markdown(record)
    print(text)
    if args.markdown:
        h.append_markdown(args.markdown, "bench_ops_gpu", text)
    bad = [r for r in record["ops"] + record["attention"] if r["impl"] == "triton" and r["error"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
