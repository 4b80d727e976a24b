"""What the tests share: the real vocabulary's config, loading with forced ops, packed batches,
the tolerance rules, a dense attention reference, and transformers as the reference model.

The tolerance rules (as in flash-attention's tests):
  - float32: elementwise |out - ref| <= atol + rtol * |ref| (`assert_close`);
  - float16 / bfloat16: the kernel's max error against an fp32 reference may be at most 2x torch's
    own max error in that dtype, plus `atol` as a small floor for ops where torch's own error is
    zero (`assert_within_torch_error`).
Both say how much and where when they fail.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable, Sequence

import pytest
import torch

from modernbert_embed import Checkpoint, CheckpointError, Embedder
from modernbert_embed.batching import pack
from modernbert_embed.ops import select_ops

from conftest import HAS_CUDA, SMALL_CONFIG

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")

# The small config with the real tokenizer's vocabulary and special tokens.
REAL_VOCAB = {**SMALL_CONFIG, "vocab_size": 50368, "pad_token_id": 50283, "cls_token_id": 50281,
              "sep_token_id": 50282, "bos_token_id": 50281, "eos_token_id": 50282}


# ----------------------------------------------------------------------------- loading, batches
def real_weights(repo: str, env: str) -> Path:
    """The folder of a real checkpoint: the one named by the environment variable `env`, else `repo`
    in the Hugging Face cache; the test is skipped, saying so, when neither has its weights."""
    from modernbert_embed.weights import resolve_checkpoint

    given = os.environ.get(env)
    if given:
        folder = Path(given)
        if not (folder / "model.safetensors").is_file():
            pytest.fail(f"{env}={given} has no model.safetensors")
        return folder
    try:
        folder = resolve_checkpoint(repo, local_files_only=True)
    except CheckpointError:
        folder = None
    if folder is None or not (folder / "model.safetensors").is_file():
        pytest.skip(f"the real {repo} weights are not present (set {env} to a folder, or have them in the HF cache)")
    return folder



def load_with_ops(folder, device="cpu", dtype=None, backend="auto", attention="auto") -> Embedder:
    """An Embedder whose ops are forced (the documented way for experiments: `from_checkpoint`
    with `ops=select_ops(...)`); with both "auto", the library's own choice."""
    ops = None if (backend, attention) == ("auto", "auto") else select_ops(device, backend, attention)
    return Embedder.from_checkpoint(Checkpoint(folder), device=device, dtype=dtype, ops=ops)


def batch_of(lengths: Sequence[int], device=DEVICE):
    """A packed batch of sequences of the given lengths (token ids all 0: only the layout counts)."""
    return pack([[0] * n for n in lengths], list(range(len(lengths))), device)


@contextlib.contextmanager
def tf32_off():
    """Full fp32 matmuls on CUDA (no TF32) inside the block, the previous settings restored after."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision())
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])


# ----------------------------------------------------------------------------- tolerance rules
def index_of(t: torch.Tensor) -> tuple[int, ...]:
    """The multi-index of `t`'s largest element (() when empty)."""
    return tuple(int(i) for i in torch.unravel_index(t.argmax(), t.shape)) if t.numel() else ()


def assert_finite(name: str, out: torch.Tensor, where: Callable[[tuple], str] = str) -> None:
    bad = ~torch.isfinite(out)
    assert not bad.any(), f"{name}: {int(bad.sum())} non-finite outputs, the first at {where(index_of(bad.float()))}"


def assert_close(name: str, out: torch.Tensor, ref: torch.Tensor, atol: float, rtol: float,
                 where: Callable[[tuple], str] = str) -> None:
    """Elementwise |out - ref| <= atol + rtol * |ref|, compared in fp32. On failure: how many
    elements, the max diff and where, the worst excess with both values. `where` turns a
    multi-index into words (default: the index itself)."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    out, ref = out.float().cpu(), ref.float().cpu()
    assert_finite(name, out, where)
    diff = (out - ref).abs()
    excess = diff - (atol + rtol * ref.abs())
    if excess.numel() and excess.max() > 0:
        at = index_of(excess)
        raise AssertionError(
            f"{name}: {int((excess > 0).sum())} of {diff.numel()} elements outside atol={atol} rtol={rtol}; "
            f"max diff {diff.max():.3g} at {where(index_of(diff))}; worst excess at {where(at)}: "
            f"got {out[at]:.7g}, expected {ref[at]:.7g}"
        )


def assert_within_torch_error(name: str, out: torch.Tensor, ref_lowp: torch.Tensor, ref32: torch.Tensor,
                              atol: float, where: Callable[[tuple], str] = str) -> None:
    """max |out - ref32| <= 2 * max |ref_lowp - ref32| + atol: a low-precision result may be at most
    twice as far from the fp32 reference as torch's own result in that dtype is."""
    assert out.shape == ref32.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref32.shape)}"
    assert out.dtype == ref_lowp.dtype, f"{name}: dtype {out.dtype} != torch's {ref_lowp.dtype}"
    out, ref32 = out.float().cpu(), ref32.float().cpu()
    assert_finite(name, out, where)
    err = (out - ref32).abs()
    torch_err = (ref_lowp.float().cpu() - ref32).abs().max().item() if err.numel() else 0.0
    bound = 2 * torch_err + atol
    if err.numel() and err.max() > bound:
        at = index_of(err)
        raise AssertionError(
            f"{name}: max error vs fp32 {err.max():.3g} at {where(at)} (got {out[at]:.7g}, fp32 {ref32[at]:.7g}) "
            f"exceeds 2 x torch's own {ref_lowp.dtype} error {torch_err:.3g} + {atol}"
        )


def check_against_torch(name: str, out: torch.Tensor, ref_fn: Callable, inputs: Sequence, atol: float,
                        rtol: float, where: Callable[[tuple], str] = str) -> None:
    """`out`, computed from `inputs`, against the torch op `ref_fn`: in fp32 directly
    (`assert_close`), in a lower precision by the 2x rule, with fp32 from the inputs upcast."""
    lowp = next((x.dtype for x in inputs if isinstance(x, torch.Tensor) and x.is_floating_point()), torch.float32)
    if lowp == torch.float32:
        assert_close(name, out, ref_fn(*inputs), atol, rtol, where)
        return
    up = [x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs]
    assert_within_torch_error(name, out, ref_fn(*inputs), ref_fn(*up), atol, where)


# ----------------------------------------------------------------------------- references
def dense_attention(qkv: torch.Tensor, lengths: Sequence[int], window: int | None, scale: float) -> torch.Tensor:
    """Float64 softmax attention with an explicit |i - j| <= window mask, one sequence at a time,
    on the CPU: [T, heads * head_dim]. Shares no code with ops_torch's banded path."""
    q, k, v = qkv.double().cpu().unbind(1)  # [T, heads, d]
    out, start = [], 0
    for n in lengths:
        sl = slice(start, start + n)
        s = torch.einsum("ihd,jhd->hij", q[sl], k[sl]) * scale
        if window is not None:
            pos = torch.arange(n)
            s = s.masked_fill((pos[:, None] - pos[None, :]).abs()[None] > window, float("-inf"))
        out.append(torch.einsum("hij,jhd->ihd", s.softmax(-1), v[sl]).reshape(n, -1))
        start += n
    return torch.cat(out)


def transformers_reference(folder, ids: Sequence[Sequence[int]], device="cpu", dtype=torch.float32):
    """transformers' ModernBertModel (SDPA attention) on `ids`, one sequence at a time (no padding):
    (hidden states, one float32 CPU tensor [len, H] per input; mean-pooled and normalised
    embeddings, float32 CPU [N, H])."""
    import transformers

    try:
        model = transformers.ModernBertModel.from_pretrained(folder, attn_implementation="sdpa", dtype=dtype)
    except TypeError:  # transformers before `dtype=`
        model = transformers.ModernBertModel.from_pretrained(folder, attn_implementation="sdpa", torch_dtype=dtype)
    model = model.to(device).eval()
    hidden, pooled = [], []
    with torch.inference_mode():
        for seq in ids:
            h = model(input_ids=torch.tensor([list(seq)], device=device)).last_hidden_state[0].float()
            hidden.append(h.cpu())
            pooled.append(torch.nn.functional.normalize(h.mean(0), dim=0).cpu())
    del model
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return hidden, torch.stack(pooled)


def max_diff(ours: Sequence[torch.Tensor], ref: Sequence[torch.Tensor]) -> tuple[float, str]:
    """The largest |ours - ref| over per-input hidden states, and where it is (input, its length,
    token, feature). Shapes must agree; a non-finite value counts as an infinite difference."""
    assert len(ours) == len(ref), f"{len(ours)} outputs for {len(ref)} reference inputs"
    worst, where = 0.0, "nowhere"
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert a.shape == b.shape, f"input {i}: shape {tuple(a.shape)} vs the reference's {tuple(b.shape)}"
        d = (a.float().cpu() - b.float().cpu()).abs()
        if not torch.isfinite(d).all():
            return float("inf"), f"input {i} (length {a.shape[0]}): non-finite"
        if d.numel() and d.max().item() > worst:
            token, feature = divmod(int(d.argmax()), d.shape[-1])
            worst, where = d.max().item(), f"input {i} (length {a.shape[0]}), token {token}, feature {feature}"
    return worst, where


def cosines(a, b) -> torch.Tensor:
    """Row-wise cosine similarity of two [N, H] arrays or tensors (float32, CPU)."""
    a, b = torch.as_tensor(a).float().cpu(), torch.as_tensor(b).float().cpu()
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)
