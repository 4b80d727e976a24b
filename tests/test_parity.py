"""Parity with transformers' ModernBertModel on random checkpoints in the real layout.

Lengths cross the local window (1..3, 64, 65, 66, 129, 130, 131, several hundred) and are mixed in
one batch; the random weights make attention peaked so that window or rotary mistakes show. The
full-size runs (149M parameters on the CPU) are marked slow (left out of `make test-fast`).
"""

import json

import pytest
import torch

from modernbert_embed import Embedder
from modernbert_embed.weights import write_random_checkpoint

from conftest import SMALL_CONFIG, fixture_file, random_ids
from helpers import cosines, max_diff, transformers_reference

transformers = pytest.importorskip("transformers", reason="parity tests need transformers (test extra)")

CROSSING = [1, 2, 3, 64, 65, 66, 129, 130, 131, 300]


def check_fp32(folder, ids):
    m = Embedder.from_pretrained(folder, device="cpu")
    ref_hidden, ref_pooled = transformers_reference(folder, ids)
    worst, where = max_diff(m.hidden_states(ids), ref_hidden)
    assert worst <= 1e-4, f"hidden states differ by {worst:.3g} at {where}"
    emb = m.encode_tokens(ids)
    cos = cosines(emb, ref_pooled)
    assert cos.min() >= 0.99999, f"pooled cosine {cos.min():.7f} at sequence {int(cos.argmin())}"


def test_small_448_schema(small_checkpoint):
    check_fp32(small_checkpoint, random_ids(CROSSING, vocab=1024, seed=1))


def test_small_5x_schema(tmp_path):
    """A config as transformers 5.x saves it (layer_types, rope_parameters), other thetas/window."""
    hf = transformers.ModernBertConfig(
        vocab_size=512, hidden_size=96, intermediate_size=160, num_hidden_layers=5, num_attention_heads=3,
        global_attn_every_n_layers=2, local_attention=32, global_rope_theta=50000.0, local_rope_theta=500.0,
        pad_token_id=3, cls_token_id=1, sep_token_id=2, bos_token_id=1, eos_token_id=2,
    )
    hf.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert "layer_types" in raw and "rope_parameters" in raw
    write_random_checkpoint(tmp_path, raw, seed=2)
    check_fp32(tmp_path, random_ids([1, 5, 16, 17, 33, 34, 35, 90, 200], vocab=512, seed=2))


def test_masked_lm_layout_loads_the_same_weights(tmp_path):
    """`model.`-prefixed names plus a prediction head: the head is ignored, the encoder identical."""
    plain = write_random_checkpoint(tmp_path / "plain", SMALL_CONFIG, seed=3)
    mlm = write_random_checkpoint(tmp_path / "mlm", SMALL_CONFIG, seed=3, prefix="model.", with_head=True)
    ids = random_ids([5, 70, 140], seed=3)
    a = Embedder.from_pretrained(plain).hidden_states(ids)
    b = Embedder.from_pretrained(mlm).hidden_states(ids)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    ref_hidden, _ = transformers_reference(mlm, ids)
    worst, where = max_diff(b, ref_hidden)
    assert worst <= 1e-4, f"masked-LM layout: hidden states differ by {worst:.3g} at {where}"


def test_sharded_checkpoint(tmp_path):
    single = write_random_checkpoint(tmp_path / "single", SMALL_CONFIG, seed=4)
    sharded = write_random_checkpoint(tmp_path / "sharded", SMALL_CONFIG, seed=4, shards=3)
    assert not (sharded / "model.safetensors").exists()
    ids = random_ids([7, 100], seed=4)
    for x, y in zip(Embedder.from_pretrained(single).hidden_states(ids),
                    Embedder.from_pretrained(sharded).hidden_states(ids)):
        assert torch.equal(x, y)


def test_bf16_on_cpu(small_checkpoint):
    ids = random_ids(CROSSING, seed=5)
    _, ref_pooled = transformers_reference(small_checkpoint, ids)
    emb = Embedder.from_pretrained(small_checkpoint, device="cpu", dtype="bfloat16").encode_tokens(ids)
    cos = cosines(emb, ref_pooled)
    assert cos.min() >= 0.999, f"bf16 pooled cosine {cos.min():.5f} at sequence {int(cos.argmin())}"


def test_window_boundary_matters(small_checkpoint, tmp_path):
    """A model whose window is one token narrower must differ: the test can see window mistakes."""
    raw = json.loads((small_checkpoint / "config.json").read_text())
    narrow = write_random_checkpoint(tmp_path, {**raw, "local_attention": raw["local_attention"] - 2}, seed=0)
    ids = random_ids([300], seed=6)
    a = Embedder.from_pretrained(small_checkpoint).hidden_states(ids)[0]
    b = Embedder.from_pretrained(narrow).hidden_states(ids)[0]
    assert (a - b).abs().max() > 1e-2


@pytest.fixture(scope="module")
def full_checkpoint(tmp_path_factory):
    """The real base config (4.48 schema) with random weights: 149M parameters."""
    cfg = json.loads(fixture_file("config.json").read_text())
    return write_random_checkpoint(tmp_path_factory.mktemp("full"), cfg, seed=7)


@pytest.mark.slow
def test_full_size_fp32(full_checkpoint):
    check_fp32(full_checkpoint, random_ids([1, 3, 64, 65, 66, 129, 130, 131, 400], vocab=50280, seed=7,
                                           cls=50281, sep=50282))


@pytest.mark.slow
def test_full_size_bf16(full_checkpoint):
    ids = random_ids([2, 65, 130, 300], vocab=50280, seed=8, cls=50281, sep=50282)
    _, ref_pooled = transformers_reference(full_checkpoint, ids)
    emb = Embedder.from_pretrained(full_checkpoint, dtype=torch.bfloat16).encode_tokens(ids)
    cos = cosines(emb, ref_pooled)
    assert cos.min() >= 0.999, f"bf16 pooled cosine {cos.min():.5f} at sequence {int(cos.argmin())}"
