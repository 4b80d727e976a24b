"""The Triton kernels compile through PTX and ptxas for every architecture the engine serves
(sm_75, 80, 86, 89, 90), without spilling registers.

The interpreter tests check the kernels' arithmetic but never lower them; these compile every
kernel variant the engine launches on each GPU (as the dispatch chooses, with the tiles the
launchers pick there), from the real launchers' arguments, on any machine (no GPU needed). They run `modernbert_embed.compile_check` in a subprocess because the check needs
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


ARCHS = (75, 80, 86, 89, 90)
# What the engine launches: every op in every dtype the GPU runs, the attention where the dispatch
# picks Triton's (from sm_80), bf16 only with native bf16 (from sm_80).
OPS_CASES = ("layer_norm {}", "layer_norm {} +residual", "rotary {}", "geglu {}", "pool {} mean normalize",
             "pool {} mean dim=256", "pool {} cls")
ATTENTION_CASES = ("attention {} full", "attention {} window=64")
# shared memory one program may use, per architecture (CUDA C Programming Guide)
SHARED_LIMIT = {75: 64 * 1024, 80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def _check(args, tmp_path):
    """Run the compile check; (exit status, the JSON report, stdout + stderr)."""
    out = tmp_path / "compile.json"
    p = _run(["-m", "modernbert_embed.compile_check", *args, "--json", str(out)], tmp_path)
    return p.returncode, json.loads(out.read_text()) if out.exists() else None, p.stdout + p.stderr


def _assert_serves(r, arch):
    assert r["ok"] and r["problems"] == [], r
    assert r["spill_bytes"] == 0, f"{r['case']} spills {r['spill_bytes']} bytes per thread on sm_{arch}"
    assert r["registers"] is not None and 0 < r["registers"] <= 255, r
    assert r["shared_bytes"] <= SHARED_LIMIT[arch], r


@pytest.mark.slow
def test_attention_compiles_for_sm86_with_amperes_tiles(tmp_path):
    # one architecture in the fast suite: sm_86 has the least shared memory of the Ampere/Ada GPUs
    rc, report, text = _check(["--arch", "86", "--dtypes", "bf16,fp16", "--only", "attention"], tmp_path)
    assert rc == 0, text[-4000:]
    results = {r["case"]: r for r in report["archs"]["86"]["results"]}
    assert set(results) == {c.format(dt) for dt in ("bf16", "fp16") for c in ATTENTION_CASES}
    for r in results.values():
        _assert_serves(r, 86)
    for dt in ("bf16", "fp16"):
        assert results[f"attention {dt} full"]["tensor_cores"] == "mma"
        # the target architecture chose the tiles: Ampere's full tile runs 8 warps (Hopper's 4)
        full = results[f"attention {dt} full"]
        assert (full["constants"]["BLOCK_M"], full["num_warps"]) == (128, 8)


@pytest.mark.slow
def test_triton_attention_cannot_serve_sm75(tmp_path):
    # the evidence behind the dispatch's torch attention on Turing: forced, the kernel spills and
    # its dots miss the tensor cores, and the check fails
    rc, report, text = _check(["--arch", "75", "--attention", "triton", "--only", "attention fp16 window"], tmp_path)
    assert rc == 1, text[-4000:]
    (r,) = report["archs"]["75"]["results"]
    assert r["ok"] and r["spill_bytes"] > 0
    assert any(p.startswith("spills") for p in r["problems"]), r["problems"]
    assert "half-precision dots without tensor cores" in r["problems"]


@pytest.mark.slow
def test_the_check_refuses_a_dtype_the_gpu_does_not_run(tmp_path):
    rc, report, text = _check(["--arch", "75", "--dtypes", "bf16"], tmp_path)
    assert rc == 2 and report is None
    assert "the engine does not run bf16 on sm_75 (it runs fp16, fp32)" in text


@pytest.mark.slow
def test_every_kernel_the_engine_launches_compiles_on_every_architecture(tmp_path):
    rc, report, text = _check(["--arch", ",".join(map(str, ARCHS))], tmp_path)
    assert rc == 0, text[-6000:]
    for arch in ARCHS:
        part = report["archs"][str(arch)]
        results = {r["case"]: r for r in part["results"]}
        dtypes = ("bf16", "fp16", "fp32") if arch >= 80 else ("fp16", "fp32")
        expected = OPS_CASES + (ATTENTION_CASES if arch >= 80 else ())
        assert set(results) == {c.format(dt) for dt in dtypes for c in expected}, arch
        assert part["torch_ops"] == ([] if arch >= 80 else ["attention"])
        for r in results.values():
            assert r["arch"] == arch
            _assert_serves(r, arch)
        if arch >= 80:
            for dt in ("bf16", "fp16"):
                for case in ATTENTION_CASES:
                    assert results[case.format(dt)]["tensor_cores"] == ("wgmma" if arch >= 90 else "mma"), (arch, case)
            assert results["attention fp32 full"]["tensor_cores"] == ""  # exact fp32 dots stay off them
            # the launch's constants reached the compiler: local layers compile the window arithmetic in
            assert results["attention bf16 window=64"]["constants"]["HAS_WINDOW"] is True
            assert results["attention bf16 full"]["constants"]["HAS_WINDOW"] is False
        assert results["pool fp16 mean dim=256"]["constants"]["DIM"] == 256


@pytest.mark.slow
def test_the_rotary_inside_attention_experiment_compiles_on_ampere_and_hopper(tmp_path):
    rc, report, text = _check(["--arch", "86,90", "--attention", "triton-rope", "--only", "attention|rotary"], tmp_path)
    assert rc == 0, text[-6000:]
    for arch in (86, 90):
        results = {r["case"]: r for r in report["archs"][str(arch)]["results"]}
        # the model never calls rotary there: the attention rotates q and k itself
        assert set(results) == {c.format(dt) + " +rope" for dt in ("bf16", "fp16", "fp32") for c in ATTENTION_CASES}
        for r in results.values():
            assert r["constants"]["ROPE"] is True
            _assert_serves(r, arch)


@pytest.mark.slow
def test_check_reports_a_kernel_that_does_not_compile(tmp_path):
    # a dot with K = 8 is below tl.dot's minimum: the check must say so instead of passing
    script = textwrap.dedent("""
        import torch, triton, triton.language as tl
        from modernbert_embed.compile_check import compile_launch

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
    p = subprocess.run([sys.executable, "-m", "modernbert_embed.compile_check", "--only", "geglu"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    assert "TRITON_INTERPRET" in p.stderr
