"""Embedding a corpus into a folder of shards, resumable: `modernbert-embed embed` as a library.

The model is opened as the kind its folder says. An embedder's shards hold embeddings; a
classifier's or cross-encoder's (a `ModernBertForSequenceClassification` folder) hold float32
scores and the int32 label id of each document instead (see `scoring`), read back as
`CorpusOutput.scores` / `labels`. Its input is a text field, or a pair of fields (`text_field`,
`text_pair_field`: `[CLS] text [SEP] text_pair [SEP]`). A multi-vector (ColBERT) model's shards
hold every document's token vectors, as `MultiVectorEncoder.encode_document` gives them (with
`multivector_mode` "query": `encode_query`), in one flat array per shard with int64 offsets (see
`multivector`), read back one document at a time from memory-mapped shards
(`CorpusOutput.document(i)`). Everything else below holds for all three.

Output folder layout:

```
OUT/manifest.json             the job (model, options, inputs), its runs, and the shards (once compacted)
OUT/journal.jsonl             while a run writes: one line per shard recorded since the last compaction
OUT/.lock                     held (flock) while a run writes here: a second run is refused
OUT/calibration.json          int8/uint8 only: the ranges every shard was quantised with
OUT/shard-00000.npy           embeddings of the shard's documents, [n, d] (or [n, d/8] bits)
OUT/shard-00000.meta.parquet  row-aligned: row, id, tokens, truncated (+ windows with chunking)
...                           (.meta.jsonl instead with --meta-format jsonl)
```

A classifier's folder has, instead of `shard-00000.npy`:

```
OUT/shard-00000.scores.npy    float32 scores, [n] for one label, else [n, num_labels]
OUT/shard-00000.labels.npy    int32 label id of each document, [n]
```

A multi-vector model's folder has, instead of `shard-00000.npy`:

```
OUT/shard-00000.tokens.npy    token vectors [total_tokens, dim], float16 (--precision float32 on request)
OUT/shard-00000.offsets.npy   int64 [n + 1]: document i is tokens[offsets[i]:offsets[i + 1]]
```

Shard k holds input rows [k * shard_size, (k + 1) * shard_size) in global row order (the rows of
all inputs one after the other). A row that cannot be embedded under `--on-error skip` (bad input,
or an embedding that stays NaN or infinite when embedded on its own) has no embedding and is listed
in its shard's `skipped` with where and why, so `documents + skipped == rows` for every shard and
in total.

Crash safety: each file is written to a temporary name, synced and renamed; a shard is recorded
(one fsync'd line in the journal) only after both of its files are in place, with their sizes and
sha256. A rerun of the same command locks the folder, then reads it, checks everything (model,
options, inputs, the recorded shards' files and the digests of their input rows) and only then
writes: it embeds the shards that are missing, each exactly as an uninterrupted run would (a shard
is one unit of work whose result depends only on its rows). A rerun that is refused leaves the
folder as it was; a rerun with nothing to do writes nothing.

What may change between runs into one folder:

- Refused (part of the folder's identity; the refusal names the difference): the model (its
  kind, a fingerprint of its weights, tokenizer and config files), its dtype, pooling and
  max_seq_length (a classifier: num_labels); the inputs (paths and formats, and the rows of every
  recorded shard: their count and digest); the options input_format, text_field, id_field (and
  whether it was given), prompt, truncate_dim, normalize, precision, calibration_size, long,
  overlap, shard_size, meta_format (a classifier: input_format, text_field, text_pair_field,
  id_field, id_required, scores, shard_size, meta_format; a multi-vector model: input_format,
  text_field, id_field, id_required, multivector_mode, truncate_dim, precision, shard_size,
  meta_format, and the folder's ColBERT settings that decide the vectors: prefixes, lengths,
  query expansion, skiplist, the projection's width); and int8/uint8 calibration ranges
  other than the folder's. The prompt and normalize are recorded as they were settled: given, or
  from the model's folder (its default_prompt_name; whether it lists a Normalize module), so a
  rerun that gives explicitly what the folder said is the same job.
- Free, with the same bytes as an uninterrupted run: on_error (a shard is written only when each
  of its rows is embedded or recorded as skipped, and a row is skipped for the same reason under
  either policy: `stop` stops where `skip` would record), the progress bar and quiet, the model's
  name and revision as given (the fingerprint decides), local_files_only.
- Recorded per run, and warned about on resume: the device, the op implementations (Triton or
  torch), max_batch_tokens and the CPU threads. They decide how documents are batched and how
  the sums inside the model are ordered, so a shard embedded under other values may differ in
  the last bits of its floats (and, rarely, in a quantised code at a bucket edge). Every shard
  names the run that wrote it (`run`, a number in `runs`), so a folder says which shards were
  made how; only a resume under the same values gives the same bytes as an uninterrupted run.

manifest.json: `format`, `version` (2; folders of version 1 are read and verified, not resumed),
`complete`; `model` (kind "embedder", "classifier" or "multivector" (absent: written before it was
recorded, an embedder), name, revision, fingerprint, embedding_dim or num_labels or colbert (the
ColBERT settings), max_seq_length, pooling, dtype); `options` (the identity ones); `inputs` (path,
format, bytes, rows); `calibration` (int8/uint8: precision, convention, source, min, max; no
convention: written before it was recorded, read as `quantize.LEGACY_CONVENTION`); `embeddings`
(precision, dtype, width, dim, packed_bits, normalized), or for a classifier `scores` (dtype,
shape, num_labels, values "activated" | "logits" | "softmax", activation (the torch.nn class
applied, None for logits), softmax, id2label, labels {dtype, rule}), or for a multi-vector model
`vectors` (mode, precision, dtype, dim, normalized, prefix, length, skiplist, query_expansion,
offsets {dtype, rule}); `shards` (index, rows [start, end), documents, skipped [{row, where,
error}], tokens, truncated, input_sha256, files {embeddings (a classifier: scores, labels; a
multi-vector model: tokens, offsets), meta: name, bytes, sha256}, run; a multi-vector model's:
`vectors`, its token vectors); `totals` once complete (with `vectors` for a multi-vector model);
`runs` (number, started, device, ops, max_batch_tokens, threads, on_error; once finished: seconds,
documents/s, tokens/s, ...). See `manifest.py` for the journal.

The modules: `sources` (input files), `files` (atomic writes, checksums, shard bytes),
`manifest` (manifest and journal), `options` (EmbedOptions), `pipeline` (reading, embedding and
writing shards), `scoring` (a classifier's scores and labels), `multivector` (a ColBERT model's
token vectors), `calibration` (int8/uint8 ranges),
`job` (CorpusJob: the order of checks and writes), `output` (reading a folder).
"""

from .errors import CorpusError, RefusedError, RowError
from .job import CorpusJob, RunResult
from .manifest import Manifest
from .options import SCORE_VALUES, EmbedOptions
from .output import CorpusOutput, Shard, iter_shards, read_output, verify_output
from .sources import Source, detect_format

__all__ = ["CorpusJob", "EmbedOptions", "CorpusError", "RefusedError", "RowError", "Source", "Manifest",
           "read_output", "verify_output", "iter_shards", "CorpusOutput", "Shard", "RunResult", "detect_format",
           "SCORE_VALUES"]
