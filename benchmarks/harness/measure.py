"""Measuring: timing (medians and 20th/80th percentiles after warm-up, CUDA synchronised around
each repeat), peak memory, the machine a run was on, the GPU tables (nominal bf16 peaks and
bandwidth, matched on the device name) and MFU: model FLOPs per token x tokens/s over a peak,
the card's where the GPU is known, and a large matmul measured on the same machine in the same run.
"""

from __future__ import annotations

import gc
import importlib.metadata
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
# The real config and tokenizer of modernbert-embed-base (no weights), kept with the tests.
FIXTURES = Path(os.environ.get("MODERNBERT_EMBED_FIXTURES", ROOT / "tests" / "data" / "modernbert-embed-base"))


# ----------------------------------------------------------------------------- timing
@dataclass
class Timing:
    times: list[float]

    @property
    def median(self) -> float:
        return float(np.median(self.times))

    @property
    def p20(self) -> float:
        return float(np.percentile(self.times, 20))

    @property
    def p80(self) -> float:
        return float(np.percentile(self.times, 80))


def synchronize(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure(fn: Callable[[], Any], device=None, warmup: int = 1, repeats: int = 3,
            warmup_fn: Callable[[], Any] | None = None) -> tuple[Timing, Any]:
    """Run `warmup_fn` (default `fn`) `warmup` times untimed, then `fn` `repeats` times timed;
    returns (Timing, the last timed result)."""
    result = None
    for _ in range(warmup):
        (warmup_fn or fn)()
    synchronize(device)
    times = []
    for _ in range(max(repeats, 1)):
        synchronize(device)
        t0 = time.perf_counter()
        result = fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return Timing(times), result


# ----------------------------------------------------------------------------- memory
def reset_peak_memory(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        try:  # Linux: "5" resets the VmHWM (peak RSS) of this process
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def peak_memory_mb(device) -> tuple[float, str]:
    """(MiB, what it measures): CUDA max allocated; on CPU the peak RSS since the last reset
    (or of the whole process where the peak cannot be reset)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20, "cuda max_memory_allocated"
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024, "peak RSS (VmHWM)"
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (rss / 1024 if sys.platform != "darwin" else rss / 2**20), "process peak RSS (ru_maxrss)"


def free_memory(device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- machine
def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> str:
    env = os.environ.get("MODERNBERT_EMBED_COMMIT")
    if env:
        return env
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device) -> dict[str, Any]:
    device = torch.device(device)
    info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "commit": git_commit(),
        "device": device.type,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "sentence_transformers": _version("sentence-transformers"),
        "onnxruntime": _version("onnxruntime"),
        "openvino": _version("openvino"),
        "nncf": _version("nncf"),
        "onnx": _version("onnx"),
        "numpy": np.__version__,
        "modernbert_embed": _version("modernbert-embed"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update({
            "gpu": torch.cuda.get_device_name(device),
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "gpu_sm_count": props.multi_processor_count,
            "cuda": torch.version.cuda,
        })
    return info


def machine_line(info: dict[str, Any]) -> str:
    where = info.get("gpu") or f"{info['cpu']} ({info['torch_threads']} threads)"
    versions = ", ".join(f"{k} {info[k]}" for k in ("torch", "triton", "transformers", "sentence_transformers")
                         if info.get(k))
    return f"{where}; {versions}; commit {info['commit']}; {info['date']}"


# ----------------------------------------------------------------------------- peaks and MFU
# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), matched on the device name.
GPU_BF16_PEAK_TFLOPS = [
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM (name "NVIDIA H100 80GB HBM3")
    ("GH200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
]


# Nominal HBM bandwidth (GB/s), matched the same way.
GPU_BANDWIDTH_GBS = [("H200", 4800.0), ("H100 PCIe", 2000.0), ("H100 NVL", 3900.0), ("H100", 3350.0),
                     ("GH200", 4000.0), ("A100-SXM4-80GB", 2039.0), ("A100", 1555.0), ("L40S", 864.0), ("L4", 300.0)]


def _match_gpu(table, gpu_name: str | None) -> float | None:
    """The value of the first key (most specific first) contained in the device name."""
    for key, value in table:
        if gpu_name and key.lower() in gpu_name.lower():
            return value
    return None


def nominal_peak_tflops(gpu_name: str | None) -> float | None:
    return _match_gpu(GPU_BF16_PEAK_TFLOPS, gpu_name)


def nominal_bandwidth_gbs(gpu_name: str | None) -> float | None:
    return _match_gpu(GPU_BANDWIDTH_GBS, gpu_name)


def cuda_missing(device: torch.device, script: str) -> bool:
    """True (and says so) when a CUDA run was asked for on a machine without a CUDA GPU."""
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"{script}: no CUDA GPU is available (use --device cpu for a dry run)", file=sys.stderr)
        return True
    return False


def matmul_tflops(device, dtype: torch.dtype, n: int, repeats: int = 5) -> float:
    """Achieved TFLOP/s of an n x n x n matmul, best of `repeats` (the machine's practical peak
    for that dtype). On the CPU, the better of torch's `mm` and oneDNN's packed linear, the GEMM
    the engine's Linear layers run there (in fp32 it beats `mm` by 10-30% on this kind of CPU:
    a peak from `mm` alone would flatter every MFU)."""
    from modernbert_embed import ops_torch

    device = torch.device(device)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    gemms = [lambda: a @ b]
    if device.type == "cpu" and ops_torch.onednn_supports(dtype):
        packed = ops_torch.cpu_pack(b.t())  # as a Linear weight [out, in]: x @ W^T = a @ b
        gemms.append(lambda: ops_torch.cpu_linear(a, packed))
    best = float("inf")
    with torch.inference_mode():
        for gemm in gemms:
            timing, _ = measure(gemm, device, warmup=2 if device.type == "cuda" else 1, repeats=repeats)
            best = min(best, min(timing.times))
    return 2 * n**3 / best / 1e12


def visible_pairs(lengths, window) -> int:
    """Query-key pairs the model attends over (|i - j| <= window within a sequence; None: all)."""
    total = 0
    for n in lengths:
        if window is None or window >= n - 1:
            total += n * n
        else:  # each row sees 2w + 1 keys, minus what falls off either end
            total += n * (2 * window + 1) - window * (window + 1)
    return total


def mfu(tokens_per_s: float, flops_per_token: float, peak_tflops: float | None) -> float | None:
    if not peak_tflops:
        return None
    return tokens_per_s * flops_per_token / (peak_tflops * 1e12)
