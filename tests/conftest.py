"""Shared test set-up.

Without a CUDA GPU, Triton kernels run under the interpreter (`TRITON_INTERPRET=1`), which must be
set before triton is first imported: that is why it is set here, at collection time.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from modernbert_embed.weights import small_config

ROOT = Path(__file__).resolve().parents[1]
# The repository's top level holds kernels/ and weights/, installed as modernbert_embed.kernels and
# modernbert_embed.weights. With the checkout's root on sys.path (`python -m pytest`, or a child
# `python -m ...` started in it) they would also import as top-level packages, and `kernels` would
# shadow PyPI's package of that name, which transformers imports. Keep the root off sys.path, here
# and in every child process (PYTHONSAFEPATH); modernbert_embed comes from the install.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
os.environ["PYTHONSAFEPATH"] = "1"

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The real config, sentence-transformers files and tokenizer of modernbert-embed-base (no weights),
# kept in the repository (tests/data/modernbert-embed-base/README.md).
FIXTURES = Path(os.environ.get("MODERNBERT_EMBED_FIXTURES", ROOT / "tests" / "data" / "modernbert-embed-base"))

# A small ModernBERT in the 4.48 schema (see weights.small_config): 2 heads of 64, window +-64,
# 4 layers (global, local, local, global).
SMALL_CONFIG = small_config()


def fixture_file(name: str) -> Path:
    path = FIXTURES / name
    if not path.exists():
        pytest.skip(f"needs the real {name} in {FIXTURES} (MODERNBERT_EMBED_FIXTURES), which is absent")
    return path


requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU; none is present")

# Where the API-level tests (test_api, test_chunking, test_quantize) load their models: the CPU by
# default; the device check sets MODERNBERT_EMBED_TEST_DEVICE=cuda to run them on the GPU. In
# float32 on either, so that their tolerances hold on both.
TEST_DEVICE = os.environ.get("MODERNBERT_EMBED_TEST_DEVICE", "cpu")


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory):
    """A small random checkpoint in the real layout (no tokenizer)."""
    from modernbert_embed.weights import write_random_checkpoint

    return write_random_checkpoint(tmp_path_factory.mktemp("small"), SMALL_CONFIG, seed=0)


def random_ids(lengths, vocab=1024, seed=0, cls=1, sep=2):
    """Token-id lists of the given lengths: [CLS] random... [SEP] (length 1 is a lone [CLS])."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        body = torch.randint(4, vocab, (max(n - 2, 0),), generator=g).tolist()
        out.append(([cls] + body + [sep])[:n] if n >= 2 else [cls])
    return out
