"""The package as it ships: the sdist and the wheel built from a copy of the checkout, the wheel
installed (no editable install) into a fresh virtual environment, and the installed command run
from a folder outside the checkout: `--version`, `--help` and an encode on random weights.

The fresh environment takes its dependencies (torch, tokenizers, ...) from this one's
site-packages through a .pth line, which adds the folder to sys.path without running the .pth
files inside it (this checkout's editable finder among them), so modernbert_embed can only come
from the wheel."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT, fixture_file
from helpers import REAL_VOCAB

pytestmark = pytest.mark.slow

BUILD = """
import sys
from setuptools import build_meta
kind, out = sys.argv[1], sys.argv[2]
print(build_meta.build_sdist(out) if kind == "sdist" else build_meta.build_wheel(out))
"""


def _version() -> str:
    text = (ROOT / "modernbert_embed" / "__init__.py").read_text()
    return re.search(r'^__version__ = "([^"]+)"', text, re.M).group(1)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(sdist path, wheel path), built without isolation (no registry) from a copy of the checkout,
    so that the build's own files (build/, *.egg-info) stay out of it."""
    work = tmp_path_factory.mktemp("pkg")
    src = work / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "device-check-out", "out",
        "runs"))
    dist = work / "dist"
    dist.mkdir()
    names = {}
    for kind in ("sdist", "wheel"):
        r = subprocess.run([sys.executable, "-c", BUILD, kind, str(dist)], cwd=src, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        names[kind] = dist / r.stdout.strip().splitlines()[-1]
    return names["sdist"], names["wheel"]


def test_wheel_holds_kernels_and_weights_inside_the_package(built):
    _, wheel = built
    assert wheel.name.startswith(f"modernbert_embed-{_version()}-")
    names = zipfile.ZipFile(wheel).namelist()
    for sub in ("kernels", "weights"):
        files = {Path(n).name for n in names if n.startswith(f"modernbert_embed/{sub}/") and n.endswith(".py")}
        want = {p.name for p in (ROOT / sub).glob("*.py")}
        assert files == want, (sub, sorted(want - files), sorted(files - want))
    tops = {n.split("/")[0] for n in names}
    assert "kernels" not in tops and "weights" not in tops, sorted(tops)
    assert tops == {"modernbert_embed", f"modernbert_embed-{_version()}.dist-info"}, sorted(tops)
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "modernbert-embed = modernbert_embed.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_sdist_holds_kernels_and_weights(built):
    sdist, _ = built
    names = tarfile.open(sdist).getnames()
    top = f"modernbert_embed-{_version()}"
    assert all(n == top or n.startswith(top + "/") for n in names)
    for sub in ("kernels", "weights"):
        for p in (ROOT / sub).glob("*.py"):
            assert f"{top}/{sub}/{p.name}" in names, f"{sub}/{p.name} is not in the sdist"
    assert f"{top}/pyproject.toml" in names and f"{top}/modernbert_embed/__init__.py" in names


def test_wheel_installs_and_runs_in_a_fresh_environment(built, tmp_path):
    _, wheel = built
    tok = fixture_file("tokenizer.json")
    venv = tmp_path / "venv"
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    fresh_site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                     capture_output=True, text=True, check=True).stdout.strip())
    # this environment's packages (torch, ...), but not the .pth files among them
    ours = [p for p in dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])]
    (fresh_site / "zz-deps-of-the-test-environment.pth").write_text("\n".join(ours) + "\n")
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index",
                        "--no-compile", "-q", str(wheel)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", PYTHONNOUSERSITE="1", OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1")

    where = subprocess.run([str(py), "-c", "import json, modernbert_embed, modernbert_embed.kernels as k, "
                            "modernbert_embed.weights as w; print(json.dumps([modernbert_embed.__file__, k.__file__, "
                            "w.__file__]))"], cwd=run_dir, env=env, capture_output=True, text=True)
    assert where.returncode == 0, where.stderr
    for f in json.loads(where.stdout):
        assert Path(f).resolve().is_relative_to(fresh_site.resolve()), f"{f} is not from the installed wheel"
    # no top-level `kernels` of ours (a `kernels` from elsewhere, PyPI's, may be there)
    top = subprocess.run([str(py), "-c", "import importlib.util as u; s = u.find_spec('kernels'); "
                          "print(s.origin if s else '')"], cwd=run_dir, env=env, capture_output=True, text=True)
    assert top.returncode == 0, top.stderr
    origin = top.stdout.strip()
    assert not origin or not (Path(origin).resolve().is_relative_to(fresh_site.resolve())
                              or Path(origin).resolve() == ROOT / "kernels" / "__init__.py"), origin

    exe = venv / "bin" / "modernbert-embed"
    assert exe.is_file()
    r = subprocess.run([str(exe), "--version"], cwd=run_dir, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == f"modernbert-embed {_version()}", r.stdout + r.stderr
    r = subprocess.run([str(exe), "--help"], cwd=run_dir, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and all(w in r.stdout for w in ("embed", "verify", "serve")), r.stdout + r.stderr

    from modernbert_embed.weights import write_random_checkpoint

    ckpt = write_random_checkpoint(tmp_path / "ckpt", REAL_VOCAB, seed=3, tokenizer_json=tok, max_seq_length=64)
    (run_dir / "docs.txt").write_text("the quick brown fox\njumps over the lazy dog\nan embedding of a line\n")
    r = subprocess.run([str(exe), "embed", "docs.txt", "-o", "out", "--model", str(ckpt), "--device", "cpu",
                        "--dtype", "float32", "--no-progress"], cwd=run_dir, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = subprocess.run([str(exe), "verify", "out"], cwd=run_dir, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "complete, 3 documents" in r.stdout, r.stdout + r.stderr
    # the embeddings are the checkout's own on the same weights
    from modernbert_embed import Embedder
    from modernbert_embed.corpus import read_output

    import numpy as np

    want = Embedder.from_pretrained(ckpt, device="cpu", dtype="float32").encode(
        (run_dir / "docs.txt").read_text().splitlines())
    np.testing.assert_allclose(read_output(run_dir / "out").embeddings, want, atol=1e-5)
