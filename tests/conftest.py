"""Shared test set-up.

Without a CUDA GPU, Triton kernels run under the interpreter (`TRITON_INTERPRET=1`), which must be
set before triton is first imported: that is why it is set here, at collection time.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(
    os.environ.get("MODERNBERT_EMBED_FIXTURES", ROOT.parent / "shared" / "fixtures" / "modernbert-embed-base")
)

# A small ModernBERT in the 4.48 schema: 2 heads of 64 (the real head_dim), window +-64 as in the
# real model, 4 layers (global, local, local, global).
SMALL_CONFIG = {
    "model_type": "modernbert",
    "architectures": ["ModernBertModel"],
    "vocab_size": 1024,
    "hidden_size": 128,
    "intermediate_size": 192,
    "num_hidden_layers": 4,
    "num_attention_heads": 2,
    "global_attn_every_n_layers": 3,
    "local_attention": 128,
    "global_rope_theta": 160000.0,
    "local_rope_theta": 10000.0,
    "norm_eps": 1e-5,
    "max_position_embeddings": 8192,
    "hidden_activation": "gelu",
    "attention_bias": False,
    "mlp_bias": False,
    "norm_bias": False,
    "pad_token_id": 3,
    "cls_token_id": 1,
    "sep_token_id": 2,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def fixture_file(name: str) -> Path:
    path = FIXTURES / name
    if not path.exists():
        pytest.skip(f"needs the real {name} from the shared fixtures folder ({FIXTURES}), which is absent")
    return path


requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU; none is present")


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
