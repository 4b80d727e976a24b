"""Compile every Triton kernel the engine launches on a CUDA architecture, ahead of time, without a GPU.

The interpreter (TRITON_INTERPRET=1) runs the kernels' arithmetic on numpy, but never lowers them:
a kernel can pass every interpreter test and still fail to compile, or compile to code that
spills registers to local memory. This check goes the whole way on any machine. For sm_N it asks
the dispatch what a GPU of that architecture runs (`ops.ops_for_arch(N)`, in each dtype of
`devices.gpu_dtypes(N)`: no bf16 before sm_80, no Triton attention where torch's is chosen), calls
each chosen op as the model does with CPU tensors of the base model's shapes, catches the kernel
launch before it reaches a driver (the launcher has picked sm_N's tiles: `_arch.target_arch`), and
compiles that kernel with the launch's own arguments and options through TTIR, TTGIR, LLVM IR and
PTX to a cubin with the ptxas that triton ships. It then reads the cubin's registers,
local-memory (spill) bytes, the kernel's shared memory and whether its dots use tensor cores.

    python -m modernbert_embed.compile_check                  # sm_90, a table
    python -m modernbert_embed.compile_check --arch 75,80,86,89,90 --json out.json
    python -m modernbert_embed.compile_check --arch 90 --attention triton-rope  # an experiment

Exit status 1 when a variant cannot serve its GPU (`problems`): it fails to compile, spills,
needs more shared memory than the GPU gives a program, or runs half-precision attention dots off
the tensor cores. Must run without TRITON_INTERPRET (the interpreter replaces the kernels by
Python functions that cannot be compiled).

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
# Shared memory one program may use (the opt-in maximum per thread block, CUDA C Programming
# Guide, "Technical Specifications per Compute Capability"): a kernel needing more compiles but
# fails at launch.
MAX_SHARED = {70: 98304, 75: 65536, 80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448}
# The attention choices whose kernels this check compiles (the others are torch's own kernels).
CHECKED_ATTENTION = ("auto", "triton", "triton-rope", "torch")
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
    problems: list = field(default_factory=list)  # why this variant cannot serve the GPU (see `problems`)


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


def cases(ops, dtypes, hidden=768, heads=12, intermediate=1152, window=64, max_positions=8192):
    """(case name, op name, thunk) for every kernel variant the model and its pooling launch with
    `ops`, at the base model's sizes: each thunk calls the op as the model does."""
    from .batching import pack

    head_dim = hidden // heads
    scale = head_dim**-0.5
    lengths = [300, 129, 64, 1]
    T = sum(lengths)
    batch = pack([[0] * n for n in lengths], range(len(lengths)))
    tables = torch.zeros(max_positions, head_dim // 2, dtype=torch.float32)
    # with rotary inside attention the model gives attention the tables and never calls rotary
    rope = {"rope": (tables, tables)} if ops.fused_rotary else {}
    plus_rope = " +rope" if ops.fused_rotary else ""
    for dn in dtypes:
        dt = DTYPES[dn]
        x = torch.zeros(T, hidden, dtype=dt)
        w = torch.ones(hidden, dtype=dt)
        qkv = torch.zeros(T, 3, heads, head_dim, dtype=dt)
        yield f"layer_norm {dn}", "layer_norm", lambda x=x, w=w: ops.layer_norm(x, w, 1e-5)
        yield f"layer_norm {dn} +residual", "layer_norm", lambda x=x, w=w: ops.layer_norm(x, w, 1e-5, x.clone())
        if not ops.fused_rotary:
            yield f"rotary {dn}", "rotary", lambda qkv=qkv: ops.rotary(qkv, batch.positions, tables, tables)
        yield f"geglu {dn}", "geglu", lambda dt=dt: ops.geglu(torch.zeros(T, 2 * intermediate, dtype=dt))
        yield f"pool {dn} mean normalize", "pool", lambda x=x: ops.pool(x, batch, "mean", None, True)
        yield f"pool {dn} mean dim=256", "pool", lambda x=x: ops.pool(x, batch, "mean", 256, True)
        yield f"pool {dn} cls", "pool", lambda x=x: ops.pool(x, batch, "cls", None, False)
        yield (f"attention {dn} full{plus_rope}", "attention",
               lambda qkv=qkv: ops.attention(qkv, batch, None, scale, **rope))
        yield (f"attention {dn} window={window}{plus_rope}", "attention",
               lambda qkv=qkv: ops.attention(qkv, batch, window, scale, **rope))


def problems(result: Result) -> list[str]:
    """What keeps a compiled variant from serving its architecture: no compile, spills, more shared
    memory than the GPU gives one program, half-precision attention dots off the tensor cores."""
    if not result.ok:
        return [f"does not compile: {result.error}"]
    found = []
    if result.registers is None:
        found.append("registers and spills unknown (no cuobjdump in this triton)")
    elif result.spill_bytes:
        found.append(f"spills {result.spill_bytes} bytes per thread")
    limit = MAX_SHARED.get(result.arch)
    if limit is not None and result.shared_bytes > limit:
        found.append(f"needs {result.shared_bytes} bytes of shared memory, sm_{result.arch} gives at most {limit}")
    if result.kernel == "_attention_kernel" and result.constants.get("IEEE_DOT") is False and not result.tensor_cores:
        found.append("half-precision dots without tensor cores")
    return found


def torch_ops(arch: int, attention: str = "auto") -> list[str]:
    """The ops the dispatch gives torch's implementation on sm_<arch>: nothing of theirs to compile."""
    from . import ops as dispatch

    chosen = dispatch.ops_for_arch(arch, attention=attention)
    return [n for n in dispatch.OP_NAMES if getattr(chosen, n) is getattr(dispatch.TORCH_OPS, n)]


def gpu_dtype_names(arch: int) -> list[str]:
    """The dtypes the engine runs on sm_<arch> (no bf16 before sm_80), by their names here."""
    from .devices import gpu_dtypes

    return [n for n, dt in DTYPES.items() if dt in gpu_dtypes(arch)]


def run(arch=90, dtypes=None, only=None, attention="auto"):
    """Compile, for sm_<arch>, every kernel variant the engine launches on such a GPU: the ops
    `ops.ops_for_arch(arch, attention=...)` picks, in each dtype the dispatch runs there (or the
    `dtypes` named, which must be among them), with the tiles the launchers choose for sm_<arch>.
    A list of Results, each with its `problems`."""
    _check_not_interpreted()
    from . import ops as dispatch
    from .kernels import attention as attention_mod, geglu, layer_norm, pooling, rotary
    from .kernels._arch import target_arch

    allowed = gpu_dtype_names(arch)
    dtypes = allowed if dtypes is None else list(dtypes)
    refused = [d for d in dtypes if d not in allowed]
    if refused:
        raise ValueError(f"the engine does not run {', '.join(refused)} on sm_{arch} (it runs {', '.join(allowed)})")
    chosen = dispatch.ops_for_arch(arch, attention=attention)
    on_torch = torch_ops(arch, attention)
    kernels = [attention_mod._attention_kernel, geglu._geglu_kernel, layer_norm._layer_norm_kernel,
               pooling._pool_kernel, rotary._rotary_kernel]
    results = []
    with target_arch(arch):  # the launchers pick sm_<arch>'s tiles for these CPU tensors
        for case, op, launch in cases(chosen, dtypes):
            if op in on_torch or (only and not re.search(only, case)):
                continue
            with _caught_launches(kernels) as calls:
                launch()
            if len(calls) != 1:
                result = Result(case=case, kernel="?", arch=arch, ok=False,
                                error=f"expected one kernel launch, caught {len(calls)}")
            else:
                result = compile_launch(case, *calls[0], arch)
            result.problems = problems(result)
            results.append(result)
    return results


def _table(results):
    lines = [f"{'case':34} {'kernel':20} {'ok':3} {'regs':>5} {'spill':>6} {'smem':>7} {'warps':>5} {'stages':>6} {'tiles':>9} {'mma':>5} {'s':>5}"]
    for r in results:
        def fmt(v):
            return "-" if v is None else str(v)
        tiles = f"{r.constants['BLOCK_M']}x{r.constants['BLOCK_N']}" if "BLOCK_N" in r.constants else "-"
        lines.append(
            f"{r.case:34} {r.kernel:20} {'yes' if r.ok and not r.problems else 'NO':3} {fmt(r.registers):>5} "
            f"{fmt(r.spill_bytes):>6} {fmt(r.shared_bytes):>7} {fmt(r.num_warps):>5} {fmt(r.num_stages):>6} "
            f"{tiles:>9} {r.tensor_cores or '-':>5} {r.seconds:5.1f}"
            + (f"  {'; '.join(r.problems)}" if r.problems else "")
        )
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="90",
                   help="compute capability x 10, or several comma-separated (75: T4, 80: A100, 86: A10, "
                        "89: L4, 90: H100/H200)")
    p.add_argument("--dtypes", default=None,
                   help="comma-separated subset of bf16,fp16,fp32 (default: every dtype the engine runs there)")
    p.add_argument("--attention", default="auto", choices=CHECKED_ATTENTION,
                   help="the attention choice to compile (default: the dispatch's own; "
                        "triton-rope: the experiment rotating q and k inside the kernel)")
    p.add_argument("--only", default=None, help="regular expression: compile only the matching cases")
    p.add_argument("--json", default=None, help="write the results here as JSON")
    a = p.parse_args(argv)
    try:
        archs = [int(v) for v in a.arch.split(",") if v.strip()]
    except ValueError:
        p.error(f"--arch takes compute capabilities x 10 such as 80 or 75,90, got {a.arch!r}")
    dtypes = None if a.dtypes is None else [d.strip() for d in a.dtypes.split(",") if d.strip()]
    unknown = [d for d in dtypes or () if d not in DTYPES]
    if unknown:
        p.error(f"unknown dtype(s) {unknown}; choose from {list(DTYPES)}")
    import triton

    report = {"triton": triton.__version__, "torch": torch.__version__, "archs": {}}
    bad = 0
    for arch in archs:
        print(f"triton {triton.__version__}, torch {torch.__version__}, target sm_{arch}", flush=True)
        try:
            results = run(arch, dtypes, a.only, a.attention)
        except ValueError as e:
            p.error(str(e))
        on_torch = torch_ops(arch, a.attention)
        print(_table(results))
        if on_torch:
            print(f"torch's {', '.join(on_torch)} run{'s' if len(on_torch) == 1 else ''} on sm_{arch} "
                  "(ops.ops_for_arch): nothing of ours to compile there")
        failing = [r for r in results if r.problems]
        if failing:
            print(f"sm_{arch}: {len(failing)} of {len(results)} variants cannot serve this GPU", file=sys.stderr)
        bad += len(failing)
        report["archs"][str(arch)] = {"dtypes": dtypes or gpu_dtype_names(arch), "torch_ops": on_torch,
                                      "results": [asdict(r) for r in results]}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
