"""The device check (benchmarks/device_check.py) on the CPU: its dry run end to end, and that a
broken step fails the run instead of passing quietly, so that a typo in the driver or a renamed
module shows here and not on a GPU machine booked for it."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT

DRIVER = ROOT / "benchmarks" / "device_check.py"


@pytest.fixture(scope="module")
def dc():
    spec = importlib.util.spec_from_file_location("device_check", DRIVER)
    module = importlib.util.module_from_spec(spec)
    sys.modules["device_check"] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("device_check", None)


def run_driver(root: Path, out: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-P", str(root / "benchmarks" / "device_check.py"), "--dry-run",
                           "--out", str(out), *args], cwd=root, capture_output=True, text=True, timeout=timeout)


def copy_checkout(dest: Path) -> Path:
    """What the device check reads of the checkout (package, kernels, weights, benchmarks, tests)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", ".pytest_cache")
    for name in ("modernbert_embed", "kernels", "weights", "benchmarks", "tests"):
        shutil.copytree(ROOT / name, dest / name, ignore=ignore, symlinks=True)
    shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")
    return dest


def summary_is_last(stdout: str) -> list[str]:
    """The summary table's lines; asserts that nothing is printed after it."""
    tail = stdout[stdout.rindex("=== summary ==="):].splitlines()
    assert tail[-1].startswith("device check (dry run):"), tail[-3:]
    return tail


def test_budgets_fit_in_eight_minutes(dc):
    assert [name for name, _, _ in dc.STEPS] == ["install", "environment", "checks", "bench", "serve", "ops"]
    assert all(budget > dc.GRACE_S for _, budget, _ in dc.STEPS)
    assert dc.TOTAL_BUDGET_S == sum(b for _, b, _ in dc.STEPS) <= 450 < 480
    # the budgets in the docstring are the ones used
    for name, budget, _ in dc.STEPS:
        assert re.search(rf"^\s+{name}\s+{budget}\s", dc.__doc__, re.M), name


def test_make_runs_the_driver(tmp_path):
    if shutil.which("make") is None:
        pytest.skip("no make")
    # run under `make test`, the parent's MAKEFLAGS (print-directory, -j, ...) would leak into these makes
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")}
    cmd = ["make", "--no-print-directory", "-n", "device-check"]
    dry = subprocess.run([*cmd, "DRY_RUN=1"], cwd=ROOT, env=env, capture_output=True, text=True)
    real = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert dry.returncode == 0 and real.returncode == 0, dry.stderr + real.stderr
    assert re.search(r"-P benchmarks/device_check\.py --dry-run\s*$", dry.stdout.strip()), dry.stdout
    assert "--dry-run" not in real.stdout and "benchmarks/device_check.py" in real.stdout
    # every phony target has a rule (a phony name without one does nothing, silently)
    makefile = (ROOT / "Makefile").read_text()
    phony = re.search(r"^\.PHONY:(.*)$", makefile, re.M).group(1).split()
    for target in phony:
        assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"{target} is phony and has no rule"


def test_fallback_tree_imports_the_package_without_the_root(dc, tmp_path):
    tree = dc.fallback_tree(ROOT)
    try:
        env = {"PATH": "/usr/bin:/bin", "PYTHONSAFEPATH": "1", "PYTHONPATH": str(tree), "PYTHONNOUSERSITE": "1"}
        ok, why = dc.import_check(sys.executable, env)
        assert ok, why
        assert str(tree) in why
        r = subprocess.run([sys.executable, "-c", "import modernbert_embed.weights as w, modernbert_embed.kernels as k;"
                            "print(w.__file__); print(k.__file__)"], cwd=tmp_path, env=env, capture_output=True,
                           text=True)
        assert r.returncode == 0, r.stderr
        weights, kernels = r.stdout.split()
        assert Path(weights).resolve() == ROOT / "weights" / "__init__.py"
        assert Path(kernels).resolve() == ROOT / "kernels" / "__init__.py"
        assert not (tree / "kernels").exists()  # never a top-level `kernels` of ours
    finally:
        shutil.rmtree(tree)


def test_a_step_cut_at_its_budget_keeps_what_it_wrote(dc, tmp_path, monkeypatch):
    monkeypatch.setattr(dc, "GRACE_S", 1)
    script = ("import sys, time, pathlib; pathlib.Path(sys.argv[1]).write_text('measured'); print('row 1', flush=True);"
              "time.sleep(120)")
    for kind, words, fails in (("check", "TIMEOUT", True), ("bench", "CUT", False)):
        mark = tmp_path / f"{kind}.txt"
        parts = [dc.Part("slow", [sys.executable, "-c", script, str(mark)]),
                 dc.Part("quick", [sys.executable, "-c", "pass"])]
        t0 = time.monotonic()
        dc.run_parts(parts, tmp_path, None, time.monotonic() + 3, kind)
        assert time.monotonic() - t0 < 30
        slow, quick = parts
        assert slow.status.startswith(words) and "kept what it" in slow.status, slow.status
        assert dc.status_of(slow.rc, True, kind)[1] is fails
        assert quick.status == "ok"
        assert mark.read_text() == "measured" and "row 1" in (tmp_path / "slow.log").read_text()


def test_a_missing_script_fails_the_run_and_the_summary_still_prints(tmp_path):
    root = copy_checkout(tmp_path / "checkout")
    (root / "benchmarks" / "bench_ops_gpu.py").rename(root / "benchmarks" / "bench_ops_gpu_renamed.py")
    r = run_driver(root, tmp_path / "out", "--only", "ops", timeout=300)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    table = summary_is_last(r.stdout)
    assert any(line.startswith("| ops | FAIL") for line in table), table
    assert "FAILED: ops" in table[-1]
    steps = {s["name"]: s for s in json.loads((tmp_path / "out" / "summary.json").read_text())["steps"]}
    assert steps["install"]["status"] == "ok (fallback)" and not steps["install"]["failed"]
    assert steps["ops"]["failed"]


def test_renamed_probe_imports_fail_the_environment_step(dc, tmp_path):
    """Every name the probe imports (PROBE_IMPORTS), renamed where it is defined: the probe says
    which and the run fails."""
    root = copy_checkout(tmp_path / "checkout")
    for key, (module, name) in dc.PROBE_IMPORTS.items():
        parts = module.split(".")
        rel = Path(*(["kernels"] + parts[2:] if parts[1] == "kernels" else parts)).with_suffix(".py")
        source = (root / rel).read_text()
        assert f"def {name}(" in source, f"{name} is not defined in {rel}: update PROBE_IMPORTS"
        (root / rel).write_text(source.replace(f"def {name}(", f"def {name}_renamed("))
    r = run_driver(root, tmp_path / "out", "--only", "environment", timeout=300)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    table = summary_is_last(r.stdout)
    assert any(line.startswith("| environment | FAIL") for line in table), table
    probe = (tmp_path / "out" / "probe.log").read_text()
    for key in dc.PROBE_IMPORTS:
        assert f"{key}: NOT IMPORTABLE" in probe, probe


def test_dry_run_runs_every_step(tmp_path):
    """`make device-check DRY_RUN=1`: every step on the CPU with tiny shapes (about 30 s)."""
    out = tmp_path / "out"
    r = run_driver(ROOT, out)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    table = summary_is_last(r.stdout)
    record = json.loads((out / "summary.json").read_text())
    steps = {s["name"]: s for s in record["steps"]}
    assert list(steps) == ["install", "environment", "checks", "bench", "serve", "ops"] and not record["not_yet_run"]
    for name, step in steps.items():
        assert not step["failed"] and step["status"].startswith("ok"), (name, step)
        assert any(line.startswith(f"| {name} | ok") for line in table), (name, table)
    parts = {p["name"]: p["status"] for s in record["steps"] for p in s["parts"]}
    assert set(parts) == {"nvidia-smi", "probe", "pytest-gpu", "kernel-tests", "api-tests", "cli-tests", "parity",
                          "bench_gpu", "bench_multivector", "bench_serve", "bench_ops_gpu"}
    assert parts["probe"] == "ok" and parts["parity"] == "ok" and parts["pytest-gpu"] in ("ok", "no tests collected")
    # what each script measured, written where the summary says
    cases = json.loads((out / "parity_gpu.json").read_text())["cases"]
    assert [(c["case"], c["status"]) for c in cases] == [("fp32:auto", "PASS"), ("ce:bf16:auto", "PASS")]
    rows = json.loads((out / "bench_gpu.json").read_text())["rows"]
    ours = {r["corpus"] for r in rows if r["engine"] == "ours" and not r["error"]}
    assert {"mixed", "rerank1x24", "rerank4x4", "classify"} <= ours, rows  # the embedding, rerank and classify rows
    assert any(row["engine"] == "ours" and not row["error"]
               for row in json.loads((out / "bench_multivector.json").read_text())["rows"])
    serve = json.loads((out / "bench_serve.json").read_text())
    assert serve["complete"] and len(serve["rows"]) == 2
    assert json.loads((out / "bench_ops_gpu.json").read_text())["ops"]
    for name in ("pytest-gpu.xml", "kernel-tests.log", "api-tests.log", "cli-tests.log", "parity.md", "serve.md",
                 "ops.md", "summary.md"):
        assert (out / name).is_file(), name
    assert "collected" in (out / "kernel-tests.log").read_text()
    for name in ("parity.md", "serve.md", "ops.md", "results.md", "multivector.md"):  # each table once, finished
        text = (out / name).read_text()
        assert text.count("\n### ") == 1 and "(partial" not in text, (name, text)


def test_a_failed_pip_install_falls_back_and_does_not_fail_the_run(tmp_path):
    """No registry and no build backend on the machine: pip fails, the package imports through the
    fallback's links, the probe runs on it, and the run exits 0."""
    import os

    env = dict(os.environ, PIP_CONSTRAINT=str(tmp_path / "missing-constraints.txt"))  # pip stops at once
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-P", str(DRIVER), "--install", "pip", "--dry-run", "--only", "environment",
                        "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    steps = {s["name"]: s for s in json.loads((out / "summary.json").read_text())["steps"]}
    install = steps["install"]
    assert install["status"] == "ok (fallback)" and not install["failed"]
    assert "pip install -e . failed" in install["note"] and "imported through links" in install["note"]
    assert "fallback: " in (out / "install.log").read_text()
    probe = (out / "probe.log").read_text()
    assert re.search(r"^modernbert_embed \S+ from \S*/mbe-device-check-\w+/modernbert_embed/__init__\.py$", probe,
                     re.M), probe
    assert steps["environment"]["status"] == "ok"
