"""One harness for every benchmark, in these parts:

- `corpora`: the random checkpoint, the token-id corpora and the id tokenizer for text engines;
- `engines`: the engines compared (ours, transformers, sentence-transformers), one interface;
- `measure`: timing, memory, the machine, the GPU tables and MFU;
- `report`: rows, specs and goals, the plan that fills them, markdown and JSON results;
- `onnx_peers`: the ONNX export of the checkpoint and the CPU runtimes on it (ONNX Runtime, OpenVINO);
- `rounds`, `rounds_report`: contenders alternated round by round, per-round ratios, their report;
- `rerank`: the cross-encoder checkpoint, the rerank workloads (query, document pairs), the engines
  that score them and the rounds on scores, checked against ours fp32 before timing.

The scripts beside this package put its folder on `sys.path` and `import harness as h`; every name
they use is re-exported here. The timing function stays `harness.measure.measure`, so that
`harness.measure` is always the module.
"""

from __future__ import annotations

from .corpora import (
    SMALL_CONFIG, Corpus, Vocab, config_dict, fixed_corpus, id_texts, long_corpus, mixed_corpus, st_folder,
    write_checkpoint, write_id_tokenizer,
)
from .engines import (
    DTYPE_NAMES, Engine, Ours, OursText, SentenceTransformers, Transformers, dtype_of, load_transformers_model,
    padded_batches,
)
from .measure import (
    FIXTURES, GPU_BANDWIDTH_GBS, GPU_BF16_PEAK_TFLOPS, ROOT, Timing, cpu_model, cuda_missing, free_memory, git_commit,
    machine_info, machine_line, matmul_tflops, mfu, nominal_bandwidth_gbs, nominal_peak_tflops,
    peak_memory_mb, reset_peak_memory, synchronize, visible_pairs,
)
from .report import (
    Goal, MarkdownSection, Results, Row, Spec, add_output_args, append_markdown, compare, fmt_num, fmt_pct, markdown_table,
    run_plan, run_row, write_json,
)

__all__ = [
    "SMALL_CONFIG", "Corpus", "Vocab", "config_dict", "fixed_corpus", "id_texts", "long_corpus", "mixed_corpus",
    "st_folder", "write_checkpoint", "write_id_tokenizer",
    "DTYPE_NAMES", "Engine", "Ours", "OursText", "SentenceTransformers", "Transformers", "dtype_of",
    "load_transformers_model", "padded_batches",
    "FIXTURES", "GPU_BANDWIDTH_GBS", "GPU_BF16_PEAK_TFLOPS", "ROOT", "Timing", "cpu_model", "cuda_missing", "free_memory",
    "git_commit", "machine_info", "machine_line", "matmul_tflops", "mfu", "nominal_bandwidth_gbs",
    "nominal_peak_tflops", "peak_memory_mb", "reset_peak_memory", "synchronize", "visible_pairs",
    "Goal", "MarkdownSection", "Results", "Row", "Spec", "add_output_args", "append_markdown", "compare", "fmt_num", "fmt_pct",
    "markdown_table", "run_plan", "run_row", "write_json",
]
