"""GPU parity: our engine against transformers' ModernBertModel in fp32 on a random full-size
checkpoint and the same token ids.

    python benchmarks/parity_gpu.py --out parity_gpu.json
    python benchmarks/parity_gpu.py --device cpu --config small --quick     # dry run of the logic

Inputs cross the local window (1, 2, 3, 64, 65, 66, 129, 130, 131 and a few hundred tokens, in
one batch) and put one ~8k-token document and a 3-token one in the same batch. The reference is
transformers fp32 (SDPA), one sequence at a time (no padding), with TF32 off. Each case is a
dtype with a backend choice; its rows report the hidden states' max |diff|, the pooled
embeddings' min cosine (our pooling kernel against the reference's mean + normalise) and
non-finite values. Bounds: fp32 max |diff| <= 1e-3 and cosine >= 0.99999; bf16/fp16 cosine
>= 0.999; everything finite.

Cross-encoder cases ("ce:<dtype>:<choice>", e.g. ce:bf16:auto): a random
`ModernBertForSequenceClassification` (one label, mean pooling: a reranker's layout) on the same
inputs, our `CrossEncoder`'s logits (`engine.score`, each group packed in one batch) against
transformers' fp32 logits, one sequence at a time: max |diff| of the logits per group, and the
centred cosine of the score vectors (both groups) in the "min cos" column; same bounds.

Exits 1 when a bound fails or a required case errors (an optional backend that is not available
is reported, not failed); the JSON and table are written anyway.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as h  # noqa: E402
from modernbert_embed.config import ModernBertConfig  # noqa: E402

CROSSING = [1, 2, 3, 64, 65, 66, 129, 130, 131, 300, 517]
FP32_MAX_DIFF = 1e-3
FP32_MIN_COS = 0.99999
HALF_MIN_COS = 0.999

# dtype:choice, where choice is "auto", "backend=<torch|triton>" or "attn=<torch|triton|torch-varlen>".
# torch-varlen is optional (torch's flash attention: half precision on CUDA only, where the wheel has it).
CUDA_CASES = ["fp32:auto", "fp32:backend=torch", "bf16:auto", "bf16:attn=triton", "bf16:attn=torch-varlen",
              "bf16:backend=torch", "fp16:auto", "fp16:attn=torch-varlen", "bf16:attn=triton-rope",
              "fp32:attn=triton-rope", "bf16:attn=torch-varlen-global", "ce:bf16:auto", "ce:fp32:auto"]
CPU_CASES = ["fp32:auto", "bf16:auto", "fp16:auto", "bf16:attn=torch-varlen", "ce:fp32:auto", "ce:bf16:auto"]
CE = "ce:"  # the prefix of a cross-encoder case
OPTIONAL = ("attn=torch-varlen", "attn=torch-varlen-global")


@dataclass
class Case:
    case: str
    dtype: str
    backend: str
    attention: str
    required: bool
    cross_encoder: bool = False
    ops: str = ""
    max_diff_crossing: float | None = None
    max_diff_long_batch: float | None = None
    worst_at: str = ""
    min_cos: float | None = None
    worst_cos_len: int | None = None
    finite: bool | None = None
    load_s: float | None = None
    run_s: float | None = None
    bounds: str = ""
    status: str = ""  # PASS | FAIL | ERROR | N/A
    error: str = ""
    extra: dict = field(default_factory=dict)


def parse_case(text: str) -> Case:
    if text.startswith(CE):
        case = parse_case(text[len(CE):])
        case.case, case.cross_encoder = text, True
        return case
    dtype, _, choice = text.partition(":")
    if dtype not in ("fp32", "bf16", "fp16"):
        raise SystemExit(f"unknown dtype in case {text!r}")
    backend, attention = "auto", "auto"
    choice = choice or "auto"
    if choice.startswith("backend="):
        backend = choice.split("=", 1)[1]
    elif choice.startswith("attn="):
        attention = choice.split("=", 1)[1]
    elif choice != "auto":
        raise SystemExit(f"unknown backend choice in case {text!r}")
    return Case(text, dtype, backend, attention, required=choice not in OPTIONAL)


def tf32_off() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


def reference(folder, ids_groups, device):
    """transformers fp32, one sequence at a time: hidden states (CPU fp32) and mean + normalise."""
    model = h.load_transformers_model(folder, torch.float32).to(device)
    hidden, pooled = [], []
    with torch.inference_mode():
        for ids in ids_groups:
            gh, gp = [], []
            for seq in ids:
                out = model(input_ids=torch.tensor([seq], device=device)).last_hidden_state[0].float()
                gh.append(out.cpu())
                gp.append(torch.nn.functional.normalize(out.mean(0), dim=0).cpu())
            hidden.append(gh)
            pooled.append(torch.stack(gp))
    del model
    h.free_memory(device)
    return hidden, pooled


def reference_logits(folder, ids_groups, device):
    """transformers' ModernBertForSequenceClassification fp32, one sequence at a time: logits
    [n, num_labels] per group (CPU fp32)."""
    from harness.rerank import load_classifier

    model = load_classifier(folder, torch.float32).to(device)
    out = []
    with torch.inference_mode():
        for ids in ids_groups:
            out.append(torch.cat([model(input_ids=torch.tensor([seq], device=device)).logits.float().cpu()
                                  for seq in ids]))
    del model
    h.free_memory(device)
    return out


def failed(case: Case, e: Exception, stage: str = "") -> None:
    """Record why `case` could not run (its message cut to 400 characters, the traceback kept)."""
    case.error = f"{stage}{type(e).__name__}: {e}"[:400]
    case.extra["traceback"] = traceback.format_exc()[-3000:]


def load_case(case: Case, cls, folder, device):
    """`cls` (Embedder or CrossEncoder) from `folder` with the case's dtype and ops (the dispatch's
    own for auto/auto), its load time and ops name recorded; None, the error recorded, if it fails."""
    from modernbert_embed import Checkpoint
    from modernbert_embed.ops import select_ops

    t0 = time.perf_counter()
    try:
        ops = None if (case.backend, case.attention) == ("auto", "auto") else \
            select_ops(device, case.backend, case.attention)
        model = cls.from_checkpoint(Checkpoint(folder), device=device, dtype=h.dtype_of(case.dtype), ops=ops)
    except Exception as e:
        failed(case, e, "load: ")
        return None
    case.load_s = time.perf_counter() - t0
    case.ops = model.ops.name if model.ops else ""
    return model


def run_cross_encoder_case(case: Case, folder, ids_groups, ref_logits, device) -> None:
    """Our CrossEncoder's logits (each group in one packed batch) against transformers' fp32."""
    from harness.rerank import centred_cosine
    from modernbert_embed import CrossEncoder

    model = load_case(case, CrossEncoder, folder, device)
    if model is None:
        return
    try:
        t0 = time.perf_counter()
        got = []
        with torch.inference_mode():
            for ids in ids_groups:
                got.append(model.engine.score(ids, max_batch_tokens=sum(len(s) for s in ids)).float().cpu())
        h.synchronize(device)
        case.run_s = time.perf_counter() - t0
        case.finite = all(bool(torch.isfinite(g).all()) for g in got)
        diffs = [float((g - r).abs().max()) for g, r in zip(got, ref_logits)]
        case.max_diff_crossing, case.max_diff_long_batch = diffs
        case.worst_at = f"group {int(np.argmax(diffs))} (logits)"
        case.min_cos = centred_cosine(torch.cat(got), torch.cat(ref_logits))
        case.extra["logits_range"] = [float(torch.cat(ref_logits).min()), float(torch.cat(ref_logits).max())]
    except Exception as e:
        failed(case, e)
    finally:
        del model
        h.free_memory(device)


def max_diff(ours, ref):
    worst, where = 0.0, ""
    for i, (a, b) in enumerate(zip(ours, ref)):
        if a.shape != b.shape:
            return float("inf"), f"sequence {i}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
        d = (a.float() - b).abs()
        if not torch.isfinite(d).all():
            return float("inf"), f"sequence {i} (length {a.shape[0]}): non-finite"
        m = d.max().item() if d.numel() else 0.0
        if m > worst:
            tok, feat = divmod(int(d.argmax()), d.shape[-1])
            worst, where = m, f"sequence {i} (length {a.shape[0]}), token {tok}, feature {feat}"
    return worst, where


def run_case(case: Case, folder, ids_groups, ref_hidden, ref_pooled, device) -> None:
    from modernbert_embed import Embedder

    model = load_case(case, Embedder, folder, device)
    if model is None:
        return
    try:
        t0 = time.perf_counter()
        diffs, cosines, lengths, finite = [], [], [], True
        for ids, rh, rp in zip(ids_groups, ref_hidden, ref_pooled):
            budget = sum(len(s) for s in ids)  # the whole group in one batch
            hidden = model.hidden_states(ids, max_batch_tokens=budget)
            finite &= all(bool(torch.isfinite(x).all()) for x in hidden)
            diffs.append(max_diff(hidden, rh))
            emb = model.encode_tokens(ids, max_batch_tokens=budget, convert_to_tensor=True).float().cpu()
            finite &= bool(torch.isfinite(emb).all())
            cosines.append(torch.nn.functional.cosine_similarity(emb, rp, dim=-1))
            lengths += [len(s) for s in ids]
        h.synchronize(device)
        case.run_s = time.perf_counter() - t0
        case.max_diff_crossing, case.max_diff_long_batch = diffs[0][0], diffs[1][0]
        case.worst_at = max(diffs, key=lambda d: d[0])[1]
        cos = torch.cat(cosines)
        case.min_cos = float(cos.min())
        case.worst_cos_len = lengths[int(cos.argmin())]
        case.finite = finite
    except Exception as e:
        failed(case, e)
    finally:
        del model
        h.free_memory(device)


def judge(case: Case) -> None:
    if case.dtype == "fp32":
        case.bounds = f"max abs diff <= {FP32_MAX_DIFF:g}, cos >= {FP32_MIN_COS}"
    else:
        case.bounds = f"cos >= {HALF_MIN_COS}"
    if case.error:
        case.status = "ERROR" if case.required else "N/A"
        return
    worst = max(case.max_diff_crossing, case.max_diff_long_batch)
    ok = bool(case.finite) and np.isfinite(worst)
    if case.dtype == "fp32":
        ok &= worst <= FP32_MAX_DIFF and case.min_cos >= FP32_MIN_COS
    else:
        ok &= case.min_cos >= HALF_MIN_COS
    case.status = "PASS" if ok else "FAIL"


def table(cases, long_len: int) -> str:
    head = ["case", "ops", "max abs diff, crossing", f"max abs diff, {long_len}+3 batch", "min cos (len)", "finite",
            "bounds", "status", "error"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in cases:
        cells = [c.case, c.ops, "-" if c.max_diff_crossing is None else f"{c.max_diff_crossing:.3g}",
                 "-" if c.max_diff_long_batch is None else f"{c.max_diff_long_batch:.3g}",
                 "-" if c.min_cos is None else f"{c.min_cos:.6f} "
                 + ("(centred, logits)" if c.cross_encoder else f"({c.worst_cos_len})"),
                 "-" if c.finite is None else str(c.finite), c.bounds, c.status,
                 c.error.replace("|", "/").replace("\n", " ")[:120]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default), or cpu for a dry run")
    p.add_argument("--config", choices=("base", "small"), default="base")
    p.add_argument("--quick", action="store_true", help="a 1024-token long document instead of ~8k")
    p.add_argument("--long-len", type=int, default=None, help="the long document's length (default 8192)")
    p.add_argument("--cases", nargs="*", default=None,
                   help="dtype:choice cases, e.g. bf16:auto fp16:attn=torch-varlen fp32:backend=torch")
    p.add_argument("--seed", type=int, default=0)
    h.add_output_args(p, append=False)
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if h.cuda_missing(device, "parity_gpu"):
        return 2
    tf32_off()
    long_len = args.long_len or (1024 if args.quick or device.type == "cpu" else 8192)
    cases = [parse_case(c) for c in (args.cases or (CUDA_CASES if device.type == "cuda" else CPU_CASES))]
    started = time.perf_counter()
    info = h.machine_info(device)

    with tempfile.TemporaryDirectory(prefix="mbe-parity-") as tmp:
        folder = h.write_checkpoint(Path(tmp) / "checkpoint", args.config, seed=args.seed)
        cfg = ModernBertConfig.from_file(folder / "config.json")
        vocab = h.Vocab.of(cfg)
        rng = np.random.default_rng(1)

        def seq(n):
            body = rng.integers(vocab.low, vocab.high, size=max(n - 2, 0)).tolist()
            return ([vocab.cls] + body + [vocab.sep])[:n] if n >= 2 else [vocab.cls]

        lengths = [n for n in CROSSING if n <= long_len]
        ids_groups = [[seq(n) for n in lengths], [seq(long_len), seq(3)]]
        print(f"parity_gpu: {h.machine_line(info)}")
        print(f"inputs: {lengths} in one batch; [{long_len}, 3] in one batch; reference transformers fp32 (TF32 off)")
        t0 = time.perf_counter()
        ref_hidden, ref_pooled = reference(folder, ids_groups, device)
        ce_folder, ref_logits = None, None
        if any(c.cross_encoder for c in cases):
            from harness.rerank import write_cross_encoder

            ce_folder = write_cross_encoder(Path(tmp) / "cross-encoder", args.config, seed=args.seed + 1)
            ref_logits = reference_logits(ce_folder, ids_groups, device)
        ref_s = time.perf_counter() - t0

        def record():
            return {"script": "parity_gpu", "machine": info, "config": args.config, "long_len": long_len,
                    "lengths": [lengths, [long_len, 3]], "reference_s": round(ref_s, 2),
                    "elapsed_s": round(time.perf_counter() - started, 1), "cases": [asdict(c) for c in cases]}

        section = h.MarkdownSection(args.markdown, "parity_gpu")
        for i, case in enumerate(cases):
            if case.cross_encoder:
                run_cross_encoder_case(case, ce_folder, ids_groups, ref_logits, device)
            else:
                run_case(case, folder, ids_groups, ref_hidden, ref_pooled, device)
            judge(case)
            print(f"  {case.case:<24} {case.status:<5} max abs diff {h.fmt_num(case.max_diff_crossing)} / "
                  f"{h.fmt_num(case.max_diff_long_batch)}, min cos {case.min_cos}  {case.error}", flush=True)
            if args.out:
                h.write_json(args.out, record())
            # case by case: a run cut short leaves the cases it judged
            section.write(f"parity_gpu on {h.machine_line(info)}\n\n{table(cases[:i + 1], long_len)}",
                          partial=i + 1 < len(cases))

    text = f"parity_gpu on {h.machine_line(info)}\n\n{table(cases, long_len)}"
    print()
    print(text)
    bad = [c for c in cases if c.status in ("FAIL", "ERROR")]
    if bad:
        print(f"parity_gpu: {len(bad)} case(s) failed: " + ", ".join(f"{c.case} ({c.status})" for c in bad))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
