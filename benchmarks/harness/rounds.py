"""Alternating rounds: corpus by corpus, the contenders that run on it are loaded (and closed after
it, so that one corpus's buffers do not weigh on the next), warmed up, then run for at least
five rounds in which each contender encodes the whole corpus once, in an order shuffled per round
(fixed seed), with a large matmul timed before each round in each dtype.

A shared host's speed drifts by 2x within minutes, so a ratio of two medians taken minutes apart
says little. Here every ratio is taken inside one round (the two runs seconds apart) and the
median of the per-round ratios is reported with its spread; the same holds for MFU, whose peak is
the median of the matmuls measured between the rounds of the same corpus.

Ratios: to the reference contender (transformers fp32), and to the best CPU runtime (ONNX Runtime,
OpenVINO: kind "runtime") of the same dtype *in that round*, i.e. the faster of the two each time,
which can only make our ratio smaller.
"""

from __future__ import annotations

import os
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from modernbert_embed.config import ModernBertConfig

from .corpora import Corpus
from .engines import Engine, dtype_of
from .measure import free_memory, matmul_tflops


class CannotRun(RuntimeError):
    """Raised by a contender's factory that cannot run here; its message is the reason shown."""


@dataclass
class Contender:
    """One engine in one dtype. kind: "ours", "reference" (what every ratio (a) is against),
    "runtime" (a CPU runtime: the pool of ratio (b)) or "other". `factory(corpus_role)` loads it
    for one corpus (a peer's batch size may depend on the corpus)."""

    key: str
    name: str
    dtype: str
    kind: str
    factory: Callable[[str], Engine]
    corpora: tuple[str, ...] | None = None  # the corpora it runs on (None: all)
    why_not: str = ""  # why it does not run on the others
    labels: dict[str, str] = field(default_factory=dict)  # per corpus: what was loaded
    load_s: dict[str, float] = field(default_factory=dict)
    error: str = ""  # it cannot load: it runs nowhere
    engine: Engine | None = None

    def runs_on(self, corpus: str) -> bool:
        return self.corpora is None or corpus in self.corpora


@dataclass
class Cell:
    """One contender on one corpus: a time per round, what was compared, what went wrong."""

    times: list[float] = field(default_factory=list)
    vs_reference: list[float] = field(default_factory=list)
    vs_runtime: list[float] = field(default_factory=list)
    best_runtime: list[str] = field(default_factory=list)  # which runtime was (b) in each round
    min_cos: float | None = None
    max_abs: float | None = None
    error: str = ""
    embeddings: torch.Tensor | None = None  # round 1's, until compared


def spread(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    v = np.asarray(values, dtype=np.float64)
    return {"median": float(np.median(v)), "min": float(v.min()), "max": float(v.max()), "n": int(v.size)}


def load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


class RoundsRun:
    """Loads the contenders, runs the rounds corpus by corpus, keeps every measurement."""

    def __init__(self, contenders: Sequence[Contender], corpora: dict[str, Corpus], cfg: ModernBertConfig,
                 rounds: int, seed: int = 0, warmup_tokens: int = 512, matmul_n: int = 2048,
                 reference: str = "transformers-fp32", log: Callable[[str], None] = print,
                 clock: Callable[[], float] = time.perf_counter):
        if rounds < 1:
            raise ValueError(f"rounds must be at least 1, got {rounds}")
        self.contenders = list(contenders)
        self.corpora = corpora
        self.cfg = cfg
        self.rounds, self.seed, self.warmup_tokens, self.matmul_n = rounds, seed, warmup_tokens, matmul_n
        self.reference = reference
        self.log, self.clock = log, clock  # the clock times the contenders (a test's fake one: exact ratios)
        self.after_round: Callable[[str, int], None] | None = None
        self.cells: dict[str, dict[str, Cell]] = {role: {} for role in corpora}
        self.peaks: dict[str, dict[str, list[float]]] = {role: {"fp32": [], "bf16": []} for role in corpora}
        self.loads: dict[str, list[float | None]] = {role: [] for role in corpora}
        self.seconds: dict[str, float] = {}

    # ------------------------------------------------------------------------- loading
    def load(self, role: str) -> None:
        """Load the contenders of one corpus; one that cannot load keeps its error and runs nowhere."""
        for c in self.contenders:
            if c.error or not c.runs_on(role):
                continue
            t0 = time.perf_counter()
            try:
                c.engine = c.factory(role)
                c.labels[role] = c.engine.label
            except CannotRun as e:
                c.error = str(e)[:500]
                self.log(f"  {c.key}: cannot run: {c.error}")
            except Exception as e:
                c.error = f"{type(e).__name__}: {e}".strip()[:500]
                self.log(f"  {c.key}: cannot run: {c.error}")
                self.log(traceback.format_exc(limit=-3))
            c.load_s[role] = round(time.perf_counter() - t0, 2)
            if not c.error:
                self.log(f"  loaded {c.key} in {c.load_s[role]:.1f} s: {c.labels[role]}")

    def close(self) -> None:
        for c in self.contenders:
            if c.engine is not None:
                try:
                    c.engine.close()
                except Exception:
                    pass
                c.engine = None
        free_memory("cpu")

    # ------------------------------------------------------------------------- rounds
    def _encode(self, c: Contender, corpus: Corpus) -> tuple[float, torch.Tensor]:
        t0 = self.clock()
        emb = c.engine.encode(corpus)
        seconds = self.clock() - t0
        emb = emb.detach().float().cpu()
        if emb.shape[0] != corpus.num_docs:
            raise RuntimeError(f"{emb.shape[0]} embeddings for {corpus.num_docs} documents")
        if not torch.isfinite(emb).all():
            raise RuntimeError("non-finite embeddings")
        return seconds, emb

    def run_corpus(self, role: str) -> None:
        corpus = self.corpora[role]
        started = time.perf_counter()
        self.load(role)
        try:
            self._run_rounds(role, corpus)
        finally:
            self.close()
        self.seconds[role] = time.perf_counter() - started

    def _run_rounds(self, role: str, corpus: Corpus) -> None:
        cells = self.cells[role]
        active = []
        for c in self.contenders:
            cells[c.key] = Cell(error=c.error)
            if not c.error and c.runs_on(role):
                active.append(c)
        warm = corpus.head(self.warmup_tokens)
        warm_out = {}
        for c in active:  # warm-up: first-call set-up, the corpus's kind of shapes
            try:
                warm_out[c.key] = self._encode(c, warm)[1]
            except Exception as e:
                cells[c.key].error = f"warm-up: {type(e).__name__}: {e}".strip()[:500]
        self.check_warmup(role, warm_out)
        rng = np.random.default_rng(self.seed + 7919 * list(self.corpora).index(role))
        for r in range(self.rounds):
            self.loads[role].append(load_average())
            for name in ("fp32", "bf16"):
                self.peaks[role][name].append(matmul_tflops("cpu", dtype_of(name), self.matmul_n, repeats=3))
            order = [c for c in active if not cells[c.key].error]
            rng.shuffle(order)
            for c in order:
                try:
                    seconds, emb = self._encode(c, corpus)
                except Exception as e:
                    cells[c.key].error = f"round {r + 1}: {type(e).__name__}: {e}".strip()[:500]
                    continue
                cells[c.key].times.append(seconds)
                if cells[c.key].embeddings is None:
                    cells[c.key].embeddings = emb
            self._round_ratios(role, r)
            line = ", ".join(f"{c.key} {corpus.num_tokens / cells[c.key].times[-1]:.0f}" for c in order
                             if len(cells[c.key].times) == r + 1)
            self.log(f"  {role} round {r + 1}/{self.rounds} (load {self.loads[role][-1]}): tokens/s {line}")
            if self.after_round is not None:  # e.g. save the record: a run cut short keeps its rounds
                self.after_round(role, r)
        self._compare(role)

    def check_warmup(self, role: str, outputs: dict[str, torch.Tensor]) -> None:
        """Before the rounds: the contenders' warm-up outputs (a subclass may refuse to time one
        that disagrees, by setting its cell's error)."""

    def _round_ratios(self, role: str, r: int) -> None:
        """Ratios of round r, from the times of that round only."""
        cells = self.cells[role]
        now = {key: cell.times[r] for key, cell in cells.items() if len(cell.times) == r + 1}
        ref = now.get(self.reference)
        by_key = {c.key: c for c in self.contenders}
        for key, t in now.items():
            c = by_key[key]
            if ref is not None:
                cells[key].vs_reference.append(ref / t)
            runtimes = {k: v for k, v in now.items() if by_key[k].kind == "runtime" and by_key[k].dtype == c.dtype}
            if runtimes:
                best = min(runtimes, key=runtimes.get)
                cells[key].vs_runtime.append(runtimes[best] / t)
                cells[key].best_runtime.append(best)

    def _compare(self, role: str) -> None:
        """Each contender's embeddings (round 1) against the reference's: min cosine, max abs diff."""
        cells = self.cells[role]
        ref = cells.get(self.reference)
        base = ref.embeddings if ref is not None else None
        for key, cell in cells.items():
            if cell.embeddings is not None and base is not None and key != self.reference:
                cos = torch.nn.functional.cosine_similarity(cell.embeddings, base, dim=-1)
                cell.min_cos = float(cos.min())
                cell.max_abs = float((cell.embeddings - base).abs().max())
        for cell in cells.values():
            cell.embeddings = None

    # ------------------------------------------------------------------------- summary
    def peak(self, role: str, dtype: str) -> float | None:
        s = spread(self.peaks[role].get(dtype, []))
        return s["median"] if s else None

    def summary(self, role: str, key: str) -> dict[str, Any]:
        """What the tables and goals read: medians and spreads of one contender on one corpus."""
        corpus = self.corpora[role]
        c = next(c for c in self.contenders if c.key == key)
        cell = self.cells[role].get(key) or Cell(error=c.error)
        out: dict[str, Any] = {
            "corpus": role, "corpus_name": corpus.name, "contender": key, "name": c.name, "dtype": c.dtype,
            "kind": c.kind, "label": c.labels.get(role, ""), "error": cell.error,
            "not_run": not cell.error and not c.runs_on(role), "why_not": c.why_not,
            "times_s": [round(t, 6) for t in cell.times],
            "tokens_per_s": spread([corpus.num_tokens / t for t in cell.times]),
            "docs_per_s": spread([corpus.num_docs / t for t in cell.times]),
            "vs_reference": spread(cell.vs_reference), "vs_runtime": spread(cell.vs_runtime),
            "vs_reference_rounds": [round(x, 4) for x in cell.vs_reference],
            "vs_runtime_rounds": [round(x, 4) for x in cell.vs_runtime],
            "best_runtime": max(set(cell.best_runtime), key=cell.best_runtime.count) if cell.best_runtime else None,
            "min_cos": cell.min_cos, "max_abs": cell.max_abs, "model_tflops": None, "mfu": None,
        }
        if cell.times:
            seconds = float(np.median(cell.times))
            out["model_tflops"] = corpus.flops(self.cfg) / seconds / 1e12
            peak = self.peak(role, c.dtype)
            out["mfu"] = out["model_tflops"] / peak if peak else None
        return out

    def summaries(self) -> list[dict[str, Any]]:
        return [self.summary(role, c.key) for role in self.corpora if self.cells[role] for c in self.contenders]


# ----------------------------------------------------------------------------- goals
@dataclass
class RoundGoal:
    """A target on the summaries. metric: "vs_runtime" / "vs_reference" (median of per-round
    ratios), "mfu", or "max_abs" / "min_cos" (the worst over `corpora`, every corpus if empty)."""

    text: str
    contender: str
    metric: str
    threshold: float
    corpora: tuple[str, ...] = ()

    def evaluate(self, summaries: Sequence[dict[str, Any]]) -> dict[str, Any]:
        mine = [s for s in summaries if s["contender"] == self.contender
                and (not self.corpora or s["corpus"] in self.corpora)]
        out = {"goal": self.text, "contender": self.contender, "metric": self.metric, "threshold": self.threshold,
               "value": None, "spread": None, "rounds_passing": None, "verdict": "n/a", "why": ""}
        if not mine:
            out["why"] = "no such contender or corpus in this run"
            return out
        if self.metric in ("vs_runtime", "vs_reference"):
            s = mine[0]
            per_round = s[self.metric]
            if per_round is None:
                out["why"] = s["error"] or ("not run on this corpus" if s["not_run"] else "no ratio measured")
                return out
            out["value"], out["spread"] = per_round["median"], [per_round["min"], per_round["max"]]
            rounds = s[self.metric + "_rounds"]
            out["rounds_passing"] = f"{sum(x >= self.threshold for x in rounds)}/{len(rounds)}"
            out["verdict"] = "PASS" if per_round["median"] >= self.threshold else "FAIL"
            return out
        if self.metric == "mfu":
            s = mine[0]
            if s["mfu"] is None:
                out["why"] = s["error"] or ("not run on this corpus" if s["not_run"] else "no matmul peak")
                return out
            out["value"] = s["mfu"]
            out["verdict"] = "PASS" if s["mfu"] >= self.threshold else "FAIL"
            return out
        values = [(s[self.metric], s["corpus_name"]) for s in mine if s[self.metric] is not None]
        if not values:
            out["why"] = "; ".join(sorted({s["error"] for s in mine if s["error"]})) or "nothing compared"
            return out
        worst = max(values) if self.metric == "max_abs" else min(values)
        out["value"], out["why"] = worst[0], f"worst on {worst[1]} of {len(values)} corpora"
        ok = worst[0] <= self.threshold if self.metric == "max_abs" else worst[0] >= self.threshold
        out["verdict"] = "PASS" if ok else "FAIL"
        return out
