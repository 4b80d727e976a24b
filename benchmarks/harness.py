"""One harness for every benchmark: corpora, timing, the engines compared, machine capture, MFU,
memory, and the results files.

Every engine in a table runs on the same random checkpoint (the real layout, a fixed seed) and the
same token ids, so that rows differ only in the engine:

- ours: `Embedder.encode_tokens` (unpadded, packed under a token budget);
- transformers: `ModernBertModel` (SDPA attention) on length-sorted, padded batches of 32 with
  masked mean pooling and L2 normalisation -- what sentence-transformers computes;
- sentence-transformers: `SentenceTransformer(folder).encode(texts)`. It takes text, so the
  corpus is spelled as words of an "id tokenizer" written beside the checkpoint (`w123` is token
  123, wrapped in [CLS] ... [SEP] by its post-processor): the ids it encodes are exactly the
  corpus ids, and its timing includes its own (cheap) tokenisation.

Timings are medians with 20th/80th percentiles after warm-up; CUDA is synchronised around each
repeat. Throughput is in tokens/s and docs/s; MFU is model FLOPs per token (matmuls only, see
`ModernBertConfig.flops_per_token`) x tokens/s over a peak: the card's dense bf16 peak where the
GPU is known, and a large matmul measured on the same machine in the same run.
"""

from __future__ import annotations

import gc
import importlib.metadata
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from modernbert_embed.config import ModernBertConfig
from modernbert_embed.weights import small_config

ROOT = Path(__file__).resolve().parents[1]

def add_output_args(p, append: bool = True) -> None:
    """The results-file options every benchmark script takes."""
    p.add_argument("--out", type=Path, default=None, help="write this run's results as JSON")
    if append:
        p.add_argument("--append", type=Path, default=None, help="append this run's results as one JSON line")
    p.add_argument("--markdown", type=Path, default=None, help="append the table to this markdown file")


# ----------------------------------------------------------------------------- model shapes
# A small ModernBERT (4.48 schema) for smoke runs: the one the tests use.
SMALL_CONFIG: dict[str, Any] = small_config()


def config_dict(name: str) -> dict[str, Any]:
    """`base` (the full modernbert-embed-base shape) or `small`."""
    if name == "base":
        return ModernBertConfig().to_dict()
    if name == "small":
        return dict(SMALL_CONFIG)
    raise ValueError(f"unknown config {name!r}; choose base or small")


def write_checkpoint(folder: Path, config_name: str = "base", seed: int = 0) -> Path:
    """The random checkpoint every engine of a run loads (written once per run)."""
    from modernbert_embed.weights import write_random_checkpoint

    return write_random_checkpoint(folder, config_dict(config_name), seed=seed)


# ----------------------------------------------------------------------------- token ids
@dataclass(frozen=True)
class Vocab:
    """Which ids a corpus uses: [CLS] body... [SEP], body ids drawn from low..high-1."""

    cls: int
    sep: int
    pad: int
    unk: int
    low: int
    high: int

    @classmethod
    def of(cls, cfg: ModernBertConfig) -> "Vocab":
        specials = {cfg.cls_token_id, cfg.sep_token_id, cfg.pad_token_id}
        if min(specials) > cfg.vocab_size // 2:  # base: specials at the top, body 0..50279
            low, high = 0, min(specials) - 1
        else:  # small: specials at the bottom
            low, high = max(specials) + 1, cfg.vocab_size
        unk = next(i for i in range(cfg.vocab_size) if not low <= i < high and i not in specials)
        return cls(cfg.cls_token_id, cfg.sep_token_id, cfg.pad_token_id, unk, low, high)


@dataclass
class Corpus:
    name: str
    ids: list[list[int]]
    description: str = ""

    @property
    def num_docs(self) -> int:
        return len(self.ids)

    @property
    def lengths(self) -> list[int]:
        return [len(s) for s in self.ids]

    @property
    def num_tokens(self) -> int:
        return sum(self.lengths)

    def flops(self, cfg: ModernBertConfig) -> float:
        """Model FLOPs to encode the whole corpus (unpadded)."""
        per_len: dict[int, float] = {}
        total = 0.0
        for n in self.lengths:
            if n not in per_len:
                per_len[n] = cfg.flops_per_token(n)
            total += n * per_len[n]
        return total

    def head(self, max_tokens: int) -> "Corpus":
        """The first documents up to `max_tokens` tokens (the last one cut short, [SEP] kept):
        a cheap warm-up with the corpus's kind of shapes."""
        out, total = [], 0
        for seq in self.ids:
            room = max_tokens - total
            if room < 3:
                break
            out.append(seq if len(seq) <= room else seq[:room - 1] + seq[-1:])
            total += len(out[-1])
        return Corpus(self.name + "-head", out or [self.ids[0][:2]])

    def summary(self) -> dict[str, Any]:
        lengths = np.array(self.lengths)
        return {
            "name": self.name, "description": self.description, "docs": self.num_docs,
            "tokens": int(lengths.sum()), "min_len": int(lengths.min()), "median_len": float(np.median(lengths)),
            "max_len": int(lengths.max()),
        }


def _docs(lengths: Sequence[int], vocab: Vocab, rng: np.random.Generator) -> list[list[int]]:
    out = []
    for n in lengths:
        body = rng.integers(vocab.low, vocab.high, size=max(int(n) - 2, 0)).tolist()
        out.append([vocab.cls] + body + [vocab.sep])
    return out


def mixed_corpus(vocab: Vocab, tokens: int, seed: int = 0, median: int = 100, sigma: float = 0.8,
                 cap: int = 512, min_len: int = 3) -> Corpus:
    """Log-normal lengths (median `median`, clipped to min_len..cap) until `tokens` are reached."""
    rng = np.random.default_rng(seed)
    lengths: list[int] = []
    total = 0
    while total < tokens:
        n = int(np.clip(round(float(rng.lognormal(math.log(median), sigma))), min_len, cap))
        lengths.append(n)
        total += n
    return Corpus("mixed", _docs(lengths, vocab, rng),
                  f"log-normal lengths, median {median}, {min_len}..{cap} tokens")


def fixed_corpus(vocab: Vocab, length: int, docs: int, seed: int = 1, name: str | None = None) -> Corpus:
    rng = np.random.default_rng(seed)
    return Corpus(name or f"fixed{length}", _docs([length] * docs, vocab, rng), f"{docs} x {length} tokens")


def long_corpus(vocab: Vocab, length: int, docs: int, seed: int = 2) -> Corpus:
    return fixed_corpus(vocab, length, docs, seed, name="long")


def id_texts(ids: Sequence[Sequence[int]]) -> list[str]:
    """The corpus spelled for the id tokenizer: the body of each sequence, one word per token."""
    return [" ".join(f"w{t}" for t in seq[1:-1]) for seq in ids]


def write_id_tokenizer(folder: Path, cfg: ModernBertConfig, max_length: int | None = None) -> None:
    """tokenizer.json + tokenizer_config.json where the word `w<i>` is token i and the
    post-processor adds [CLS] ... [SEP]: text from `id_texts` tokenises back to the exact ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    v = Vocab.of(cfg)
    vocab = {f"w{i}": i for i in range(v.low, v.high)}
    vocab.update({"[UNK]": v.unk, "[CLS]": v.cls, "[SEP]": v.sep, "[PAD]": v.pad})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", v.cls), ("[SEP]", v.sep)],
    )
    tok.add_special_tokens(["[UNK]", "[CLS]", "[SEP]", "[PAD]"])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "cls_token": "[CLS]", "sep_token": "[SEP]",
        "pad_token": "[PAD]", "unk_token": "[UNK]",
        "model_max_length": max_length or cfg.max_position_embeddings,
    }, indent=2))


def st_folder(checkpoint: Path, target: Path) -> Path:
    """A sentence-transformers folder on the checkpoint's weights with the id tokenizer (kept apart
    from the checkpoint so that our engine never sees the id tokenizer)."""
    target.mkdir(parents=True, exist_ok=True)
    for item in checkpoint.iterdir():
        dest = target / item.name
        if dest.exists() or dest.is_symlink():
            continue
        if item.suffix == ".safetensors":
            dest.symlink_to(item.resolve())
        elif item.is_dir():
            shutil.copytree(item, dest)
        elif item.name not in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(item, dest)
    write_id_tokenizer(target, ModernBertConfig.from_file(checkpoint / "config.json"))
    return target


# ----------------------------------------------------------------------------- timing
@dataclass
class Timing:
    times: list[float]

    @property
    def median(self) -> float:
        return float(np.median(self.times))

    @property
    def p20(self) -> float:
        return float(np.percentile(self.times, 20))

    @property
    def p80(self) -> float:
        return float(np.percentile(self.times, 80))


def synchronize(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure(fn: Callable[[], Any], device=None, warmup: int = 1, repeats: int = 3,
            warmup_fn: Callable[[], Any] | None = None) -> tuple[Timing, Any]:
    """Run `warmup_fn` (default `fn`) `warmup` times untimed, then `fn` `repeats` times timed;
    returns (Timing, the last timed result)."""
    result = None
    for _ in range(warmup):
        (warmup_fn or fn)()
    synchronize(device)
    times = []
    for _ in range(max(repeats, 1)):
        synchronize(device)
        t0 = time.perf_counter()
        result = fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return Timing(times), result


# ----------------------------------------------------------------------------- memory
def reset_peak_memory(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        try:  # Linux: "5" resets the VmHWM (peak RSS) of this process
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def peak_memory_mb(device) -> tuple[float, str]:
    """(MiB, what it measures): CUDA max allocated; on CPU the peak RSS since the last reset
    (or of the whole process where the peak cannot be reset)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20, "cuda max_memory_allocated"
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024, "peak RSS (VmHWM)"
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (rss / 1024 if sys.platform != "darwin" else rss / 2**20), "process peak RSS (ru_maxrss)"


def free_memory(device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- machine
def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> str:
    env = os.environ.get("MODERNBERT_EMBED_COMMIT")
    if env:
        return env
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device) -> dict[str, Any]:
    device = torch.device(device)
    info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "commit": git_commit(),
        "device": device.type,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "sentence_transformers": _version("sentence-transformers"),
        "numpy": np.__version__,
        "modernbert_embed": _version("modernbert-embed"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update({
            "gpu": torch.cuda.get_device_name(device),
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "gpu_sm_count": props.multi_processor_count,
            "cuda": torch.version.cuda,
        })
    return info


def machine_line(info: dict[str, Any]) -> str:
    where = info.get("gpu") or f"{info['cpu']} ({info['torch_threads']} threads)"
    versions = ", ".join(f"{k} {info[k]}" for k in ("torch", "triton", "transformers", "sentence_transformers")
                         if info.get(k))
    return f"{where}; {versions}; commit {info['commit']}; {info['date']}"


# ----------------------------------------------------------------------------- peaks and MFU
# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), matched on the device name.
GPU_BF16_PEAK_TFLOPS = [
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM (name "NVIDIA H100 80GB HBM3")
    ("GH200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
]


# Nominal HBM bandwidth (GB/s), matched the same way.
GPU_BANDWIDTH_GBS = [("H200", 4800.0), ("H100 PCIe", 2000.0), ("H100 NVL", 3900.0), ("H100", 3350.0),
                     ("GH200", 4000.0), ("A100-SXM4-80GB", 2039.0), ("A100", 1555.0), ("L40S", 864.0), ("L4", 300.0)]


def _match_gpu(table, gpu_name: str | None) -> float | None:
    """The value of the first key (most specific first) contained in the device name."""
    for key, value in table:
        if gpu_name and key.lower() in gpu_name.lower():
            return value
    return None


def nominal_peak_tflops(gpu_name: str | None) -> float | None:
    return _match_gpu(GPU_BF16_PEAK_TFLOPS, gpu_name)


def nominal_bandwidth_gbs(gpu_name: str | None) -> float | None:
    return _match_gpu(GPU_BANDWIDTH_GBS, gpu_name)


def cuda_missing(device: torch.device, script: str) -> bool:
    """True (and says so) when a CUDA run was asked for on a machine without a CUDA GPU."""
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"{script}: no CUDA GPU is available (use --device cpu for a dry run)", file=sys.stderr)
        return True
    return False


def matmul_tflops(device, dtype: torch.dtype, n: int, repeats: int = 5) -> float:
    """Achieved TFLOP/s of an n x n x n matmul, best of `repeats` (the machine's practical peak
    for that dtype)."""
    device = torch.device(device)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    with torch.inference_mode():
        timing, _ = measure(lambda: a @ b, device, warmup=2 if device.type == "cuda" else 1, repeats=repeats)
    return 2 * n**3 / min(timing.times) / 1e12


def mfu(tokens_per_s: float, flops_per_token: float, peak_tflops: float | None) -> float | None:
    if not peak_tflops:
        return None
    return tokens_per_s * flops_per_token / (peak_tflops * 1e12)


# ----------------------------------------------------------------------------- engines
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def dtype_of(name: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


class Engine:
    """A loaded model with `encode(corpus) -> [N, H] fp32 embeddings` on the run's device."""

    label = "engine"

    def encode(self, corpus: Corpus) -> torch.Tensor:
        raise NotImplementedError

    def close(self) -> None:
        pass


class Ours(Engine):
    def __init__(self, folder, device, dtype: torch.dtype, backend: str = "auto", attention: str = "auto",
                 max_batch_tokens: int | None = None):
        from modernbert_embed import Checkpoint, Embedder
        from modernbert_embed.ops import select_ops

        # the experiment switches go through from_checkpoint's `ops` (auto: the library's own choice)
        ops = None if (backend, attention) == ("auto", "auto") else select_ops(device, backend, attention)
        self.model = Embedder.from_checkpoint(Checkpoint(folder), device=device, dtype=dtype, ops=ops)
        self.kwargs = {"max_batch_tokens": max_batch_tokens} if max_batch_tokens else {}
        self.label = f"ours ({self.model.ops.name if self.model.ops else backend})"

    def encode(self, corpus: Corpus) -> torch.Tensor:
        with torch.inference_mode():
            return self.model.encode_tokens(corpus.ids, convert_to_tensor=True, **self.kwargs)

    def close(self) -> None:
        del self.model


class OursText(Engine):
    """`Embedder.encode` on the id-tokenizer texts of the corpus: the text path, tokenisation
    included (on a GPU, chunks of `tokenize_chunk` texts are tokenised beside the model)."""

    def __init__(self, folder, device, dtype: torch.dtype, work_dir: Path | None = None,
                 tokenize_chunk: int | None = None):
        from modernbert_embed import Embedder

        st_dir = st_folder(Path(folder), Path(work_dir or Path(folder).parent / "st-model"))
        self.model = Embedder.from_pretrained(st_dir, device=device, dtype=dtype)
        if tokenize_chunk:
            self.model.tokenize_chunk = tokenize_chunk
        self.texts: dict[int, list[str]] = {}
        self.label = f"ours text ({self.model.ops.name}, tokenize_chunk {self.model.tokenize_chunk})"

    def encode(self, corpus: Corpus) -> torch.Tensor:
        key = id(corpus)
        if key not in self.texts:
            texts = id_texts(corpus.ids)
            got, _ = self.model.tokenize(texts[:8])
            if [list(g) for g in got] != [list(s) for s in corpus.ids[:8]]:
                raise RuntimeError("id tokenizer round trip failed in the text path")
            self.texts[key] = texts
        with torch.inference_mode():
            return self.model.encode(self.texts[key], convert_to_tensor=True)

    def close(self) -> None:
        del self.model


def load_transformers_model(folder, dtype: torch.dtype, attn_implementation: str = "sdpa"):
    """`ModernBertModel.from_pretrained` with `dtype=` (transformers >= 4.56) or `torch_dtype=`."""
    import transformers

    try:
        model = transformers.ModernBertModel.from_pretrained(
            folder, attn_implementation=attn_implementation, dtype=dtype)
    except TypeError:
        model = transformers.ModernBertModel.from_pretrained(
            folder, attn_implementation=attn_implementation, torch_dtype=dtype)
    if next(model.parameters()).dtype != dtype:  # an old version that ignored the keyword
        model = model.to(dtype)
    return model.eval()


class Transformers(Engine):
    """ModernBertModel on padded batches sorted by length, masked mean pooling, L2 normalise."""

    def __init__(self, folder, device, dtype: torch.dtype, batch_size: int = 32, attn_implementation: str = "sdpa"):
        self.device = torch.device(device)
        self.model = load_transformers_model(folder, dtype, attn_implementation).to(self.device)
        self.pad = self.model.config.pad_token_id
        self.batch_size = batch_size
        self.label = f"transformers ({self.model.config._attn_implementation}, batch {batch_size})"

    def encode(self, corpus: Corpus, batch_size: int | None = None) -> torch.Tensor:
        bs = batch_size or self.batch_size
        ids = corpus.ids
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        out = torch.empty(len(ids), self.model.config.hidden_size, dtype=torch.float32, device=self.device)
        with torch.inference_mode():
            for start in range(0, len(order), bs):
                chunk = order[start:start + bs]
                width = max(len(ids[i]) for i in chunk)
                batch = torch.full((len(chunk), width), self.pad, dtype=torch.int64)
                mask = torch.zeros(len(chunk), width, dtype=torch.int64)
                for row, i in enumerate(chunk):
                    batch[row, :len(ids[i])] = torch.tensor(ids[i])
                    mask[row, :len(ids[i])] = 1
                batch, mask = batch.to(self.device), mask.to(self.device)
                hidden = self.model(input_ids=batch, attention_mask=mask).last_hidden_state
                m = mask.unsqueeze(-1).float()
                pooled = (hidden.float() * m).sum(1) / mask.sum(1, keepdim=True).float()
                out[torch.tensor(chunk, device=self.device)] = torch.nn.functional.normalize(pooled, dim=-1)
        return out

    def padded_tokens(self, corpus: Corpus, batch_size: int | None = None) -> int:
        bs = batch_size or self.batch_size
        lengths = sorted(corpus.lengths, reverse=True)
        return sum(lengths[i] * len(lengths[i:i + bs]) for i in range(0, len(lengths), bs))

    def close(self) -> None:
        del self.model


class SentenceTransformers(Engine):
    """`SentenceTransformer.encode` on the id-tokenizer texts of the corpus."""

    def __init__(self, folder, device, dtype: torch.dtype, batch_size: int = 32, work_dir: Path | None = None):
        from sentence_transformers import SentenceTransformer

        self.device = torch.device(device)
        st_dir = st_folder(Path(folder), Path(work_dir or Path(folder).parent / "st-model"))
        self.model = SentenceTransformer(str(st_dir), device=str(self.device))
        if dtype != torch.float32:
            self.model = self.model.to(dtype)
        self.batch_size = batch_size
        self.texts: dict[int, list[str]] = {}
        attn = "?"
        try:
            attn = self.model[0].auto_model.config._attn_implementation
        except (AttributeError, IndexError, TypeError):
            pass
        self.label = f"sentence-transformers ({attn}, batch {batch_size})"

    def check_round_trip(self, corpus: Corpus) -> None:
        """The id tokenizer must give back exactly the corpus ids (raises otherwise)."""
        tok = self.model.tokenizer
        for seq, text in zip(corpus.ids[:8], id_texts(corpus.ids[:8])):
            got = tok(text, truncation=True, max_length=len(seq) + 8)["input_ids"]
            if list(got) != list(seq):
                raise RuntimeError(f"id tokenizer round trip failed: {list(got)[:8]}... vs {list(seq)[:8]}...")

    def encode(self, corpus: Corpus) -> torch.Tensor:
        key = id(corpus)
        if key not in self.texts:
            self.check_round_trip(corpus)
            self.texts[key] = id_texts(corpus.ids)
        out = self.model.encode(self.texts[key], batch_size=self.batch_size, convert_to_tensor=True,
                                show_progress_bar=False)
        return out.float()

    def close(self) -> None:
        del self.model


# ----------------------------------------------------------------------------- rows
@dataclass
class Row:
    engine: str
    dtype: str
    corpus: str
    variant: str = ""  # backend / attention / batching details
    docs: int = 0
    tokens: int = 0
    padded_tokens: int | None = None
    seconds: float | None = None
    p20: float | None = None
    p80: float | None = None
    repeats: int = 0
    tokens_per_s: float | None = None
    docs_per_s: float | None = None
    model_tflops: float | None = None  # achieved model FLOP/s, TFLOP/s
    mfu_nominal: float | None = None
    mfu_measured: float | None = None
    peak_mem_mb: float | None = None
    load_s: float | None = None
    ratio: float | None = None  # tokens/s over the baseline row of the same corpus
    baseline: str = ""
    min_cos: float | None = None  # min cosine of the embeddings to the baseline's
    goal: str = ""
    error: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.engine}/{self.dtype}/{self.variant}/{self.corpus}"


def run_row(row: Row, engine: Engine, corpus: Corpus, cfg: ModernBertConfig, device, warmup: int,
            repeats: int, peaks: dict[str, float | None], encode_kwargs=None,
            warmup_tokens: int | None = None) -> torch.Tensor | None:
    """Time `engine` on `corpus` into `row` (errors are recorded in the row, never raised).
    warmup_tokens: warm up on the corpus's first documents only (None: the whole corpus)."""
    kwargs = encode_kwargs or {}
    try:
        free_memory(device)
        reset_peak_memory(device)
        warm = corpus if warmup_tokens is None else corpus.head(warmup_tokens)
        timing, emb = measure(lambda: engine.encode(corpus, **kwargs), device, warmup, repeats,
                              warmup_fn=lambda: engine.encode(warm, **kwargs))
        row.peak_mem_mb, mem_kind = peak_memory_mb(device)
        row.extra["peak_mem"] = mem_kind
        row.seconds, row.p20, row.p80, row.repeats = timing.median, timing.p20, timing.p80, len(timing.times)
        row.extra["times"] = [round(t, 6) for t in timing.times]
        row.tokens_per_s = row.tokens / timing.median
        row.docs_per_s = row.docs / timing.median
        flops = corpus.flops(cfg)
        row.model_tflops = flops / timing.median / 1e12
        fpt = flops / row.tokens
        row.mfu_nominal = mfu(row.tokens_per_s, fpt, peaks.get("nominal"))
        row.mfu_measured = mfu(row.tokens_per_s, fpt, peaks.get(row.dtype))
        emb = emb.float().cpu()
        if emb.shape[0] != corpus.num_docs:
            row.error = f"{emb.shape[0]} embeddings for {corpus.num_docs} documents"
        elif not torch.isfinite(emb).all():
            row.error = "non-finite embeddings"
        return emb
    except Exception as e:  # one failed row never ends the run
        row.error = f"{type(e).__name__}: {e}".strip()[:400]
        row.extra["traceback"] = traceback.format_exc()[-3000:]
        return None
    finally:
        free_memory(device)


def compare(row: Row, emb: torch.Tensor | None, base_row: Row | None, base_emb: torch.Tensor | None) -> None:
    """Fill ratio and min cosine against the baseline row of the same corpus."""
    if base_row is None or base_row is row:
        return
    row.baseline = f"{base_row.engine} {base_row.dtype}"
    if row.tokens_per_s and base_row.tokens_per_s:
        row.ratio = row.tokens_per_s / base_row.tokens_per_s
    if emb is not None and base_emb is not None and emb.shape == base_emb.shape:
        cos = torch.nn.functional.cosine_similarity(emb.float(), base_emb.float(), dim=-1)
        row.min_cos = float(cos.min())


@dataclass
class Spec:
    """One engine to load once and time on several corpora."""

    engine: str  # ours | transformers | sentence-transformers
    dtype: str  # fp32 | bf16 | fp16
    variant: str
    factory: Callable[[], Engine]
    corpora: list[str]
    encode_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)  # per corpus
    corpus_variant: dict[str, str] = field(default_factory=dict)  # per corpus, overrides variant
    baseline: bool = False  # the row every other row of its corpus is compared with


@dataclass
class Goal:
    """A target on one row: kind "ratio" (tokens/s over the baseline), "rate" (tokens/s), or
    "vs_corpus" (tokens/s over the same engine's tokens/s on `other_corpus`)."""

    engine: str
    dtype: str
    variant: str
    corpus: str
    kind: str
    threshold: float
    other_corpus: str = ""

    def matches(self, row: Row) -> bool:
        return (row.engine, row.dtype, row.variant, row.corpus) == (self.engine, self.dtype, self.variant, self.corpus)

    def apply(self, rows: Sequence[Row]) -> None:
        for row in rows:
            if not self.matches(row):
                continue
            if self.kind == "ratio":
                target, value = f"{self.threshold:g}x", row.ratio
                shown = "-" if value is None else f"{value:.2f}x"
            elif self.kind == "rate":
                target, value = f"{fmt_num(self.threshold)} tok/s", row.tokens_per_s
                shown = fmt_num(value)
            else:
                other = next((r for r in rows if (r.engine, r.dtype, r.variant, r.corpus)
                              == (self.engine, self.dtype, self.variant, self.other_corpus)), None)
                value = (row.tokens_per_s / other.tokens_per_s
                         if other is not None and row.tokens_per_s and other.tokens_per_s else None)
                target = f"{self.threshold:g} x {self.other_corpus} rate"
                shown = "-" if value is None else f"{value:.2f}"
            verdict = "n/a" if value is None else ("PASS" if value >= self.threshold else "FAIL")
            row.goal = f"{shown} (>= {target}): {verdict}"


def run_plan(results: "Results", specs: Sequence[Spec], corpora: dict[str, Corpus], cfg: ModernBertConfig,
             device, warmup: int, repeats: dict[str, int], goals: Sequence[Goal] = (),
             warmup_tokens: dict[str, int | None] | None = None, time_budget: float | None = None,
             log: Callable[[str], None] = print) -> None:
    """Load each spec once, time it on its corpora, compare with the baseline of each corpus,
    save after every row. Past `time_budget` seconds, the remaining rows are recorded as skipped."""
    device = torch.device(device)
    baselines: dict[str, tuple[Row, torch.Tensor | None]] = {}
    others: list[tuple[Row, torch.Tensor | None]] = []
    ordered = sorted(specs, key=lambda s: not s.baseline)  # baselines first
    for spec in ordered:
        rows = []
        for name in spec.corpora:
            row = Row(spec.engine, spec.dtype, name, spec.corpus_variant.get(name, spec.variant))
            row.docs, row.tokens = corpora[name].num_docs, corpora[name].num_tokens
            rows.append(row)
            results.rows.append(row)
        if time_budget is not None and time.perf_counter() - results.started > time_budget:
            for row in rows:
                row.error = f"skipped: past the time budget of {time_budget:g} s"
            results.save()
            continue
        t0 = time.perf_counter()
        engine = None
        try:
            engine = spec.factory()
        except Exception as e:
            for row in rows:
                row.error = f"load: {type(e).__name__}: {e}".strip()[:400]
                row.extra["traceback"] = traceback.format_exc()[-3000:]
        load_s = time.perf_counter() - t0
        if engine is not None:
            for row in rows:
                row.load_s = load_s
                row.extra["label"] = engine.label
                corpus = corpora[row.corpus]
                kwargs = spec.encode_kwargs.get(row.corpus) or {}
                emb = run_row(row, engine, corpus, cfg, device, warmup, repeats.get(row.corpus, 1),
                              results.peaks, kwargs, (warmup_tokens or {}).get(row.corpus))
                if isinstance(engine, Transformers):  # what padding costs the padded peer
                    row.padded_tokens = engine.padded_tokens(corpus, kwargs.get("batch_size"))
                if spec.baseline:
                    baselines[row.corpus] = (row, emb)
                else:
                    base = baselines.get(row.corpus, (None, None))
                    compare(row, emb, base[0], base[1])
                    others.append((row, emb))
                for goal in goals:
                    goal.apply(results.rows)
                results.save()
                log(f"  {row.corpus:>9} {row.engine} {row.dtype} {row.variant}: "
                    + (f"{fmt_num(row.tokens_per_s)} tok/s" if row.tokens_per_s else "")
                    + (f" {row.ratio:.2f}x" if row.ratio else "") + (f" ERROR {row.error}" if row.error else ""))
            try:
                engine.close()
            except Exception:
                pass
            del engine
            free_memory(device)
        else:
            log(f"  {spec.engine} {spec.dtype} {spec.variant}: {rows[0].error}")
    for goal in goals:
        goal.apply(results.rows)
    results.save()


# ----------------------------------------------------------------------------- output
def fmt_num(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.{digits}g}{unit}"
    return f"{x:.{digits}g}"


def fmt_pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def markdown_table(rows: Sequence[Row], nominal: bool) -> str:
    head = ["corpus", "engine", "dtype", "variant", "tokens", "tokens/s", "docs/s", "time s (p20-p80)",
            "vs baseline", "min cos", "model TFLOP/s"]
    head += (["MFU (card)"] if nominal else []) + ["MFU (matmul)", "peak MiB", "goal", "error"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        time_s = "-" if r.seconds is None else f"{r.seconds:.3g} ({r.p20:.3g}-{r.p80:.3g})"
        cells = [r.corpus, r.engine, r.dtype, r.variant, fmt_num(r.tokens), fmt_num(r.tokens_per_s),
                 fmt_num(r.docs_per_s), time_s, "-" if r.ratio is None else f"{r.ratio:.2f}x",
                 "-" if r.min_cos is None else f"{r.min_cos:.5f}", "-" if r.model_tflops is None else f"{r.model_tflops:.3g}"]
        cells += ([fmt_pct(r.mfu_nominal)] if nominal else []) + [
            fmt_pct(r.mfu_measured), "-" if r.peak_mem_mb is None else f"{r.peak_mem_mb:.0f}", r.goal,
            r.error.replace("|", "/").replace("\n", " ")[:120]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(path: Path, record: dict[str, Any]) -> None:
    """Write `record` to `path` whole or not at all (a run cut short leaves the last complete one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str))
    tmp.replace(path)


def append_markdown(path: Path, title: str, text: str) -> None:
    """Append `text` under a `### title` heading (the device check gathers every script's tables)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(f"\n### {title}\n\n{text}\n")


class Results:
    """One run: machine, settings, corpora, peaks and rows; rewritten after every row so that a run
    cut short still leaves what it measured."""

    def __init__(self, script: str, device, settings: dict[str, Any], out: Path | None,
                 append: Path | None = None, markdown: Path | None = None):
        self.script = script
        self.device = torch.device(device)
        self.info = machine_info(self.device)
        self.settings = settings
        self.corpora: list[dict[str, Any]] = []
        self.peaks: dict[str, float | None] = {}
        self.rows: list[Row] = []
        self.out, self.append, self.markdown = out, append, markdown
        self.started = time.perf_counter()

    def record(self) -> dict[str, Any]:
        return {
            "script": self.script, "machine": self.info, "settings": self.settings, "corpora": self.corpora,
            "peaks_tflops": self.peaks, "elapsed_s": round(time.perf_counter() - self.started, 1),
            "rows": [asdict(r) for r in self.rows],
        }

    def save(self) -> None:
        if self.out:
            write_json(self.out, self.record())

    def table(self) -> str:
        peaks = ", ".join(f"{k} {v:.3g}" for k, v in self.peaks.items() if v)
        return (f"{self.script} on {machine_line(self.info)}\n"
                f"peaks (TFLOP/s): {peaks or '-'}\n\n"
                + markdown_table(self.rows, nominal=bool(self.peaks.get("nominal"))))

    def finish(self) -> str:
        self.save()
        text = self.table()
        if self.append:
            self.append.parent.mkdir(parents=True, exist_ok=True)
            with self.append.open("a") as f:
                f.write(json.dumps(self.record(), default=str) + "\n")
        if self.markdown:
            append_markdown(self.markdown, self.script, text)
        return text
