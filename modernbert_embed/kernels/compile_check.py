"""Compile every Triton kernel for a CUDA architecture ahead of time, without a GPU.

The interpreter (TRITON_INTERPRET=1) runs the kernels' arithmetic on numpy, but never lowers them:
a kernel can pass every interpreter test and still fail to compile, or compile to code that
spills registers to local memory. This check goes the whole way on any machine: each case calls a
real launcher (layer_norm, rotary, geglu, pool, attention) with CPU tensors of the model's shapes
and dtypes, catches the kernel launch before it reaches a driver, and compiles that kernel with
the launch's own arguments and options for the target (sm_90, Hopper, by default) through TTIR,
TTGIR, LLVM IR and PTX to a cubin with the ptxas that triton ships. It then reads the cubin's
registers, local-memory (spill) bytes and the kernel's shared memory.

    python -m modernbert_embed.kernels.compile_check            # sm_90, all dtypes, a table
    python -m modernbert_embed.kernels.compile_check --arch 80 --json out.json

Exit status 1 when a kernel fails to compile or spills. Must run without TRITON_INTERPRET (the
interpreter replaces the kernels by Python functions that cannot be compiled).

Specialisation follows what a launch does: tensor pointers (16-byte aligned) and integers that are
multiples of 16 carry a divisibility hint, integers equal to 1 become constants.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_POINTER_TYPES = {
    torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16",
    torch.int32: "*i32", torch.int64: "*i64",
}


@dataclass
class Result:
    case: str  # e.g. "attention bf16 window=64"
    kernel: str  # the @triton.jit function's name
    arch: int
    ok: bool
    seconds: float = 0.0
    registers: int | None = None  # per thread
    spill_bytes: int | None = None  # local memory per thread (0 when nothing spills)
    shared_bytes: int | None = None  # shared memory per program
    num_warps: int | None = None
    num_stages: int | None = None
    tensor_cores: str = ""  # "wgmma" (Hopper), "mma" (Ampere-style) or "" (no tl.dot / FMA dots)
    error: str = ""
    constants: dict = field(default_factory=dict)


def _check_not_interpreted():
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError(
            "TRITON_INTERPRET is set: the kernels are Python functions under the interpreter and cannot "
            "be compiled; run this check without it"
        )


@contextlib.contextmanager
def _caught_launches(kernels):
    """Inside the block, `kernel[grid](...)` records (kernel, args, kwargs) instead of launching."""
    calls = []
    for k in kernels:
        def run(*args, grid, warmup, _k=k, **kwargs):  # JITFunction.run's signature
            calls.append((_k, args, kwargs))
        k.run = run  # an instance attribute hides JITFunction.run
    try:
        yield calls
    finally:
        for k in kernels:
            del k.run


def _specialise(kernel, args, kwargs):
    """(signature, constants, attrs, options) for ASTSource / triton.compile, from one launch."""
    names = [p.name for p in kernel.params]
    options = {k: v for k, v in kwargs.items() if k not in names}
    bound = inspect.signature(kernel.fn).bind(*args, **{k: v for k, v in kwargs.items() if k in names})
    bound.apply_defaults()
    signature, constants, attrs = {}, {}, {}
    for i, p in enumerate(kernel.params):
        v = bound.arguments[p.name]
        if p.is_constexpr or v is None:
            signature[p.name], constants[p.name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            if v.dtype not in _POINTER_TYPES:
                raise TypeError(f"{kernel.__name__}: argument {p.name} has unsupported dtype {v.dtype}")
            signature[p.name] = _POINTER_TYPES[v.dtype]
            if v.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            signature[p.name] = "i1"
        elif isinstance(v, int):
            if v == 1:
                signature[p.name], constants[p.name] = "constexpr", 1
                continue
            signature[p.name] = "i32" if -(2**31) <= v < 2**31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            signature[p.name] = "fp32"
        else:
            raise TypeError(f"{kernel.__name__}: cannot specialise argument {p.name}={v!r}")
    return signature, constants, attrs, options


def _tool(name):
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else None


def _resource_usage(cubin: bytes, kernel_name: str):
    """(registers, local bytes) per thread of `kernel_name` in `cubin`, read by cuobjdump."""
    cuobjdump = _tool("cuobjdump")
    if cuobjdump is None:
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
    # "Function <name>:\n REG:<n> STACK:<n> SHARED:<n> LOCAL:<n> ..."
    m = re.search(re.escape(kernel_name) + r"\S*:\s*REG:(\d+)\s+STACK:(\d+)\s+SHARED:\d+\s+LOCAL:(\d+)", text)
    if m is None:
        return None, None
    return int(m.group(1)), int(m.group(2)) + int(m.group(3))


def compile_launch(case, kernel, args, kwargs, arch):
    """Compile one caught launch for sm_<arch>; a Result, ok=False with the error when it fails."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    name = kernel.__name__
    signature, constants, attrs, options = _specialise(kernel, args, kwargs)
    result = Result(case=case, kernel=name, arch=arch, ok=False,
                    num_warps=options.get("num_warps", 4), num_stages=options.get("num_stages", 3),
                    constants={k: v for k, v in constants.items() if isinstance(v, (bool, int, float))})
    t0 = time.perf_counter()
    try:
        src = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as e:  # noqa: BLE001 - every compile failure is a finding to report
        result.error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
        result.seconds = time.perf_counter() - t0
        return result
    result.seconds = time.perf_counter() - t0
    result.ok = True
    result.shared_bytes = int(compiled.metadata.shared)
    result.registers, result.spill_bytes = _resource_usage(compiled.asm["cubin"], name)
    ptx = compiled.asm.get("ptx", "")
    result.tensor_cores = "wgmma" if "wgmma." in ptx else "mma" if "mma.sync" in ptx else ""
    return result


def cases(dtypes, hidden=768, heads=12, intermediate=1152, window=64, max_positions=8192):
    """(case name, launcher thunk) for every kernel variant the model runs, at the model's sizes."""
    from ..batching import pack
    from .attention import attention
    from .geglu import geglu
    from .layer_norm import layer_norm
    from .pooling import pool
    from .rotary import rotary

    head_dim = hidden // heads
    lengths = [300, 129, 64, 1]
    T = sum(lengths)
    batch = pack([[0] * n for n in lengths], range(len(lengths)))
    for dn in dtypes:
        dt = DTYPES[dn]
        x = torch.zeros(T, hidden, dtype=dt)
        w = torch.ones(hidden, dtype=dt)
        qkv = torch.zeros(T, 3, heads, head_dim, dtype=dt)
        tables = torch.zeros(max_positions, head_dim // 2, dtype=torch.float32)
        yield f"layer_norm {dn}", lambda x=x, w=w: layer_norm(x, w, 1e-5)
        yield f"layer_norm {dn} +residual", lambda x=x, w=w: layer_norm(x, w, 1e-5, residual=x.clone())
        yield f"rotary {dn}", lambda qkv=qkv, t=tables: rotary(qkv, batch.positions.to(torch.int32), t, t)
        yield f"geglu {dn}", lambda dt=dt: geglu(torch.zeros(T, 2 * intermediate, dtype=dt))
        yield f"pool {dn} mean normalize", lambda x=x: pool(x, batch, "mean", None, True)
        yield f"pool {dn} mean dim=256", lambda x=x: pool(x, batch, "mean", 256, True)
        yield f"pool {dn} cls", lambda x=x: pool(x, batch, "cls", None, False)
        yield f"attention {dn} full", lambda qkv=qkv: attention(qkv, batch, None, head_dim**-0.5)
        yield f"attention {dn} window={window}", lambda qkv=qkv: attention(qkv, batch, window, head_dim**-0.5)
        yield f"attention {dn} full +rope", lambda qkv=qkv, t=tables: attention(qkv, batch, None, head_dim**-0.5, rope=(t, t))
        yield (f"attention {dn} window={window} +rope",
               lambda qkv=qkv, t=tables: attention(qkv, batch, window, head_dim**-0.5, rope=(t, t)))


def run(arch=90, dtypes=tuple(DTYPES), only=None):
    """Compile every case for sm_<arch>; a list of Results."""
    _check_not_interpreted()
    from . import attention, geglu, layer_norm, pooling, rotary

    kernels = [attention._attention_kernel, geglu._geglu_kernel, layer_norm._layer_norm_kernel,
               pooling._pool_kernel, rotary._rotary_kernel]
    results = []
    for case, launch in cases(dtypes):
        if only and not re.search(only, case):
            continue
        with _caught_launches(kernels) as calls:
            launch()
        if len(calls) != 1:
            results.append(Result(case=case, kernel="?", arch=arch, ok=False,
                                  error=f"expected one kernel launch, caught {len(calls)}"))
            continue
        results.append(compile_launch(case, *calls[0], arch))
    return results


def _table(results):
    lines = [f"{'case':34} {'kernel':20} {'ok':3} {'regs':>5} {'spill':>6} {'smem':>7} {'warps':>5} {'stages':>6} {'mma':>5} {'s':>5}"]
    for r in results:
        def fmt(v):
            return "-" if v is None else str(v)
        lines.append(
            f"{r.case:34} {r.kernel:20} {'yes' if r.ok else 'NO':3} {fmt(r.registers):>5} {fmt(r.spill_bytes):>6} "
            f"{fmt(r.shared_bytes):>7} {fmt(r.num_warps):>5} {fmt(r.num_stages):>6} {r.tensor_cores or '-':>5} {r.seconds:5.1f}"
            + (f"  {r.error}" if r.error else "")
        )
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200, 80: A100)")
    p.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated subset of bf16,fp16,fp32")
    p.add_argument("--only", default=None, help="regular expression: compile only the matching cases")
    p.add_argument("--json", default=None, help="write the results here as JSON")
    a = p.parse_args(argv)
    dtypes = [d.strip() for d in a.dtypes.split(",") if d.strip()]
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        p.error(f"unknown dtype(s) {unknown}; choose from {list(DTYPES)}")
    import triton

    print(f"triton {triton.__version__}, torch {torch.__version__}, target sm_{a.arch}", flush=True)
    results = run(a.arch, dtypes, a.only)
    print(_table(results))
    if a.json:
        with open(a.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=1)
    failed = [r for r in results if not r.ok]
    spilled = [r for r in results if r.ok and r.spill_bytes]
    if failed or spilled:
        print(f"{len(failed)} failed to compile, {len(spilled)} spill registers", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
