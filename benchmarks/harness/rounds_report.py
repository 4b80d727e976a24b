"""The report of an alternating-rounds run (`rounds.RoundsRun`): a markdown text (settings, matmul
peaks, load averages, one table of contenders x corpora, the goals, what each contender is) and a
JSON record with every round's times and ratios.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Sequence

from .measure import machine_info, peak_memory_mb
from .report import append_markdown, fmt_num, fmt_pct, write_json
from .rounds import RoundGoal, RoundsRun, spread


def _spread_text(s: dict[str, float] | None, fmt=lambda x: fmt_num(x), suffix: str = "") -> str:
    if s is None:
        return "-"
    return f"{fmt(s['median'])}{suffix} ({fmt(s['min'])}-{fmt(s['max'])})"


def _ratio(s: dict[str, float] | None) -> str:
    return _spread_text(s, lambda x: f"{x:.2f}", "x")


def versions_line(info: dict[str, Any]) -> str:
    names = ("python", "torch", "transformers", "sentence_transformers", "onnxruntime", "openvino", "nncf", "onnx")
    return ", ".join(f"{k.replace('_', '-')} {info[k]}" for k in names if info.get(k))


class RoundsResults:
    """One run's record, rewritten after each corpus so that a run cut short keeps what it measured."""

    def __init__(self, script: str, run: RoundsRun, goals: Sequence[RoundGoal], settings: dict[str, Any],
                 out: Path | None = None, markdown: Path | None = None):
        self.script, self.run, self.goals, self.settings = script, run, list(goals), settings
        self.out, self.markdown = out, markdown
        self.info = machine_info("cpu")
        self.info["load_average_start"] = [round(x, 2) for x in _loadavg()]
        self.started = time.perf_counter()

    def record(self) -> dict[str, Any]:
        run = self.run
        summaries = run.summaries()
        return {
            "script": self.script, "machine": self.info, "settings": self.settings,
            "elapsed_s": round(time.perf_counter() - self.started, 1),
            "corpora": {role: dict(c.summary(), seconds=round(run.seconds.get(role, 0.0), 1))
                        for role, c in run.corpora.items()},
            "matmul_tflops": {role: {d: [round(x, 4) for x in v] for d, v in p.items()}
                              for role, p in run.peaks.items()},
            "load_average": run.loads,
            "contenders": [{"key": c.key, "name": c.name, "dtype": c.dtype, "kind": c.kind, "labels": c.labels,
                            "load_s": c.load_s, "error": c.error, "why_not": c.why_not,
                            "corpora": list(c.corpora) if c.corpora is not None else "all"} for c in run.contenders],
            "results": summaries,
            "goals": [g.evaluate(summaries) for g in self.goals],
        }

    def save(self) -> None:
        if self.out:
            write_json(self.out, self.record())

    # ------------------------------------------------------------------------- text
    def text(self) -> str:
        run, rec = self.run, self.record()
        info = self.info
        lines = [
            f"{self.script} on {info['cpu']} ({info['torch_threads']} torch threads, {info['cpu_count']} CPUs); "
            f"{versions_line(info)}; commit {info['commit']}; {info['date']}",
            "",
            f"- rounds: {run.rounds} per corpus, contenders in an order shuffled per round (seed {run.seed}), "
            f"each warmed up on the corpus's first {run.warmup_tokens} tokens before round 1; ratios are medians "
            "of per-round ratios (min-max over rounds); peers get length-sorted padded batches"
            + (" of " + ", ".join(f"{b} on {run.corpora[r].name}" for r, b in self.settings["peer_batch"].items()
                                  if r in run.corpora) if self.settings.get("peer_batch") else ""),
            "- corpora: " + "; ".join(f"{c.name} ({c.num_docs} docs, {c.num_tokens:,} tokens: {c.description})"
                                      for c in run.corpora.values()),
            f"- matmul {run.matmul_n}^3, TFLOP/s, median (min-max) of the measurements before each round: "
            + "; ".join(f"{run.corpora[role].name} fp32 {_spread_text(spread(p['fp32']), lambda x: f'{x:.3g}')}, "
                        f"bf16 {_spread_text(spread(p['bf16']), lambda x: f'{x:.3g}')}"
                        for role, p in run.peaks.items() if p["fp32"]),
            "- load average (1 min) at the start of each round: "
            + "; ".join(f"{run.corpora[role].name} {min(v)}-{max(v)}" for role, v in run.loads.items()
                        if v and None not in v)
            + f"; run took {rec['elapsed_s']:,.0f} s ("
            + ", ".join(f"{run.corpora[r].name} {s:.0f} s" for r, s in run.seconds.items()) + ")",
            "",
            "Contenders (as loaded, per corpus):",
        ]
        for c in rec["contenders"]:
            by_label: dict[str, list[str]] = {}
            for role, label in c["labels"].items():
                by_label.setdefault(label, []).append(run.corpora[role].name)
            what = "; ".join(f"{label} ({', '.join(names)})" for label, names in by_label.items())
            lines.append(f"- {c['key']}: " + (f"cannot run: {c['error']}" if c["error"] else what or "not run"))
        lines += ["", self.contender_table(rec["results"]), "", self.goal_table(rec["goals"])]
        return "\n".join(lines)

    def contender_table(self, summaries: Sequence[dict[str, Any]]) -> str:
        ref = self.run.reference.rsplit("-", 1)
        parity = getattr(self.run, "parity", None)  # scores are compared with another contender than ratios are
        head = ["corpus", "contender", "dtype", "tokens/s", "pairs/s" if parity else "docs/s", "x " + " ".join(ref),
                "x best runtime, same dtype", "model TFLOP/s", "MFU (matmul)",
                f"cos (centred) vs {parity}" if parity else "min cos",
                f"max abs vs {parity}" if parity else "max abs (fp32)", "note"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for s in summaries:
            if s["error"]:
                note = ("cannot run: " if not s["times_s"] else "") + s["error"]
            elif s["not_run"]:
                note = "not run on this corpus: " + (s["why_not"] or "left out by the plan")
            else:
                note = ""
            vs_runtime = _ratio(s["vs_runtime"])
            if s["vs_runtime"] and s["kind"] != "runtime":
                vs_runtime += f" vs {s['best_runtime']}"
            cells = [
                self.run.corpora[s["corpus"]].name, s["name"], s["dtype"], _spread_text(s["tokens_per_s"]),
                fmt_num(s["docs_per_s"]["median"]) if s["docs_per_s"] else "-",
                "-" if s["contender"] == self.run.reference else _ratio(s["vs_reference"]), vs_runtime,
                "-" if s["model_tflops"] is None else f"{s['model_tflops']:.3g}", fmt_pct(s["mfu"]),
                "-" if s["min_cos"] is None else f"{s['min_cos']:.6f}",
                "-" if s["max_abs"] is None or (s["dtype"] != "fp32" and not parity) else f"{s['max_abs']:.2e}",
                note.replace("|", "/").replace("\n", " "),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    @staticmethod
    def goal_table(goals: Sequence[dict[str, Any]]) -> str:
        lines = ["| goal | measured | rounds passing | verdict |", "|---|---|---|---|"]
        for g in goals:
            if g["value"] is None:
                shown = "-"
            elif g["metric"] in ("vs_runtime", "vs_reference"):
                shown = f"{g['value']:.2f}x ({g['spread'][0]:.2f}-{g['spread'][1]:.2f})"
            elif g["metric"] == "mfu":
                shown = fmt_pct(g["value"])
            elif g["metric"] == "max_abs":
                shown = f"{g['value']:.2e}"
            else:
                shown = f"{g['value']:.6f}"
            if g["why"]:
                shown += f" ({g['why']})" if g["value"] is not None else f" {g['why']}"
            lines.append(f"| {g['goal']} | {shown} | {g['rounds_passing'] or '-'} | **{g['verdict']}** |")
        return "\n".join(lines)

    def finish(self) -> str:
        self.info["load_average_end"] = [round(x, 2) for x in _loadavg()]
        self.info["peak_rss_mb"] = round(peak_memory_mb("cpu")[0])
        self.save()
        text = self.text()
        if self.markdown:
            append_markdown(self.markdown, f"{self.script}, commit {self.info['commit']}, {self.info['date']}", text)
        return text


def _loadavg() -> tuple[float, float, float]:
    try:
        return os.getloadavg()
    except OSError:
        return (float("nan"),) * 3
