"""The whole engine on CUDA against transformers on a random full-size checkpoint (the real layout
and shapes, random weights): fp32 hidden states with TF32 off, pooled cosine in bf16/fp16, batch
invariance, an ~8k-token input beside a 3-token one in one batch, and a batch loop that never
waits for the GPU.

Every test here needs a CUDA GPU; without one they are collected and skipped.
"""

from __future__ import annotations

import pytest
import torch

from conftest import HAS_CUDA, random_ids
from helpers import load_with_ops, max_diff, tf32_off as no_tf32, transformers_reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (the engine on CUDA vs transformers); none is present"),
]

DEVICE = "cuda"
# Full-size vocabulary: body ids 0..50279, [CLS] 50281, [SEP] 50282.
VOCAB, CLS, SEP = 50280, 50281, 50282
CROSSING = [1, 2, 3, 64, 65, 66, 129, 130, 131, 300, 517]
LONG = 8192
HALF = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]
ATTENTION = [pytest.param("auto", id="attn-auto"), pytest.param("triton-rope", id="attn-triton-rope"),
             pytest.param("torch-varlen", id="attn-torch-varlen"),
             pytest.param("torch-varlen-global", id="attn-torch-varlen-global")]


def ids_of(lengths, seed):
    # conftest's random_ids draws body ids from 4..vocab-1; the full-size specials sit above them.
    return random_ids(lengths, vocab=VOCAB, seed=seed, cls=CLS, sep=SEP)


@pytest.fixture(scope="module")
def tf32_off():
    with no_tf32():
        yield


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from modernbert_embed.weights import write_random_checkpoint

    return write_random_checkpoint(tmp_path_factory.mktemp("full"), None, seed=0)


@pytest.fixture(scope="module")
def crossing_ids():
    return ids_of(CROSSING, seed=1)


@pytest.fixture(scope="module")
def long_ids():
    return ids_of([LONG, 3], seed=2)


@pytest.fixture(scope="module")
def reference(checkpoint, crossing_ids, long_ids, tf32_off):
    """transformers fp32 on CUDA, one sequence at a time (no padding): {tuple(ids): (hidden, pooled)}."""
    pytest.importorskip("transformers", reason="the GPU model tests compare with transformers")
    seqs = crossing_ids + long_ids
    hidden, pooled = transformers_reference(checkpoint, seqs, DEVICE)
    return {tuple(seq): (h, p) for seq, h, p in zip(seqs, hidden, pooled)}


def load(checkpoint, dtype, attention="auto", backend="auto"):

    if attention.startswith("torch-varlen"):
        try:
            from modernbert_embed.torch_varlen import varlen_available, varlen_supports_window
        except ImportError as e:
            pytest.skip(f"attention backend torch-varlen is not importable: {e}")
        if not varlen_available():
            pytest.skip(f"torch {torch.__version__} has no varlen flash attention")
        if attention == "torch-varlen" and not varlen_supports_window():
            pytest.skip(f"torch {torch.__version__}'s varlen attention has no window_size (local layers)")
    return load_with_ops(checkpoint, DEVICE, dtype, backend, attention)


def one_batch(ids):
    return sum(len(s) for s in ids)  # a token budget that puts every input in one batch


def pooled_cosines(model, ids, reference):
    emb = model.encode_tokens(ids, max_batch_tokens=one_batch(ids), convert_to_tensor=True).float().cpu()
    assert torch.isfinite(emb).all(), "non-finite embeddings"
    ref = torch.stack([reference[tuple(s)][1] for s in ids])
    return torch.nn.functional.cosine_similarity(emb, ref, dim=-1)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_fp32_hidden_states_match_transformers(checkpoint, crossing_ids, reference, tf32_off, backend):
    model = load(checkpoint, torch.float32, backend=backend)
    hidden = model.hidden_states(crossing_ids, max_batch_tokens=one_batch(crossing_ids))
    worst, where = max_diff(hidden, [reference[tuple(s)][0] for s in crossing_ids])
    assert worst <= 1e-3, f"{model.ops.name}: hidden states differ by {worst:.3g} at {where}"
    cos = pooled_cosines(model, crossing_ids, reference)
    assert cos.min() >= 0.99999, f"{model.ops.name}: pooled cosine {cos.min():.7f} at length {CROSSING[int(cos.argmin())]}"


@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_pooled_cosine(checkpoint, crossing_ids, reference, dtype, attention):
    model = load(checkpoint, dtype, attention)
    cos = pooled_cosines(model, crossing_ids, reference)
    assert cos.min() >= 0.999, f"{model.ops.name} {dtype}: pooled cosine {cos.min():.6f} at length {CROSSING[int(cos.argmin())]}"
    hidden = model.hidden_states(crossing_ids, max_batch_tokens=one_batch(crossing_ids))
    assert all(torch.isfinite(h).all() for h in hidden)


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")])
def test_batch_invariance(checkpoint, crossing_ids, tf32_off, dtype):
    """Each input's embedding is the same alone as in a mixed-length batch, up to kernel rounding:
    max |diff| <= 1e-4 in fp32 (TF32 off), cosine >= 0.9995 in bf16."""
    model = load(checkpoint, dtype)
    batch = model.encode_tokens(crossing_ids, max_batch_tokens=one_batch(crossing_ids), convert_to_tensor=True).float()
    for i, seq in enumerate(crossing_ids):
        alone = model.encode_tokens([seq], convert_to_tensor=True).float()[0]
        if dtype == torch.float32:
            d = (alone - batch[i]).abs().max().item()
            assert d <= 1e-4, f"{model.ops.name}: length {len(seq)} alone vs in a batch differ by {d:.3g}"
        else:
            c = torch.nn.functional.cosine_similarity(alone, batch[i], dim=0).item()
            assert c >= 0.9995, f"{model.ops.name} bf16: length {len(seq)} alone vs in a batch: cosine {c:.6f}"


@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize("dtype", HALF)
def test_long_and_tiny_input_in_one_batch(checkpoint, long_ids, reference, dtype, attention):
    """An 8192-token input and a 3-token one share a batch: no NaN, both match transformers."""
    model = load(checkpoint, dtype, attention)
    hidden = model.hidden_states(long_ids, max_batch_tokens=one_batch(long_ids))
    assert [h.shape[0] for h in hidden] == [LONG, 3]
    for h in hidden:
        assert torch.isfinite(h).all(), f"{model.ops.name} {dtype}: non-finite hidden states (length {h.shape[0]})"
    cos = pooled_cosines(model, long_ids, reference)
    assert cos.min() >= 0.999, f"{model.ops.name} {dtype}: pooled cosine {cos.tolist()} for lengths [{LONG}, 3]"
    tiny_alone = model.encode_tokens([long_ids[1]], convert_to_tensor=True).float().cpu()[0]
    tiny_batch = model.encode_tokens(long_ids, max_batch_tokens=one_batch(long_ids), convert_to_tensor=True).float().cpu()[1]
    assert torch.nn.functional.cosine_similarity(tiny_alone, tiny_batch, dim=0) >= 0.9999


def test_fp32_long_input_matches_transformers(checkpoint, long_ids, reference, tf32_off):
    model = load(checkpoint, torch.float32)
    hidden = model.hidden_states(long_ids, max_batch_tokens=one_batch(long_ids))
    worst, where = max_diff(hidden, [reference[tuple(s)][0] for s in long_ids])
    assert worst <= 1e-3, f"{model.ops.name}: hidden states differ by {worst:.3g} at {where}"


def test_batch_loop_never_waits_for_the_gpu(checkpoint):
    """The batch loop queues work without waiting for the GPU: torch's sync debug mode turns any
    synchronising call (a copy from pageable memory, .item(), .nonzero(), a stream sync) inside
    it into an error. Then the rows it produced, in input order, match a plain encode."""
    from modernbert_embed.batching import plan_batches

    model = load(checkpoint, torch.bfloat16)
    ids = ids_of([700, 3, 129, 64, 65, 300, 1, 517, 2000], seed=5)
    assert len(plan_batches([len(s) for s in ids], max_batch_tokens=1024)) >= 3
    engine = model.engine
    engine.embed(ids, max_batch_tokens=1024, check_finite=False)  # compiles the kernels first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:  # the finite check reads the result back: it waits, by design, after the loop
        out = engine.embed(ids, max_batch_tokens=1024, check_finite=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ref = model.encode_tokens(ids, max_batch_tokens=1024, convert_to_tensor=True)
    assert (out - ref).abs().max().item() <= 1e-3
