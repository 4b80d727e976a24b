"""The dispatch on every CUDA GPU, without one: device, dtype and op choices per compute capability,
tiles per architecture, the device guard around launches, and the load-time self-check.

The GPU is faked by monkeypatching `torch.cuda` (availability, count, capability, name, current
device). The self-check runs for real: the Triton ops under the interpreter on the CPU (on the GPU
where there is one), in float32 (the interpreter mishandles bf16 dots).
"""

from __future__ import annotations

import contextlib
import re
import warnings
from dataclasses import replace

import pytest
import torch

from modernbert_embed import Checkpoint, Engine, ops
from modernbert_embed.config import ModernBertConfig
from modernbert_embed.kernels import _arch
from modernbert_embed.kernels import attention as attention_mod

from conftest import HAS_CUDA, SMALL_CONFIG, random_ids, requires_cuda

pytest.importorskip("triton")


@pytest.fixture
def fake_gpus(monkeypatch):
    """fake_gpus(count, capability, name): this process now sees `count` CUDA GPUs of that kind,
    current device 0."""

    def install(count=1, capability=(9, 0), name="NVIDIA H100 80GB HBM3"):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        _arch._cuda_arch.cache_clear()

    yield install
    _arch._cuda_arch.cache_clear()


CUDA0 = torch.device("cuda", 0)


# ----------------------------------------------------------------------------- device
def test_a_device_index_the_machine_lacks_is_refused(fake_gpus):
    fake_gpus(count=1)
    with pytest.raises(ValueError, match=r"'cuda:7' does not exist: this machine has 1 CUDA GPU \(cuda:0\)"):
        ops.resolve_device("cuda:7")


def test_every_index_the_machine_has_is_accepted(fake_gpus):
    fake_gpus(count=2)
    assert ops.resolve_device("cuda:1") == torch.device("cuda", 1)
    assert ops.resolve_device("cuda") == CUDA0  # the current device, with its index
    assert ops.resolve_device(None) == CUDA0  # CUDA when present
    with pytest.raises(ValueError, match=r"'cuda:2' does not exist: this machine has 2 CUDA GPUs \(cuda:0, cuda:1\)"):
        ops.resolve_device("cuda:2")


def test_cuda_without_a_gpu_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ops.resolve_device(None) == torch.device("cpu")
    with pytest.raises(ValueError, match="no CUDA GPU is available"):
        ops.resolve_device("cuda:0")


# ----------------------------------------------------------------------------- dtype
@pytest.mark.parametrize("capability, default", [((9, 0), torch.bfloat16), ((8, 9), torch.bfloat16),
                                                 ((8, 0), torch.bfloat16), ((7, 5), torch.float16),
                                                 ((7, 0), torch.float16)])
def test_default_dtype_is_bf16_only_with_native_bf16(fake_gpus, capability, default):
    fake_gpus(capability=capability)
    assert ops.resolve_dtype(None, CUDA0) == default
    assert ops.resolve_dtype("fp16", CUDA0) == torch.float16
    assert ops.resolve_dtype(torch.float32, CUDA0) == torch.float32


@pytest.mark.parametrize("asked", ["bf16", "bfloat16", torch.bfloat16])
def test_bf16_is_refused_before_ampere_with_the_remedy(fake_gpus, asked):
    fake_gpus(capability=(7, 5), name="Tesla T4")
    with pytest.raises(ValueError, match=r"Tesla T4 \(sm_75\) has no native bf16: use float16 \(the default there\)"):
        ops.resolve_dtype(asked, CUDA0)


def test_the_cpu_defaults_to_float32_and_takes_any_dtype():
    cpu = torch.device("cpu")
    assert ops.resolve_dtype(None, cpu) == torch.float32
    assert ops.resolve_dtype("bf16", cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="dtype 'int8' is not supported"):
        ops.resolve_dtype("int8", cpu)


# ----------------------------------------------------------------------------- op choices
def _kinds(chosen: ops.Ops) -> dict[str, str]:
    """{op: "torch" or "triton"} by where each function of `chosen` comes from (the torch path's
    layer norm and pooling are the reference's own)."""
    def kind(fn):
        return "torch" if fn.__module__ in ("modernbert_embed.ops_torch", "modernbert_embed.reference") else "triton"

    return {n: kind(getattr(chosen, n)) for n in ops.OP_NAMES}


@pytest.mark.parametrize("capability, attention", [((9, 0), "triton"), ((8, 9), "triton"), ((8, 6), "triton"),
                                                   ((8, 0), "triton"), ((7, 5), "torch")])
def test_triton_ops_from_turing_and_triton_attention_from_ampere(fake_gpus, capability, attention):
    fake_gpus(capability=capability)
    chosen = ops.select_ops(CUDA0)
    kinds = _kinds(chosen)
    assert kinds == {"layer_norm": "triton", "rotary": "triton", "attention": attention, "geglu": "triton",
                     "pool": "triton"}
    if attention == "triton":
        assert chosen.attention is attention_mod.attention
    assert not chosen.fused_rotary  # the rotary op runs (rotary inside attention is an experiment)
    assert chosen.pack_linear is ops.ops_torch.keep_weight  # GPU GEMMs take the checkpoint's layout


def test_torch_ops_before_turing_and_on_the_cpu(fake_gpus):
    fake_gpus(capability=(7, 0), name="Tesla V100")
    assert set(_kinds(ops.select_ops(CUDA0)).values()) == {"torch"}
    assert ops.select_ops(CUDA0).linear is ops.ops_torch.linear
    assert ops.select_ops(CUDA0).rotary is ops.TORCH_OPS.rotary  # the halves' layout, as Triton's
    cpu = ops.select_ops("cpu")
    assert set(_kinds(cpu).values()) == {"torch"} and cpu.pack_linear is ops.ops_torch.cpu_pack
    assert cpu.rotary_pairs and cpu.rotary is ops.ops_torch.rotary_pairs


def test_experiments_are_honoured_on_every_gpu(fake_gpus):
    fake_gpus(capability=(7, 5))
    forced = ops.select_ops(CUDA0, attention="triton")  # asked for: measured, not chosen by default
    assert forced.attention is attention_mod.attention
    rope = ops.select_ops(CUDA0, attention="triton-rope")
    assert rope.fused_rotary and rope.attention is attention_mod.attention
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        ops.select_ops(CUDA0, attention="flash")


def test_gpu_dtypes_follow_native_bf16():
    assert ops.gpu_dtypes(90) == (torch.bfloat16, torch.float16, torch.float32)
    assert ops.gpu_dtypes(80)[0] == torch.bfloat16
    assert ops.gpu_dtypes(75) == (torch.float16, torch.float32)


# ----------------------------------------------------------------------------- tiles per architecture
class _CaughtLaunch:
    """Stands in for a @triton.jit kernel: `kernel[grid](...)` records the launch's options."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append(kwargs)


def _attention_tiles(monkeypatch, dtype=torch.float16, window=None, rope=False):
    kernel = _CaughtLaunch()
    monkeypatch.setattr(attention_mod, "_attention_kernel", kernel)
    from modernbert_embed.batching import pack

    batch = pack([[0] * 5], [0])
    qkv = torch.zeros(5, 3, 2, 64, dtype=dtype)
    tables = (torch.zeros(8, 32), torch.zeros(8, 32)) if rope else None
    attention_mod.attention(qkv, batch, window, 0.125, rope=tables)
    (kw,) = kernel.launches
    return kw["BLOCK_M"], kw["BLOCK_N"], kw["num_warps"], kw["num_stages"]


def test_attention_tiles_follow_the_target_architecture(monkeypatch):
    with _arch.target_arch(90):
        hopper = _attention_tiles(monkeypatch)
    with _arch.target_arch(86):
        ampere = _attention_tiles(monkeypatch)
        ampere_rope = _attention_tiles(monkeypatch, rope=True)
        local = _attention_tiles(monkeypatch, window=64)
        fp32 = _attention_tiles(monkeypatch, dtype=torch.float32)
    assert hopper == (128, 64, 4, 3)
    assert ampere == (128, 64, 8, 3)  # 4 warps would need 255 registers a thread there
    assert ampere_rope == (128, 32, 8, 3)
    assert local == (64, 64, 4, 3)
    assert fp32 == (64, 32, 8, 3)
    assert _arch.device_arch(torch.device("cpu")) is None  # outside the block: the interpreter's runs


def test_the_launcher_asks_for_the_tensors_device(monkeypatch):
    asked = []
    monkeypatch.setattr(attention_mod, "device_arch", lambda device: asked.append(device) or 80)
    assert _attention_tiles(monkeypatch) == (128, 64, 8, 3)  # Ampere's, from what device_arch said
    assert asked == [torch.device("cpu")]


def test_device_arch_reads_each_gpu_once(fake_gpus, monkeypatch):
    fake_gpus(count=2)
    calls = []
    by_index = {0: (9, 0), 1: (8, 6)}

    def capability(device=None):
        calls.append(device)
        return by_index[torch.device(device).index]

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    assert _arch.device_arch(torch.device("cuda", 1)) == 86
    assert _arch.device_arch(torch.device("cuda", 0)) == 90
    assert _arch.device_arch(torch.device("cuda", 1)) == 86
    assert _arch.device_arch(torch.device("cuda")) == 90  # no index: the current device
    assert len(calls) == 2, calls  # once per GPU, then cached


# ----------------------------------------------------------------------------- the device guard
@pytest.fixture(scope="module")
def cpu_engine(small_checkpoint):
    return Engine.load(Checkpoint(small_checkpoint), "cpu", torch.float32)


def test_on_device_enters_the_engines_gpu(cpu_engine, monkeypatch):
    entered = []

    class Recorder(contextlib.AbstractContextManager):
        def __init__(self, device):
            entered.append(device)

        def __exit__(self, *exc):
            return None

    monkeypatch.setattr(torch.cuda, "device", Recorder)
    monkeypatch.setattr(cpu_engine, "device", torch.device("cuda", 1))
    with cpu_engine.on_device():
        pass
    assert entered == [torch.device("cuda", 1)]


def test_every_launch_of_embed_and_hidden_states_happens_inside_on_device(cpu_engine, monkeypatch):
    inside = [False]
    # every op, the GEMM of the Linear layers included; on the CPU GeGLU runs inside Wi's GEMM
    fused = cpu_engine.ops.geglu_linear is not None
    names = [n for n in (*ops.OP_NAMES, "linear", "geglu_linear") if getattr(cpu_engine.ops, n) is not None]
    calls = {n: [] for n in names}

    @contextlib.contextmanager
    def on_device():
        inside[0] = True
        try:
            yield
        finally:
            inside[0] = False

    def spy(name):
        real = getattr(cpu_engine.ops, name)

        def op(*args, **kwargs):
            calls[name].append(inside[0])
            return real(*args, **kwargs)

        return op

    spied = replace(cpu_engine.ops, **{n: spy(n) for n in names})
    # the model and the engine hold the same Ops record; every module reads its ops from it
    for module in cpu_engine.model.modules():
        if getattr(module, "ops", None) is cpu_engine.ops:
            monkeypatch.setattr(module, "ops", spied)
    monkeypatch.setattr(cpu_engine, "ops", spied)
    monkeypatch.setattr(cpu_engine, "on_device", on_device)
    ids = random_ids([5, 140, 9])
    cpu_engine.embed(ids)
    cpu_engine.hidden_states(ids)
    assert all(calls[n] for n in names if not (fused and n == "geglu")), {n: len(c) for n, c in calls.items()}
    assert all(all(c) for c in calls.values()), "an op ran outside the engine's device context"


# ----------------------------------------------------------------------------- the load-time self-check
DEVICE = torch.device("cuda", 0) if HAS_CUDA else torch.device("cpu")
CFG = ModernBertConfig.from_dict(SMALL_CONFIG)
GPU = "Tesla T4 (sm_75)"


@pytest.fixture
def named_gpu(monkeypatch):
    """The self-check's warning names the GPU; on the CPU there is none, so it gets a name."""
    monkeypatch.setattr(ops, "gpu_name", lambda device: GPU)


def _checked(chosen, dtype=torch.float32):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = ops.self_check(chosen, CFG, DEVICE, dtype)
    return result, [w for w in caught if issubclass(w.category, RuntimeWarning)]


def test_correct_ops_pass_unchanged_and_silently(named_gpu):
    triton_ops = ops.select_ops(DEVICE, backend="triton")
    checked, warned = _checked(triton_ops)
    assert checked is triton_ops
    assert warned == []


def test_rotary_inside_attention_passes_too(named_gpu):
    rope = ops.select_ops(DEVICE, backend="triton", attention="triton-rope")
    checked, warned = _checked(rope)
    assert checked is rope and warned == []


def _raises(*args, **kwargs):
    raise RuntimeError("triton.compiler.errors.CompilationError: at 12:8: unsupported")


def _off_by_one(u):
    return ops.TORCH_OPS.geglu(u) + 1


def _too_wide(u):
    return u[..., : u.shape[-1] // 2 + 1].clone()


def _nan(u):
    return ops.TORCH_OPS.geglu(u) * float("nan")


@pytest.mark.parametrize("broken, why", [(_raises, r"failed \(RuntimeError: triton.compiler"),
                                         (_off_by_one, r"disagrees with torch \(max abs diff 1\)"),
                                         (_too_wide, r"returns shapes \[\(140, 193\)\], torch's \[\(140, 192\)\]"),
                                         (_nan, r"disagrees with torch \(max abs diff nan\)")])
def test_a_broken_op_falls_back_to_torch_with_one_warning(named_gpu, broken, why):
    triton_ops = ops.select_ops(DEVICE, backend="triton")
    checked, warned = _checked(replace(triton_ops, geglu=broken))
    assert len(warned) == 1, [str(w.message) for w in warned]
    message = str(warned[0].message)
    assert GPU in message and "the triton geglu op " in message
    assert re.search(why, message), message
    assert "using torch's geglu instead" in message
    assert checked.geglu is ops.TORCH_OPS.geglu
    # the other ops stay Triton's
    assert _kinds(checked) == {"layer_norm": "triton", "rotary": "triton", "attention": "triton",
                               "geglu": "torch", "pool": "triton"}


def test_a_nan_in_any_output_of_an_op_is_caught(named_gpu):
    # layer_norm returns (normed, residual sum): a NaN in the second output counts as much
    def nan_sum(x, weight, eps, residual=None):
        y, s = ops.TORCH_OPS.layer_norm(x, weight, eps, residual)
        return y, s * float("nan")

    checked, warned = _checked(replace(ops.select_ops(DEVICE, backend="triton"), layer_norm=nan_sum))
    assert len(warned) == 1
    assert "the triton layer_norm op disagrees with torch (max abs diff nan)" in str(warned[0].message)
    assert checked.layer_norm is ops.TORCH_OPS.layer_norm


def _one_off(fn):
    """`fn` with 1 added to every output: what a mistaken change to an op would give."""
    def op(*args, **kwargs):
        out = fn(*args, **kwargs)
        return tuple(t + 1 for t in out) if isinstance(out, tuple) else out + 1

    return op


def test_a_change_to_the_tuned_torch_path_cannot_move_the_oracle(named_gpu, monkeypatch):
    """The self-check compares against `reference`, which nothing tunes. With every op of the tuned
    torch path off by one (the `ops_torch` functions and the torch path's Ops records), correct
    Triton ops still pass silently, and a broken one is still found, by its own error."""
    from modernbert_embed import ops_torch

    for name in (*ops.OP_NAMES, "rotary_pairs"):
        monkeypatch.setattr(ops_torch, name, _one_off(getattr(ops_torch, name)))
    for record in ("TORCH_OPS", "CPU_OPS"):
        tuned = getattr(ops, record)
        monkeypatch.setattr(ops, record, replace(tuned, **{n: _one_off(getattr(tuned, n)) for n in ops.OP_NAMES}))
    triton_ops = ops.select_ops(DEVICE, backend="triton")
    checked, warned = _checked(triton_ops)
    assert checked is triton_ops and warned == [], [str(w.message) for w in warned]
    checked, warned = _checked(replace(triton_ops, geglu=lambda u: u[..., : u.shape[-1] // 2] * 0 + 2))
    assert len(warned) == 1 and "the triton geglu op disagrees with torch" in str(warned[0].message)


def _embed(folder, chosen, ids):
    engine = Engine.load(Checkpoint(folder), DEVICE, torch.float32, ops=chosen)
    return engine.embed(ids).cpu()


def test_the_model_with_a_checked_broken_op_gives_torchs_result(named_gpu, small_checkpoint):
    ids = random_ids([3, 140, 20], seed=1)
    broken = replace(ops.select_ops(DEVICE, backend="triton"), geglu=_off_by_one)
    checked, warned = _checked(broken)
    assert len(warned) == 1
    want = _embed(small_checkpoint, ops.select_ops(DEVICE, backend="torch"), ids)
    got = _embed(small_checkpoint, checked, ids)
    assert (got - want).abs().max() <= 1e-5
    # without the check the broken op would have reached the embeddings
    assert (_embed(small_checkpoint, broken, ids) - want).abs().max() > 1e-2


def test_a_triton_that_imports_but_cannot_compile_is_caught_at_load(named_gpu, monkeypatch, small_checkpoint):
    # every kernel launch fails as it would where triton has no working backend for the GPU
    kernel_type = type(attention_mod._attention_kernel)  # JITFunction, or the interpreter's stand-in

    def cannot_compile(self, *args, **kwargs):
        raise RuntimeError("ptxas fatal   : Value 'sm_75' is not defined for option 'gpu-name'")

    monkeypatch.setattr(kernel_type, "run", cannot_compile)
    checked, warned = _checked(ops.select_ops(DEVICE, backend="triton"))
    assert len(warned) == 1, [str(w.message) for w in warned]
    message = str(warned[0].message)
    for name in ops.OP_NAMES:
        assert f"the triton {name} op failed (RuntimeError: ptxas fatal" in message
    assert GPU in message
    assert set(_kinds(checked).values()) == {"torch"}
    ids = random_ids([4, 30])
    want = _embed(small_checkpoint, ops.TORCH_OPS, ids)
    assert (_embed(small_checkpoint, checked, ids) - want).abs().max() <= 1e-5


@requires_cuda
def test_loading_on_a_gpu_runs_the_self_check(monkeypatch, small_checkpoint):
    kernel_type = type(attention_mod._attention_kernel)

    def cannot_compile(self, *args, **kwargs):
        raise RuntimeError("simulated: this triton cannot compile for the GPU")

    monkeypatch.setattr(kernel_type, "run", cannot_compile)
    with pytest.warns(RuntimeWarning, match=r"the triton layer_norm op failed \(RuntimeError: simulated"):
        engine = Engine.load(Checkpoint(small_checkpoint), "cuda", torch.float32)
    assert set(_kinds(engine.ops).values()) == {"torch"}
    assert engine.embed(random_ids([4, 30])).isfinite().all()
