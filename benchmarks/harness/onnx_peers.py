"""The CPU runtimes people deploy embeddings on, run on an ONNX export of the benchmark's checkpoint:
ONNX Runtime and OpenVINO, each given length-sorted padded batches (`padded_batches`, 32 documents
by default), as their users run them.

The export is transformers' `ModernBertModel` wrapped with masked mean pooling and L2
normalisation (`PooledModel`), so every runtime returns the same [N, H] embeddings as the other
engines; a cross-encoder's (`ModernBertForSequenceClassification`) is its float32 logits
[N, num_labels] (`LogitsModel`), the scores the rerank rows compare; inputs `input_ids` and `attention_mask` with dynamic batch and sequence axes. fp32 goes
through the TorchScript exporter at opset 18 (the dynamo exporter works too, but takes longer); the
exported attention materialises its heads x L x L scores, which is what bounds the runtimes'
memory on long documents.

A runtime that cannot run a dtype says why: `ort_engine(..., "bf16")` first asks ONNX Runtime for
a bfloat16 MatMul on a one-node graph (milliseconds) and only exports a bf16 model (dynamo: the
TorchScript exporter fails on bf16 weights) when that works, so the table gives the runtime's
own error as the reason.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from .corpora import Corpus
from .engines import Engine, load_transformers_model, padded_batches
from .rounds import CannotRun

INPUTS = ["input_ids", "attention_mask"]


class PooledModel(torch.nn.Module):
    """ModernBertModel -> masked mean over the real tokens (in fp32) -> L2 normalise."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).float()  # (B, L, 1)
        pooled = (hidden.float() * mask).sum(1) / mask.sum(1)  # (B, H)
        return torch.nn.functional.normalize(pooled, dim=-1)


class LogitsModel(torch.nn.Module):
    """ModernBertForSequenceClassification -> its logits in fp32 (a cross-encoder's scores)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits.float()


def is_classifier(checkpoint: Path) -> bool:
    """Whether the folder holds a sequence classifier (a cross-encoder) rather than an embedder."""
    arch = json.loads((Path(checkpoint) / "config.json").read_text()).get("architectures") or []
    return any(a.endswith("ForSequenceClassification") for a in arch)


def _exportable(checkpoint: Path, dtype: torch.dtype) -> tuple[torch.nn.Module, str]:
    """The module to export and its output's name: pooled embeddings, or a classifier's logits."""
    if not is_classifier(checkpoint):
        return PooledModel(load_transformers_model(checkpoint, dtype)).eval(), "embeddings"
    import transformers

    try:
        model = transformers.ModernBertForSequenceClassification.from_pretrained(
            checkpoint, attn_implementation="sdpa", dtype=dtype)
    except TypeError:  # transformers < 4.56
        model = transformers.ModernBertForSequenceClassification.from_pretrained(
            checkpoint, attn_implementation="sdpa", torch_dtype=dtype)
    return LogitsModel(model.to(dtype)).eval(), "logits"


@contextlib.contextmanager
def _quiet():
    """The exporters and quantisers warn at length about things that do not matter here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loggers = [logging.getLogger(name) for name in ("", "nncf", "onnxruntime")]
        levels = [log.level for log in loggers]
        for log in loggers:
            log.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for log, level in zip(loggers, levels):
                log.setLevel(level)


def export_onnx(checkpoint: Path, path: Path, dtype: torch.dtype = torch.float32) -> Path:
    """Export the checkpoint (through transformers, SDPA attention) to `path`, once: an existing
    file is kept. An embedder gives pooled embeddings (`PooledModel`), a sequence classifier its
    logits (`LogitsModel`). fp32 uses the TorchScript exporter; other dtypes the dynamo exporter
    (the TorchScript one fails on bf16 weights)."""
    if path.is_file():
        return path
    model, output = _exportable(checkpoint, dtype)
    ids = torch.full((2, 160), 5, dtype=torch.int64)  # past the local window, one row padded
    mask = torch.ones_like(ids)
    mask[1, 100:] = 0
    tmp = path.with_name(path.name + ".partial")
    with _quiet(), torch.no_grad():
        if dtype == torch.float32:
            axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
                    output: {0: "batch"}}
            torch.onnx.export(model, (ids, mask), str(tmp), input_names=INPUTS, output_names=[output],
                              dynamic_axes=axes, opset_version=18, dynamo=False)
        else:
            batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
            shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
            torch.onnx.export(model, (ids, mask), str(tmp), input_names=INPUTS, output_names=[output],
                              dynamic_shapes=shapes, opset_version=18, dynamo=True, verbose=False)
    tmp.replace(path)
    return path


def quantize_onnx_int8(fp32_path: Path, path: Path) -> Path:
    """ONNX Runtime's dynamic quantisation: int8 weights, activations quantised per call."""
    if path.is_file():
        return path
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = path.with_name(path.name + ".partial")
    with _quiet():
        quantize_dynamic(str(fp32_path), str(tmp), weight_type=QuantType.QInt8)
    tmp.replace(path)
    return path


def ort_bf16_matmul_error() -> str | None:
    """None when ONNX Runtime's CPU provider runs a bfloat16 MatMul, else its error."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    a = helper.make_tensor_value_info("a", TensorProto.BFLOAT16, [2, 2])
    y = helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [2, 2])
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "a"], ["y"])], "probe", [a], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = min(model.ir_version, 9)
    try:
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return None
    except Exception as e:  # the runtime's own words are the reason given in the table
        return f"{type(e).__name__}: {e}".strip()[:300]


class _PaddedRunner(Engine):
    """The batching every ONNX runtime shares: padded batches in, [N, H] float32 torch out."""

    batch_size = 32
    pad = 0

    def run(self, batch: np.ndarray, mask: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def encode(self, corpus: Corpus) -> torch.Tensor:
        out = None
        for rows, batch, mask in padded_batches(corpus.ids, self.batch_size, self.pad):
            emb = self.run(batch, mask)
            if out is None:
                out = np.empty((corpus.num_docs, emb.shape[1]), dtype=np.float32)
            out[rows] = emb
        return torch.from_numpy(out)


class OnnxRuntime(_PaddedRunner):
    """An `onnxruntime.InferenceSession` on the CPU provider, `threads` intra-op threads, every
    graph optimisation on (the runtime's default)."""

    def __init__(self, onnx_path: Path, pad: int, threads: int, batch_size: int = 32, label: str = "fp32"):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        self.pad, self.batch_size = pad, batch_size
        self.label = f"onnxruntime {ort.__version__} CPU, {label}, {threads} threads, batch {batch_size}"

    def run(self, batch, mask):
        return self.session.run(None, {"input_ids": batch, "attention_mask": mask})[0]

    def close(self) -> None:
        del self.session


class OpenVINO(_PaddedRunner):
    """`openvino.Core().compile_model` on the CPU: precision "f32" or "bf16" (the
    INFERENCE_PRECISION_HINT), or "int8": NNCF's int8 weight compression (asymmetric, per
    channel) compiled with the plugin's defaults, which quantise activations on the fly."""

    def __init__(self, onnx_path: Path, pad: int, threads: int, precision: str, batch_size: int = 32):
        import openvino as ov

        core = ov.Core()
        config = {"INFERENCE_NUM_THREADS": threads}
        if precision == "int8":
            import nncf

            with _quiet():
                model = nncf.compress_weights(core.read_model(str(onnx_path)), mode=nncf.CompressWeightsMode.INT8_ASYM)
        else:
            model = str(onnx_path)
            config["INFERENCE_PRECISION_HINT"] = precision
        self.compiled = core.compile_model(model, "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.pad, self.batch_size = pad, batch_size
        got = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        got = got.to_string() if hasattr(got, "to_string") else str(got)
        detail = f"{precision}, runs {got}" if precision == "int8" else str(got)
        if precision == "int8":
            detail += f", dynamic quantisation group {self.compiled.get_property('DYNAMIC_QUANTIZATION_GROUP_SIZE')}"
        self.label = f"openvino {ov.__version__.split('-')[0]} CPU, {detail}, {threads} threads, batch {batch_size}"

    def run(self, batch, mask):
        self.request.infer({"input_ids": batch, "attention_mask": mask})
        return self.request.get_output_tensor(0).data.copy()

    def close(self) -> None:
        del self.request, self.compiled


def onnx_paths(folder: Path) -> dict[str, Path]:
    """Where a run keeps its exports: beside the checkpoint, so that `--checkpoint DIR` reuses them."""
    return {"fp32": folder / "onnx" / "model.onnx", "bf16": folder / "onnx" / "model_bf16.onnx",
            "int8": folder / "onnx" / "model_int8_dynamic.onnx"}


def ort_engine(folder: Path, dtype: str, pad: int, threads: int, batch_size: int = 32) -> OnnxRuntime:
    """ONNX Runtime in `dtype` (fp32, bf16 or int8) on the export of the checkpoint in `folder`."""
    paths = onnx_paths(folder)
    paths["fp32"].parent.mkdir(exist_ok=True)
    export_onnx(folder, paths["fp32"])
    if dtype == "fp32":
        return OnnxRuntime(paths["fp32"], pad, threads, batch_size)
    if dtype == "int8":
        return OnnxRuntime(quantize_onnx_int8(paths["fp32"], paths["int8"]), pad, threads, batch_size,
                           label="int8 (quantize_dynamic, QInt8 weights)")
    if dtype == "bf16":
        err = ort_bf16_matmul_error()
        if err:
            raise CannotRun(f"this ONNX Runtime's CPU provider has no bfloat16 MatMul ({err})")
        return OnnxRuntime(export_onnx(folder, paths["bf16"], torch.bfloat16), pad, threads, batch_size,
                           label="bf16")
    raise ValueError(f"unknown dtype {dtype!r} for ONNX Runtime")


def openvino_engine(folder: Path, dtype: str, pad: int, threads: int, batch_size: int = 32) -> OpenVINO:
    """OpenVINO in `dtype` (fp32, bf16 or int8) on the fp32 export of the checkpoint in `folder`."""
    path = onnx_paths(folder)["fp32"]
    path.parent.mkdir(exist_ok=True)
    export_onnx(folder, path)
    precision = {"fp32": "f32", "bf16": "bf16", "int8": "int8"}.get(dtype)
    if precision is None:
        raise ValueError(f"unknown dtype {dtype!r} for OpenVINO")
    return OpenVINO(path, pad, threads, precision, batch_size)


def default_threads() -> int:
    """The runtimes get as many threads as torch uses, so that every contender has the same cores."""
    return torch.get_num_threads() or os.cpu_count() or 1
