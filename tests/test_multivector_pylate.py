"""Parity with PyLate itself (`pylate.models.ColBERT`, 1.6) on the same random folders.

PyLate pins sentence-transformers 5.3 and transformers <= 5.3, so it lives in its own virtual
environment (`make pylate-venv`: .venv-pylate at the checkout's root, or the python named by
MODERNBERT_EMBED_PYLATE_PYTHON) and runs as a subprocess (tests/pylate_reference.py) that writes
its vectors and scores to files; the tests skip, saying so, when that environment is absent.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from modernbert_embed import MultiVectorEncoder

from conftest import ROOT
from multivector_data import DOCUMENTS, QUERIES, VARIANTS, write_variants

pytestmark = pytest.mark.slow

PYLATE_PYTHON = Path(os.environ.get("MODERNBERT_EMBED_PYLATE_PYTHON", ROOT / ".venv-pylate" / "bin" / "python"))


@pytest.fixture(scope="module")
def pylate(tmp_path_factory):
    """(folders, {variant: PyLate's outputs}), one PyLate process for every variant."""
    if not PYLATE_PYTHON.is_file():
        pytest.skip(f"PyLate's virtual environment is absent ({PYLATE_PYTHON}): `make pylate-venv` makes it")
    root = tmp_path_factory.mktemp("pylate")
    folders = write_variants(root)
    runs = [{"folder": str(folders[v]), "out": str(root / f"{v}.npz")} for v in VARIANTS]
    spec = root / "in.json"
    spec.write_text(json.dumps({"queries": QUERIES, "documents": DOCUMENTS, "batch_size": 4, "runs": runs}))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = subprocess.run([str(PYLATE_PYTHON), str(ROOT / "tests" / "pylate_reference.py"), str(spec)],
                          capture_output=True, text=True, timeout=900, env=env, cwd=root)
    assert proc.returncode == 0, f"PyLate failed:\n{proc.stderr[-4000:]}"
    return folders, {v: np.load(root / f"{v}.npz") for v in VARIANTS}


def _ref(out, prefix: str, n: int) -> list[np.ndarray]:
    return [out[f"{prefix}{i}"] for i in range(n)]


def _max_abs(a, b) -> float:
    worst = 0.0
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        assert x.shape == y.shape, f"input {i}: {x.shape} vs PyLate's {y.shape}"
        worst = max(worst, float(np.abs(x - y).max()))
    return worst


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_pylate_in_float32(pylate, variant):
    folders, outs = pylate
    out = outs[variant]
    m = MultiVectorEncoder.from_pretrained(folders[variant], device="cpu")
    assert out["prefix_ids"].tolist() == [m.query_prefix_id, m.document_prefix_id] == [50368, 50369]
    assert int(out["pad_id"]) == m.mask_token_id
    q = m.encode_query(QUERIES, batch_size=2)  # other batches than PyLate's: packing must not matter
    d = m.encode_document(DOCUMENTS, max_batch_tokens=700)
    assert _max_abs(q, _ref(out, "q", len(QUERIES))) <= 1e-4
    assert _max_abs(d, _ref(out, "d", len(DOCUMENTS))) <= 1e-4
    s = m.similarity(q, d).numpy()
    np.testing.assert_allclose(s, out["scores"], atol=1e-4, rtol=0)
    assert (np.argsort(-s, axis=1, kind="stable") == np.argsort(-out["scores"], axis=1, kind="stable")).all()
    for i, query in enumerate(QUERIES):
        ranked = [h["corpus_id"] for h in m.rank(query, DOCUMENTS)]
        assert ranked == np.argsort(-out["scores"][i], kind="stable").tolist()


def test_bfloat16_matches_pylate_by_cosine(pylate):
    folders, outs = pylate
    m = MultiVectorEncoder.from_pretrained(folders["expand"], device="cpu", dtype=torch.bfloat16)
    for got, ref in ((m.encode_query(QUERIES), _ref(outs["expand"], "q", len(QUERIES))),
                     (m.encode_document(DOCUMENTS), _ref(outs["expand"], "d", len(DOCUMENTS)))):
        for a, b in zip(got, ref, strict=True):
            assert a.shape == b.shape
            assert (a * b).sum(axis=1).min() >= 0.999  # unit vectors: the dot product is the cosine


def test_mixing_up_query_and_document_prefixes_fails_against_pylate(pylate):
    folders, outs = pylate
    m = MultiVectorEncoder.from_pretrained(folders["expand"], device="cpu")
    m.query_prefix_id, m.document_prefix_id = m.document_prefix_id, m.query_prefix_id
    assert _max_abs(m.encode_query(QUERIES), _ref(outs["expand"], "q", len(QUERIES))) > 1e-2
    assert _max_abs(m.encode_document(DOCUMENTS), _ref(outs["expand"], "d", len(DOCUMENTS))) > 1e-2
