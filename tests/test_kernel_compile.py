"""The Triton kernels compile for Hopper (sm_90) through PTX and ptxas, without spilling registers.

The interpreter tests check the kernels' arithmetic but never lower them; these compile every
kernel variant the model launches, from the real launchers' arguments, on any machine (no GPU
needed). They run `modernbert_embed.kernels.compile_check` in a subprocess because the check needs
TRITON_INTERPRET unset, and the rest of the suite sets it when there is no GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

triton = pytest.importorskip("triton")


def _nvidia_backend():
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    return os.path.isdir(bin_dir) and any(n.startswith("ptxas") for n in os.listdir(bin_dir))


pytestmark = pytest.mark.skipif(not _nvidia_backend(), reason="this triton has no NVIDIA backend (ptxas) to compile with")


def _env(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # compile for real, not from a cache
    return env


def _run(args, tmp_path, **kw):
    return subprocess.run([sys.executable, *args], env=_env(tmp_path), capture_output=True, text=True,
                          timeout=600, **kw)


def test_every_kernel_compiles_for_sm90_without_spills(tmp_path):
    out = tmp_path / "compile.json"
    p = _run(["-m", "modernbert_embed.kernels.compile_check", "--arch", "90", "--json", str(out)], tmp_path)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    results = json.loads(out.read_text())
    cases = {r["case"]: r for r in results}
    # every op, in every dtype, in every variant the model launches
    for dt in ("bf16", "fp16", "fp32"):
        for case in ("layer_norm {}", "layer_norm {} +residual", "rotary {}", "geglu {}", "pool {} mean normalize",
                     "pool {} mean dim=256", "pool {} cls", "attention {} full", "attention {} window=64",
                     "attention {} full +rope", "attention {} window=64 +rope"):
            assert case.format(dt) in cases, f"{case.format(dt)} was not compiled"
    for r in results:
        assert r["ok"], r
        assert r["spill_bytes"] == 0, f"{r['case']} spills {r['spill_bytes']} bytes per thread"
        assert r["registers"] is not None and 0 < r["registers"] <= 255, r
    # half-precision attention runs on Hopper's warpgroup tensor cores; fp32 stays off them (exact dots)
    for dt in ("bf16", "fp16"):
        assert cases[f"attention {dt} full"]["tensor_cores"] == "wgmma"
        assert cases[f"attention {dt} window=64"]["tensor_cores"] == "wgmma"
    assert cases["attention fp32 full"]["tensor_cores"] == ""
    # the launch's constants reached the compiler: local layers compile the window arithmetic in
    assert cases["attention bf16 window=64"]["constants"]["HAS_WINDOW"] is True
    assert cases["attention bf16 full"]["constants"]["HAS_WINDOW"] is False
    assert cases["pool bf16 mean dim=256"]["constants"]["DIM"] == 256


def test_check_reports_a_kernel_that_does_not_compile(tmp_path):
    # a dot with K = 8 is below tl.dot's minimum: the check must say so instead of passing
    script = textwrap.dedent("""
        import torch, triton, triton.language as tl
        from modernbert_embed.kernels.compile_check import compile_launch

        @triton.jit
        def bad(a_ptr, out_ptr, K: tl.constexpr):
            r = tl.arange(0, 16)
            k = tl.arange(0, K)
            a = tl.load(a_ptr + r[:, None] * K + k[None, :])
            b = tl.load(a_ptr + k[:, None] * 16 + r[None, :])
            tl.store(out_ptr + r[:, None] * 16 + r[None, :], tl.dot(a, b))

        x = torch.zeros(256, dtype=torch.float16)
        r = compile_launch("bad", bad, (x, x), {"K": 8, "num_warps": 4}, 90)
        print("OK" if r.ok else "FAILED", r.error)
    """)
    path = tmp_path / "bad_kernel.py"  # @triton.jit reads the kernel's source from its file
    path.write_text(script)
    p = _run([str(path)], tmp_path)
    assert p.returncode == 0, p.stderr[-4000:]
    assert p.stdout.startswith("FAILED"), p.stdout
    assert p.stdout.split(None, 1)[1].strip(), "the failure names no error"


def test_check_refuses_to_run_under_the_interpreter(tmp_path):
    env = dict(_env(tmp_path), TRITON_INTERPRET="1")
    p = subprocess.run([sys.executable, "-m", "modernbert_embed.kernels.compile_check", "--only", "geglu"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    assert "TRITON_INTERPRET" in p.stderr
