"""Rows, specs and goals, the plan that fills them, and the results files: a markdown table and
JSON, rewritten after every row so that a run cut short still leaves what it measured.
"""

from __future__ import annotations

import json
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from modernbert_embed.config import ModernBertConfig

from .corpora import Corpus
from .engines import Engine, Transformers
from .measure import free_memory, machine_info, machine_line, measure, mfu, peak_memory_mb, reset_peak_memory


def add_output_args(p, append: bool = True) -> None:
    """The results-file options every benchmark script takes."""
    p.add_argument("--out", type=Path, default=None, help="write this run's results as JSON")
    if append:
        p.add_argument("--append", type=Path, default=None, help="append this run's results as one JSON line")
    p.add_argument("--markdown", type=Path, default=None, help="append the table to this markdown file")


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
    min_cos: float | None = None  # min cosine of the embeddings to the baseline's (scores: centred, as one vector)
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
        if emb.ndim == 2 and emb.shape[1] == 1:  # one score per input: the scores as one vector, centred
            a, b = emb.double().flatten(), base_emb.double().flatten()
            a, b = a - a.mean(), b - b.mean()
            denom = float(a.norm() * b.norm())
            row.min_cos = float(a @ b) / denom if denom > 0 else None
            return
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


class MarkdownSection:
    """This run's `### title` section of a markdown file, rewritten whole each time (what the file
    held before the run, then the section), so that a run cut short leaves its latest table and
    nothing twice. `path` None: writes nothing."""

    def __init__(self, path: Path | None, title: str):
        self.path, self.title = path, title
        self.before = path.read_text() if path is not None and path.is_file() else ""

    def write(self, text: str, partial: bool = False) -> None:
        if self.path is None:
            return
        if partial:
            text += "\n\n(partial: the run had not finished when this was written)"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(f"{self.before}\n### {self.title}\n\n{text}\n")
        tmp.replace(self.path)


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
        self.section = MarkdownSection(markdown, script)
        self.started = time.perf_counter()

    def record(self) -> dict[str, Any]:
        return {
            "script": self.script, "machine": self.info, "settings": self.settings, "corpora": self.corpora,
            "peaks_tflops": self.peaks, "elapsed_s": round(time.perf_counter() - self.started, 1),
            "rows": [asdict(r) for r in self.rows],
        }

    def save(self, partial: bool = True) -> None:
        """The JSON and the markdown table as they stand (after every row)."""
        if self.out:
            write_json(self.out, self.record())
        self.section.write(self.table(), partial=partial)

    def table(self) -> str:
        peaks = ", ".join(f"{k} {v:.3g}" for k, v in self.peaks.items() if v)
        return (f"{self.script} on {machine_line(self.info)}\n"
                f"peaks (TFLOP/s): {peaks or '-'}\n\n"
                + markdown_table(self.rows, nominal=bool(self.peaks.get("nominal"))))

    def finish(self) -> str:
        self.save(partial=False)
        if self.append:
            self.append.parent.mkdir(parents=True, exist_ok=True)
            with self.append.open("a") as f:
                f.write(json.dumps(self.record(), default=str) + "\n")
        return self.table()
