"""Every GPU check in one run, for a machine with a CUDA GPU and torch, triton, transformers and
sentence-transformers already installed, and no package registry.

    python3 benchmarks/device_check.py             # or: make device-check
    python3 benchmarks/device_check.py --dry-run   # or: make device-check DRY_RUN=1 (the CPU, tiny shapes)

Steps, in order, each under its own time budget (seconds; together 450, under 8 minutes):

    install       35  pip install --no-deps --no-build-isolation --no-index -e . ; when that fails, a
                      folder of links that holds the package as it installs (see `fallback_tree`)
    environment   20  the GPU, the versions, what the installed torch offers (`probe`)
    checks       150  side by side: the GPU-marked tests, the kernel tests, the API and CLI tests
                      with their models on the GPU, parity against transformers
    bench        125  the model benchmark against transformers and sentence-transformers
    serve         70  the HTTP server under load
    ops           50  op by op, attention against torch's kernels, a profile, the tile sweep

A step that outlives its budget is stopped (SIGTERM, then SIGKILL 10 s later) and says so; the
scripts it runs write their results as they go (row by row, case by case, level by level) and
get time budgets of their own that end them before the step's, so a step cut short keeps what it
measured. After each step its outcome is added to summary.json / summary.md; every log, JSON and
markdown table lands in the output folder (--out; default ./device-check-out). Where OUT is set
(a device machine's return folder) the output folder is ./device-check-out and OUT receives,
again after every step, just two files: device-check.tar.gz (the whole output folder) and
summary.md.

Exit status: 1 when a check failed (a test, parity, the probe, the install, a benchmark script
that errored, or a correctness step cut by its budget), else 0. A benchmark cut by its budget, a
step that cannot run here (no GPU in a dry run, no serve extra) and the install's fallback are
reported, not failed. The summary table is printed last.

Every child runs with PYTHONSAFEPATH=1: the checkout's root must never be on sys.path, where its
top-level kernels/ (installed as modernbert_embed.kernels) would shadow PyPI's `kernels`, which
transformers imports.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GRACE_S = 10  # between SIGTERM and SIGKILL, inside the step's budget

# (name, budget in seconds, kind). "check": a failure or a cut fails the run; "bench": a cut is
# reported, not failed.
STEPS = [
    ("install", 35, "check"),
    ("environment", 20, "check"),
    ("checks", 150, "check"),
    ("bench", 125, "bench"),
    ("serve", 70, "bench"),
    ("ops", 50, "bench"),
]
# Of the bench step, the seconds left to the late-interaction rows (bench_multivector.py) after bench_gpu.
MV_BENCH_S = 35
TOTAL_BUDGET_S = sum(b for _, b, _ in STEPS)
assert TOTAL_BUDGET_S <= 450, "the device check must end within 8 minutes, start-up and summary included"

# The one place that names where the environment probe's imports live: (module, name). When a
# module moves, change it here (tests/test_device_check.py breaks these on purpose).
PROBE_IMPORTS = {
    "triton_ops": ("modernbert_embed.ops", "triton_ops"),
    "varlen_available": ("modernbert_embed.torch_varlen", "varlen_available"),
    "varlen_supports_window": ("modernbert_embed.torch_varlen", "varlen_supports_window"),
}


# ----------------------------------------------------------------------------- the probe
def probe() -> int:
    """Print (and return as JSON on the last line) the machine and what it offers; exit status 1
    when one of PROBE_IMPORTS cannot be imported (a renamed module or function)."""
    import importlib
    import importlib.metadata as md
    import platform

    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "versions": {},
            "imports": {}}
    for dist in ("triton", "transformers", "sentence-transformers", "tokenizers", "safetensors", "numpy", "pytest",
                 "pytest-xdist", "starlette", "uvicorn", "modernbert-embed"):
        try:
            info["versions"][dist] = md.version(dist)
        except md.PackageNotFoundError:
            info["versions"][dist] = None
    import modernbert_embed

    info["modernbert_embed"] = modernbert_embed.__file__
    info["modernbert_embed_version"] = modernbert_embed.__version__
    failed = []
    found = {}
    for key, (module, name) in PROBE_IMPORTS.items():
        try:
            found[key] = getattr(importlib.import_module(module), name)
            info["imports"][key] = f"{module}.{name}"
        except (ImportError, AttributeError) as e:
            info["imports"][key] = f"NOT IMPORTABLE: {type(e).__name__}: {e}"
            failed.append(key)
    if "triton_ops" in found:
        try:
            info["triton_ops"] = found["triton_ops"]().name
        except Exception as e:  # noqa: BLE001 - no triton here is a finding, not a broken probe
            info["triton_ops"] = f"unavailable: {type(e).__name__}: {e}"
    if "varlen_available" in found and "varlen_supports_window" in found:
        info["torch_varlen"] = {"available": found["varlen_available"](),
                                "window_size": found["varlen_supports_window"]()}
    print(f"python {info['python']} | torch {info['torch']} | cuda {info['cuda']} | "
          f"{info['gpu'] or 'NO CUDA DEVICE'}")
    for dist, v in info["versions"].items():
        print(f"{dist} {v or 'NOT INSTALLED'}")
    print(f"modernbert_embed {info['modernbert_embed_version']} from {info['modernbert_embed']}")
    for key, where in info["imports"].items():
        print(f"{key}: {where}")
    print(f"triton ops: {info.get('triton_ops')}; torch varlen attention: {info.get('torch_varlen')}")
    print(json.dumps(info))
    return 1 if failed else 0


# ----------------------------------------------------------------------------- running parts
@dataclass
class Part:
    name: str
    cmd: list[str] | None  # None: not run here, `note` says why
    note: str = ""
    status: str = ""
    seconds: float = 0.0
    rc: int | None = None
    log: str = ""
    after: str = ""  # starts when the part of this name has ended (two GPU benchmarks never overlap)


@dataclass
class StepResult:
    name: str
    kind: str
    budget_s: int
    status: str = ""
    seconds: float = 0.0
    failed: bool = False
    note: str = ""
    parts: list[Part] = field(default_factory=list)


def status_of(rc: int | None, cut: bool, kind: str) -> tuple[str, bool]:
    """(words for the summary, whether it fails the run)."""
    if cut:
        return ("TIMEOUT (cut at its budget; kept what it wrote)", True) if kind == "check" else \
            ("CUT (at its budget; kept what it measured)", False)
    if rc == 0:
        return "ok", False
    if rc == 5:  # pytest: no tests collected
        return "no tests collected", False
    return f"FAIL (rc {rc})", True


def run_parts(parts: list[Part], dest: Path, env: dict, deadline: float, kind: str) -> None:
    """Start every part at once (each in its own process group, output in dest/<name>.log), wait
    until all end or the deadline; a part still running then gets SIGTERM and, GRACE_S later,
    SIGKILL. A part with `after` starts when that part has ended instead. Fills each part's status."""
    running = {}
    waiting = [p for p in parts if p.after and p.cmd is not None]

    def start(part):
        part.log = f"{part.name}.log"
        if part.cmd is None:
            (dest / part.log).write_text(part.note + "\n")
            part.status = f"not run ({part.note})"
            return
        log = open(dest / part.log, "w")
        log.write("$ " + " ".join(part.cmd) + "\n")
        log.flush()
        try:
            proc = subprocess.Popen(part.cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        except OSError as e:
            log.write(f"cannot start: {e}\n")
            log.close()
            part.rc, part.status = 127, f"FAIL (cannot start: {e})"
            return
        running[part.name] = (part, proc, log, time.monotonic())

    for part in parts:
        if part not in waiting:
            start(part)
    term_at = deadline - GRACE_S
    cut = set()
    while running or waiting:
        now = time.monotonic()
        for part in [p for p in waiting if p.after not in running]:
            waiting.remove(part)
            if now < term_at:
                start(part)
            else:
                part.log = f"{part.name}.log"
                (dest / part.log).write_text(f"not started: {part.after} used the step's budget\n")
                part.status = f"not run ({part.after} used the step's budget)"
        for name, (part, proc, log, t0) in list(running.items()):
            if proc.poll() is not None:
                part.rc, part.seconds = proc.returncode, round(time.monotonic() - t0, 1)
                log.close()
                del running[name]
            elif now >= deadline:
                _signal_group(proc, signal.SIGKILL)
            elif now >= term_at and name not in cut:
                cut.add(name)
                _signal_group(proc, signal.SIGTERM)
        time.sleep(0.2)
    for part in parts:
        if part.cmd is not None and not part.status:
            part.status, _ = status_of(part.rc, part.name in cut, kind)
            if part.note:
                part.status += f"; {part.note}"


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# ----------------------------------------------------------------------------- install
def fallback_tree(root: Path) -> Path:
    """A folder holding `modernbert_embed` as it installs: links to the files of ./modernbert_embed,
    with kernels -> ./kernels and weights -> ./weights. Put on PYTHONPATH it imports the package
    from this checkout without pip, and without the checkout's root on sys.path."""
    tree = Path(tempfile.mkdtemp(prefix="mbe-device-check-"))
    pkg = tree / "modernbert_embed"
    pkg.mkdir()
    for entry in (root / "modernbert_embed").iterdir():
        if entry.name != "__pycache__":
            (pkg / entry.name).symlink_to(entry)
    for sub in ("kernels", "weights"):
        (pkg / sub).symlink_to(root / sub, target_is_directory=True)
    return tree


IMPORT_CHECK = (
    "import json, sys, modernbert_embed, modernbert_embed.kernels, modernbert_embed.weights\n"
    "print(json.dumps({'file': modernbert_embed.__file__, 'version': modernbert_embed.__version__,\n"
    "                  'kernels': modernbert_embed.kernels.__file__, 'path': sys.path}))\n"
)


def import_check(py: str, env: dict, timeout: float = 10) -> tuple[bool, str]:
    """Whether `modernbert_embed` (with its kernels and weights) imports from this checkout in a child
    started in a folder outside it, with the checkout's root off sys.path."""
    with tempfile.TemporaryDirectory() as cwd:
        try:
            r = subprocess.run([py, "-c", IMPORT_CHECK], cwd=cwd, env=env, capture_output=True, text=True,
                               timeout=timeout)
        except subprocess.TimeoutExpired:
            return False, f"importing modernbert_embed took over {timeout:g} s"
    if r.returncode != 0:
        return False, (r.stderr.strip().splitlines() or ["no output"])[-1]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    where = Path(got["file"]).resolve()
    if where != ROOT / "modernbert_embed" / "__init__.py":
        return False, f"modernbert_embed imports from {got['file']}, not from this checkout"
    if any(Path(p or ".").resolve() == ROOT for p in got["path"]):
        return False, "the checkout's root is on sys.path"
    return True, f"modernbert_embed {got['version']} from {got['file']}"


# ----------------------------------------------------------------------------- the steps
class Run:
    def __init__(self, args):
        self.args = args
        self.dry = args.dry_run
        self.py = args.python
        self.dest = args.out
        self.tree: Path | None = None
        self.results: list[StepResult] = []
        self.started = time.monotonic()
        self.env = {**os.environ, "PYTHONSAFEPATH": "1", "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1",
                    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                    "TOKENIZERS_PARALLELISM": "false", "MODERNBERT_EMBED_COMMIT": args.commit}
        self.env.pop("MODERNBERT_EMBED_TEST_DEVICE", None)

    def script(self, name: str, *args: str) -> list[str]:
        return [self.py, str(ROOT / "benchmarks" / name), *args]

    def pytest(self, name: str, *args: str) -> list[str]:
        return [self.py, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider",
                f"--junitxml={self.dest / (name + '.xml')}", *args]

    # each step returns its parts (run side by side) and a note
    def step_install(self, budget):
        ok, why = False, ""
        # within the budget: pip up to budget - 20 s; the import check after it leaves 8 s for the
        # fallback's (the first import of torch on a fresh machine can take a while)
        deadline = time.monotonic() + budget
        if self.args.install == "pip":
            cmd = [self.py, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-e", "."]
            try:
                r = subprocess.run(cmd, cwd=ROOT, env=self.env, capture_output=True, text=True,
                                   timeout=max(5, budget - 20))
                (self.dest / "install.log").write_text(r.stdout + r.stderr)
                if r.returncode == 0:
                    ok, why = import_check(self.py, self.env, timeout=max(5, deadline - time.monotonic() - 8))
                    if ok:
                        with open(self.dest / "install.log", "a") as f:
                            f.write(why + "\n")
                        return "ok", False, "pip install -e ."
                why = why or f"pip install -e . failed (rc {r.returncode}): " + \
                    (r.stderr.strip().splitlines() or ["no output"])[-1][:200]
            except subprocess.TimeoutExpired:
                why = f"pip install -e . took over {max(5, budget - 20)} s"
                (self.dest / "install.log").write_text(why + "\n")
        else:
            why = "pip install not tried (--install fallback" + (", the dry run's default)" if self.dry else ")")
            (self.dest / "install.log").write_text(why + "\n")
        self.tree = fallback_tree(ROOT)
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(self.tree), self.env.get("PYTHONPATH")]))
        ok, got = import_check(self.py, self.env, timeout=max(5, deadline - time.monotonic()))
        with open(self.dest / "install.log", "a") as f:
            f.write(f"fallback: {self.tree} on PYTHONPATH: {got}\n")
        if not ok:
            return f"FAIL (the fallback does not import: {got})", True, why
        return "ok (fallback)", False, f"{why}; imported through links (install.log)"

    def step_environment(self, budget):
        parts = []
        if shutil.which("nvidia-smi"):
            parts.append(Part("nvidia-smi", ["nvidia-smi", "--query-gpu=name,memory.total,driver_version,"
                                             "clocks.max.sm,power.limit", "--format=csv"]))
        else:
            parts.append(Part("nvidia-smi", None, "no nvidia-smi on this machine" +
                              (" (dry run)" if self.dry else "")))
        parts.append(Part("probe", [self.py, str(Path(__file__).resolve()), "--probe"]))
        return parts

    def step_checks(self, budget):
        cuda_env = "cuda"
        parts = [Part("pytest-gpu", self.pytest("pytest-gpu", "-m", "gpu"))]
        suites = {"kernel-tests": ["-m", "not gpu", "tests/test_kernels.py", "tests/test_attention.py",
                                   "tests/test_dispatch.py", "tests/test_reference.py"],
                  "api-tests": ["-m", "not slow", "tests/test_api.py", "tests/test_chunking.py",
                                "tests/test_quantize.py"],
                  "cli-tests": ["-m", "not slow", "tests/test_cli.py"]}
        if not self.dry and _has(self.py, "xdist", self.env):
            suites["kernel-tests"] = ["-n", "6"] + suites["kernel-tests"]
        for name, args in suites.items():
            if self.dry:  # on the GPU only: here their collection (every import) stands for them
                parts.append(Part(name, self.pytest(name, "--collect-only", *args), "collected only (dry run)"))
            else:
                parts.append(Part(name, self.pytest(name, *args)))
        parity = ["--out", str(self.dest / "parity_gpu.json"), "--markdown", str(self.dest / "parity.md")]
        if self.dry:
            parity = ["--device", "cpu", "--config", "small", "--long-len", "130", "--cases", "fp32:auto",
                      "ce:bf16:auto", *parity]
        parts.append(Part("parity", self.script("parity_gpu.py", *parity)))
        # the API and CLI tests' models on the GPU (tests/conftest.py); a dry run keeps the CPU
        self.part_env = {"api-tests": cuda_env, "cli-tests": cuda_env} if not self.dry else {}
        return parts

    def step_bench(self, budget):
        out = ["--out", str(self.dest / "bench_gpu.json"), "--markdown", str(self.dest / "results.md")]
        if self.dry:
            return [Part("bench_gpu", self.script(
                "bench_gpu.py", "--device", "cpu", "--config", "small", "--quick", "--mixed-tokens", "200",
                "--fixed-docs", "1", "--long-len", "300", "--only", "default", "rerank", "classify", "--no-st",
                "--time-budget", str(max(5, budget - 40 - MV_BENCH_S)), *out)), self.multivector_part()]
        # new rows stop 50 s (and the late-interaction rows' time) before the budget: the last row,
        # the write-up and the exit fit in it; then the late-interaction rows, after it
        return [Part("bench_gpu", self.script("bench_gpu.py", "--time-budget", str(max(20, budget - 50 - MV_BENCH_S)),
                                              *out)), self.multivector_part()]

    def multivector_part(self):
        """The late-interaction GPU rows (bench_multivector.py), after bench_gpu on the same GPU."""
        out = ["--out", str(self.dest / "bench_multivector.json"),
               "--markdown", str(self.dest / "multivector.md")]
        if self.dry:
            args = ["--gpu-rows", "--device", "cpu", "--quick", "--docs", "3", "--queries", "3"]
        else:
            args = ["--device", "cuda"]
        return Part("bench_multivector", self.script("bench_multivector.py", *args, *out), after="bench_gpu")

    def step_serve(self, budget):
        if not _has(self.py, "starlette", self.env) or not _has(self.py, "uvicorn", self.env):
            return [Part("bench_serve", None, "this Python has no starlette/uvicorn (the serve extra)")]
        out = ["--logs", str(self.dest / "serve-logs"), "--out", str(self.dest / "bench_serve.json"),
               "--markdown", str(self.dest / "serve.md")]
        if self.dry:
            args = ["--quick", "--device", "cpu", "--concurrency", "1,2", "--workloads", "short",
                    "--min-requests", "2", "--time-budget", str(max(5, budget - 30))]
        else:
            # one short text per request up to concurrency 256, and 512-token requests; no level
            # starts in the last 25 s (stopping the server fits in them)
            args = ["--device", "cuda", "--dtype", "bfloat16", "--concurrency", "1,64,256",
                    "--workloads", "short,long512", "--min-requests", "64", "--time-budget", str(max(10, budget - 25))]
        return [Part("bench_serve", self.script("bench_serve.py", *args, *out))]

    def step_ops(self, budget):
        out = ["--out", str(self.dest / "bench_ops_gpu.json"), "--markdown", str(self.dest / "ops.md")]
        if self.dry:
            return [Part("bench_ops_gpu", self.script(
                "bench_ops_gpu.py", "--device", "cpu", "--quick", "--dtype", "fp32", "--tokens", "64",
                "--no-profile", "--time-budget", "0", *out), "no profile, no tile sweep (dry run)")]
        # the tile sweep (last) stops 25 s before the budget
        return [Part("bench_ops_gpu", self.script("bench_ops_gpu.py", "--time-budget", str(max(10, budget - 25)),
                                                  *out))]

    # ------------------------------------------------------------------------- driving
    def run_step(self, name: str, budget: int, kind: str) -> StepResult:
        res = StepResult(name, kind, budget)
        print(f"=== {name} (budget {budget} s)", flush=True)
        t0 = time.monotonic()
        self.part_env = {}
        try:
            made = getattr(self, f"step_{name}")(budget)
            if isinstance(made, tuple):  # a step done in this process: (status, failed, note)
                res.status, res.failed, res.note = made
            else:
                res.parts = made
                self._run_parts_with_env(made, t0 + budget, kind)
                failed = [p for p in made if p.status.startswith(("FAIL", "TIMEOUT"))]
                cut = [p for p in made if p.status.startswith("CUT")]
                res.failed = bool(failed)
                res.status = (failed[0].status.split(";")[0] if len(made) == 1 else
                              f"FAIL ({', '.join(p.name for p in failed)})") if failed else \
                    (f"CUT ({', '.join(p.name for p in cut)})" if cut else
                     "ok" if any(p.status.startswith(("ok", "no tests")) for p in made) else made[0].status)
        except Exception as e:  # noqa: BLE001 - a broken step is a failed check, and the run goes on
            res.status, res.failed, res.note = f"FAIL ({type(e).__name__}: {e})"[:200], True, ""
        res.seconds = round(time.monotonic() - t0, 1)
        for part in res.parts:
            print(f"----- {part.name}: {part.status} in {part.seconds:g} s; the last lines of {part.log}:")
            lines = (self.dest / part.log).read_text(errors="replace").splitlines() if part.log else []
            print("\n".join(lines[-20:]))
        print(f"=== {name}: {res.status} in {res.seconds:g} s" + (f"; {res.note}" if res.note else ""), flush=True)
        return res

    def _run_parts_with_env(self, parts, deadline, kind):
        """run_parts, with the parts that need another environment (the GPU test device) given it."""
        groups: dict[str | None, list[Part]] = {}
        for part in parts:
            groups.setdefault(self.part_env.get(part.name), []).append(part)
        # all groups side by side: start each group's processes, then wait for all
        if len(groups) == 1:
            (device, group), = groups.items()
            env = dict(self.env, **({"MODERNBERT_EMBED_TEST_DEVICE": device} if device else {}))
            run_parts(group, self.dest, env, deadline, kind)
            return
        import threading

        threads = []
        for device, group in groups.items():
            env = dict(self.env, **({"MODERNBERT_EMBED_TEST_DEVICE": device} if device else {}))
            t = threading.Thread(target=run_parts, args=(group, self.dest, env, deadline, kind))
            t.start()
            threads.append(t)
        for t in threads:
            t.join()

    def main(self) -> int:
        print(f"device check{' (DRY RUN: the CPU, tiny shapes)' if self.dry else ''}: "
              f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, commit {self.args.commit}, "
              f"results in {self.dest}; budget {sum(b for _, b, _ in self.steps())} s", flush=True)
        try:
            for name, budget, kind in self.steps():
                self.results.append(self.run_step(name, budget, kind))
                self.write_summary()
        finally:
            if self.tree is not None:
                shutil.rmtree(self.tree, ignore_errors=True)
        for f in ("parity.md", "results.md", "multivector.md", "serve.md", "ops.md"):
            if (self.dest / f).is_file():
                print((self.dest / f).read_text())
        print(highlights(self.dest))
        print(self.summary_table())
        return 1 if any(r.failed for r in self.results) else 0

    def steps(self):
        return [s for s in STEPS if not self.args.only or s[0] in self.args.only]

    def summary_table(self) -> str:
        lines = ["| step | status | seconds | budget | notes |", "|---|---|---|---|---|"]
        for r in self.results:
            note = r.note or (_result_line(self.dest, r.parts[0]) if len(r.parts) == 1 else "")
            lines.append(f"| {r.name} | {r.status} | {r.seconds:g} | {r.budget_s} | {note} |")
            if len(r.parts) > 1:
                for p in r.parts:
                    lines.append(f"| - {p.name} | {p.status} | {p.seconds:g} | | {_result_line(self.dest, p)} |")
        failed = [r.name for r in self.results if r.failed]
        lines.append("")
        lines.append(f"device check{' (dry run)' if self.dry else ''}: "
                     f"{round(time.monotonic() - self.started)} s of a {sum(b for _, b, _ in self.steps())} s "
                     f"budget; commit {self.args.commit}; results in {self.dest}; "
                     + (f"FAILED: {', '.join(failed)}" if failed else "no check failed"))
        return "================================ summary ================================\n" + "\n".join(lines)

    def write_summary(self) -> None:
        """summary.json and summary.md now (after every step), and the bundle where one is asked for."""
        record = {"dry_run": self.dry, "commit": self.args.commit, "budget_s": sum(b for _, b, _ in self.steps()),
                  "elapsed_s": round(time.monotonic() - self.started, 1),
                  "steps": [asdict(r) for r in self.results],
                  "not_yet_run": [n for n, _, _ in self.steps()][len(self.results):]}
        _write(self.dest / "summary.json", json.dumps(record, indent=1))
        _write(self.dest / "summary.md", self.summary_table() + "\n")
        if self.args.bundle:
            self.args.bundle.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.args.bundle.with_name(self.args.bundle.name + ".tmp")
            with tarfile.open(tmp, "w:gz") as tar:
                tar.add(self.dest, arcname="device-check")
            tmp.replace(self.args.bundle)
            shutil.copyfile(self.dest / "summary.md", self.args.bundle.parent / "summary.md")


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _has(py: str, module: str, env: dict) -> bool:
    return subprocess.run([py, "-c", f"import {module}"], env=env, capture_output=True).returncode == 0


def _result_line(dest: Path, part: Part) -> str:
    """What a part found, in a few words: parity's cases by status, the probe's GPU and torch, or
    pytest's last result line ("3 passed, 2 skipped in ..."); '' when there is none."""
    try:
        if part.name == "parity" and (dest / "parity_gpu.json").is_file():
            cases = json.loads((dest / "parity_gpu.json").read_text())["cases"]
            counts: dict[str, int] = {}
            for c in cases:
                counts[c["status"] or "not run"] = counts.get(c["status"] or "not run", 0) + 1
            return ", ".join(f"{n} {k}" for k, n in counts.items()) + f" of {len(cases)} cases"
        if part.name == "bench_gpu" and (dest / "bench_gpu.json").is_file():
            rows = json.loads((dest / "bench_gpu.json").read_text())["rows"]
            bad = sum(bool(r.get("error")) for r in rows)
            return f"{len(rows) - bad} rows measured, {bad} with an error or skipped"
        if part.name == "bench_multivector" and (dest / "bench_multivector.json").is_file():
            rows = json.loads((dest / "bench_multivector.json").read_text())["rows"]
            bad = sum(bool(r.get("error")) for r in rows)
            return f"{len(rows) - bad} late-interaction rows measured, {bad} with an error"
        if part.name == "bench_serve" and (dest / "bench_serve.json").is_file():
            rec = json.loads((dest / "bench_serve.json").read_text())
            return f"{len(rec['rows'])} levels measured" + (f", not run: {', '.join(rec['not_run'])}"
                                                            if rec.get("not_run") else "")
        if part.name == "bench_ops_gpu" and (dest / "bench_ops_gpu.json").is_file():
            rec = json.loads((dest / "bench_ops_gpu.json").read_text())
            return (f"{len(rec['ops'])} op rows, {len(rec['attention'])} attention rows, {len(rec['profile'])} "
                    f"profiles, {sum(r['ms'] is not None for r in rec['sweep'])} of {len(rec['sweep'])} tiles timed")
        if part.name == "probe" and part.log and (dest / part.log).is_file():
            info = json.loads((dest / part.log).read_text().strip().splitlines()[-1])
            return f"{info['gpu'] or 'no CUDA device'}; torch {info['torch']}, triton {info['versions']['triton']}"
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        pass
    if not part.log or not (dest / part.log).is_file():
        return ""
    hits = [ln for ln in (dest / part.log).read_text(errors="replace").splitlines()
            if any(w in ln for w in (" passed", " failed", " error", " skipped", "no tests ran", " collected",
                                     "tests collected", "case(s) failed"))]
    return hits[-1].strip("= ").replace("|", "/")[:120] if hits else ""


def highlights(dest: Path) -> str:
    """A few lines from the benchmarks' JSON: the goals, attention TFLOP/s, where the time goes."""
    out = []
    try:
        if (dest / "bench_gpu.json").is_file():
            rows = json.loads((dest / "bench_gpu.json").read_text())["rows"]
            out += [f"goal: {r['engine']} {r['dtype']} {r['variant']} on {r['corpus']}: {r['goal']}"
                    for r in rows if r.get("goal")]
            bad = [r for r in rows if r.get("error")]
            out.append(f"bench rows: {len(rows) - len(bad)} measured, {len(bad)} with an error or skipped")
        if (dest / "bench_multivector.json").is_file():
            rows = json.loads((dest / "bench_multivector.json").read_text())["rows"]
            out += [f"late interaction: {r['engine']} {r['dtype']} on {r['corpus']}: "
                    + (f"ERROR {r['error'][:80]}" if r.get("error") else
                       f"{r['tokens_per_s']:,.0f} tokens/s" + (f", {r['ratio']:.2f}x sentence-transformers"
                                                               if r.get("ratio") else "") + f"; {r['goal']}")
                    for r in rows]
        if (dest / "bench_serve.json").is_file():
            rec = json.loads((dest / "bench_serve.json").read_text())
            out += [f"serve goal: {g['goal']}: {g['value']} ({'PASS' if g['pass'] else 'FAIL'})"
                    for g in rec.get("goals", [])]
            out.append(f"serve levels: {len(rec.get('rows', []))} measured"
                       + (f", not run: {', '.join(rec['not_run'])}" if rec.get("not_run") else ""))
        if (dest / "bench_ops_gpu.json").is_file():
            rec = json.loads((dest / "bench_ops_gpu.json").read_text())
            for case in dict.fromkeys(r["case"] for r in rec.get("attention", [])):
                parts = [f"{r['impl'].split(' ')[0]} {r['tflops']:.3g}" for r in rec["attention"]
                         if r["case"] == case and r.get("tflops")]
                out.append(f"attention {case} TFLOP/s: " + ", ".join(parts))
            for name, p in rec.get("profile", {}).items():
                if "groups_ms" in p:
                    shares = ", ".join(f"{g} {ms / p['kernel_ms']:.0%}" for g, ms in list(p["groups_ms"].items())[:5])
                    out.append(f"profile {name}: {p['wall_ms']:.2f} ms/forward; {shares}")
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError) as e:
        out.append(f"(highlights unreadable: {type(e).__name__}: {e})")
    return "\n".join(out)


def _commit() -> str:
    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                           timeout=10)
    except (OSError, subprocess.TimeoutExpired):  # no git, or no repository, on the machine
        return "unknown"
    return r.stdout.strip() if r.returncode == 0 else "unknown"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", default=os.environ.get("DRY_RUN", "") not in ("", "0"),
                   help="every step's plumbing on the CPU with tiny shapes; CUDA-only parts say so (also DRY_RUN=1)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default ./device-check-out)")
    p.add_argument("--bundle", type=Path, default=None,
                   help="rewrite this .tar.gz of the output folder (and summary.md beside it) after every step "
                        "(default: $OUT/device-check.tar.gz where OUT is set)")
    p.add_argument("--install", choices=("pip", "fallback"), default=None,
                   help="pip: pip install -e . with the fallback when it fails (default); fallback: the linked "
                        "folder only (the dry run's default: it leaves this Python's packages as they are)")
    p.add_argument("--only", nargs="*", choices=[s[0] for s in STEPS], default=None,
                   help="run only these steps (install always runs first)")
    p.add_argument("--python", default=sys.executable, help="the Python every step runs (default: this one)")
    p.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.install = args.install or ("fallback" if args.dry_run else "pip")
    if args.only is not None and "install" not in args.only:
        args.only = ["install", *args.only]
    args.out = (args.out or ROOT / "device-check-out").resolve()
    if args.bundle is None and os.environ.get("OUT"):
        args.bundle = Path(os.environ["OUT"]) / "device-check.tar.gz"
    args.commit = os.environ.get("MODERNBERT_EMBED_COMMIT") or _commit()
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.probe:
        return probe()
    args.out.mkdir(parents=True, exist_ok=True)
    if any(args.out.iterdir()) and not (args.out / "summary.json").is_file():
        print(f"device check: {args.out} holds files that are not a device check's; give an empty folder",
              file=sys.stderr)
        return 2
    for old in args.out.iterdir():  # a previous run's files
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()
    return Run(args).main()


if __name__ == "__main__":
    sys.exit(main())
