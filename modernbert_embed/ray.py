"""Ray Data adapter: embed a Dataset's text column (or score it with a classifier) with one loaded
model per actor.

```python
import ray
from modernbert_embed.ray import embed_dataset

ds = ray.data.read_parquet("s3://bucket/corpus/")
ds = embed_dataset(ds, "nomic-ai/modernbert-embed-base", prompt_name="search_document")
ds.write_parquet("s3://bucket/embeddings/")  # embedding: fixed_size_list<float>[768]
```

`embed_dataset` is `Dataset.map_batches(RayEmbedder, ...)` with an actor pool
(`ActorPoolStrategy`): each actor loads the model once and embeds batch after batch; where the
cluster has GPUs every actor takes one (and there is one actor per GPU by default). `RayEmbedder`
can also be handed to `map_batches` directly. `ray` itself is needed only by `embed_dataset` and
`score_dataset`; the actors need just this package and pyarrow (install the `ray` extra).

The defaults follow the model's folder: `normalize_embeddings=None` normalises when it lists a
Normalize module, `prompt_name` looks among its prompts (config_sentence_transformers.json) as
well as the built-in ones, and with neither prompt given its `default_prompt_name` is used.

A classifier or cross-encoder (a `ModernBertForSequenceClassification` folder) scores instead:

```python
from modernbert_embed.ray import score_dataset

ds = score_dataset(ds, "Alibaba-NLP/gte-reranker-modernbert-base", text_column="query",
                   text_pair_column="document")  # scores: float32, label: int32
```

`score_dataset` / `RayScorer` add the scores (a float32 column for one label, else a fixed-size
list of num_labels float32) and the label id (int32) of each row, as the corpus command writes them
(`corpus.scoring`: the folder's activation by default, as `CrossEncoder.predict`; `scores="logits"`
or `"softmax"` on request; the label decided on the logits). Each class refuses a folder of the
other kind, naming the one to use.

A multi-vector (ColBERT) folder gives each row its token vectors:

```python
from modernbert_embed.ray import multivector_dataset

ds = multivector_dataset(ds, "lightonai/GTE-ModernColBERT-v1")  # token_vectors: list<fixed_size_list<halffloat>[128]>
```

`multivector_dataset` / `RayMultiVectorEncoder` add one list of [n_i, dim] vectors per row, as
`MultiVectorEncoder.encode_document` gives them (`mode="query"`: `encode_query`), float16 by
default as the corpus command writes them (`precision="float32"` on request; `truncate_dim` as
the encoder's).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

import numpy as np

from . import quantize as Q
from .options import EncodeOptions, OptionError
from .weights import CLASSIFIER, DEFAULT_MODEL, EMBEDDER, MULTIVECTOR, CheckpointError

_ENCODE_OPTIONS = {f.name for f in dataclasses.fields(EncodeOptions)}
SCORE_VALUES = ("activated", "logits", "softmax")  # as the corpus command's --scores
# The Ray class that runs each kind of folder, for the error that names it.
RAY_FRONT_ENDS = {EMBEDDER: "RayEmbedder (embed_dataset)", CLASSIFIER: "RayScorer (score_dataset)",
                  MULTIVECTOR: "RayMultiVectorEncoder (multivector_dataset)"}
MULTIVECTOR_MODES = ("document", "query")  # as the corpus command's --multivector-mode
MULTIVECTOR_PRECISIONS = ("float16", "float32")


def _check_distributed(opts: EncodeOptions) -> EncodeOptions:
    """int8/uint8 over many actors need fixed ranges: calibrating each batch on itself would put
    batches on different scales."""
    if opts.precision in Q.SCALAR_PRECISIONS and opts.ranges is None:
        raise OptionError("ranges", f"{{precision}} {opts.precision!r} in a distributed job needs fixed "
                                    "{ranges}=[minima, maxima] (e.g. quantize.load_calibration(path)[0]); "
                                    "calibrating each batch on itself would put batches on different scales")
    return opts


def _open(model, kind: str, device, dtype, revision, local_files_only):
    """The `LoadedModel` of `model`, which must be of `kind`: a folder of the other kind is refused
    (CheckpointError) before its weights are loaded, naming the Ray class that runs it."""
    from .loaded import LoadedModel
    from .weights import Checkpoint

    checkpoint = Checkpoint.open(model, revision=revision, local_files_only=local_files_only)
    if checkpoint.kind != kind:
        what = {CLASSIFIER: "a classifier (cross-encoder): it gives scores, not embeddings",
                MULTIVECTOR: "a multi-vector (ColBERT) model: it gives one vector per token",
                EMBEDDER: "an embedder: it gives one pooled vector per text"}[checkpoint.kind]
        raise CheckpointError(f"{checkpoint.name or model} is {what}; use modernbert_embed.ray."
                              f"{RAY_FRONT_ENDS[checkpoint.kind]}")
    return LoadedModel.from_checkpoint(checkpoint, device=device, dtype=dtype, kind=kind)


def _import(name: str):
    """The installed package `name` (e.g. the real `ray`, never this module)."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ImportError(f"{name} is needed here: pip install 'modernbert-embed[ray]' ({e})") from None


class RayEmbedder:
    """A callable class for `Dataset.map_batches`: adds `output_column` with one embedding per row.

    Batches may be pyarrow Tables (recommended, `batch_format="pyarrow"`: the embedding becomes a
    fixed-size list column, float32 for float32 output), pandas DataFrames (a column of numpy
    vectors) or dicts of numpy arrays (a 2-D array). Options are those of `Embedder.encode`, with
    its defaults (`normalize_embeddings=None`: what the folder says; the folder's prompts).
    int8/uint8 need fixed `ranges` ([2, d], e.g. from `quantize.load_calibration`), so that every
    batch, on every actor, is quantised on the same scale. A classifier folder is refused
    (`RayScorer` runs it).
    """

    def __init__(self, model: str = DEFAULT_MODEL, *, text_column: str = "text", output_column: str = "embedding",
                 prompt_name: str | None = None, prompt: str | None = None, truncate_dim: int | None = None,
                 normalize_embeddings: bool | None = None, precision: str = "float32", ranges=None,
                 long: str = "truncate", overlap: int | None = None, max_batch_tokens: int | None = None,
                 device: str | None = None, dtype: str | None = None, revision: str | None = None,
                 local_files_only: bool | None = None, keep_columns: bool = True):
        from .api import Embedder

        self.options: dict[str, Any] = dict(
            prompt_name=prompt_name, prompt=prompt, truncate_dim=truncate_dim,
            normalize_embeddings=normalize_embeddings, precision=precision, long=long, overlap=overlap,
            max_batch_tokens=max_batch_tokens, ranges=ranges)
        _check_distributed(_model_free(self.options))  # a bad option fails here, not on the first batch
        self.loaded = _open(model, EMBEDDER, device, dtype, revision, local_files_only)
        self.embedder = Embedder(self.loaded)  # encode: the options, chunking and precisions of the API
        checked = dict(self.options)  # as encode reads them: no prompt given, the folder's default one
        if prompt is None and prompt_name is None:
            checked["prompt_name"] = self.loaded.default_prompt_name
        self.opts = EncodeOptions(prompts=self.loaded.prompts, **checked).for_model(
            self.loaded.config.hidden_size, self.loaded.normalize)
        self.text_column, self.output_column = text_column, output_column
        self.keep_columns = keep_columns

    def embed(self, texts) -> np.ndarray:
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                what = "null" if t is None else f"a {type(t).__name__}"
                raise TypeError(f"column {self.text_column!r}, row {i} of this batch is {what}, not a string")
        if not texts:
            p = self.opts.precision
            dim = self.opts.dim(self.embedder.embedding_dim)
            return np.empty((0, Q.output_width(p, dim)), dtype=Q.output_dtype(p))
        return self.embedder.encode(texts, **self.options)

    def __call__(self, batch):
        return map_batch(batch, self.keep_columns, self._outputs)

    def _outputs(self, get, fmt: str) -> dict:
        emb = self.embed(get(self.text_column))
        if fmt == "arrow":
            return {self.output_column: fixed_size_list(emb)}
        return {self.output_column: list(emb) if fmt == "pandas" else emb}


def _model_free(options: dict) -> EncodeOptions:
    """The options as far as they can be checked before the model is loaded: a `prompt_name` is
    looked up among the folder's prompts once it is."""
    if options.get("prompt") is not None and options.get("prompt_name") is not None:
        raise OptionError("prompt", "give either {prompt} or {prompt_name}, not both")
    return EncodeOptions(**{k: v for k, v in options.items() if k in _ENCODE_OPTIONS and k != "prompt_name"})


class RayScorer:
    """A callable class for `Dataset.map_batches` with a classifier or cross-encoder folder: adds
    `output_column` with the scores of each row (float32; a fixed-size list of num_labels float32
    for two labels or more) and `label_column` with its label id (int32).

    Each row is the text of `text_column`, or with `text_pair_column` the pair (text, text_pair),
    scored `[CLS] text [SEP] text_pair [SEP]` and truncated longest first to max_seq_length.
    `scores`: "activated" (the folder's activation, as `CrossEncoder.predict`), "logits" or
    "softmax" (see `corpus.scoring`); the label is decided on the logits (argmax, or logit >= 0 for
    one label). Batches as `RayEmbedder`'s. An embedder folder is refused (`RayEmbedder` runs it).
    """

    def __init__(self, model: str, *, text_column: str = "text", text_pair_column: str | None = None,
                 scores: str = "activated", output_column: str = "scores", label_column: str = "label",
                 max_batch_tokens: int | None = None, device: str | None = None, dtype: str | None = None,
                 revision: str | None = None, local_files_only: bool | None = None, keep_columns: bool = True):
        from .corpus.scoring import Scoring

        _check_score_options(text_column, text_pair_column, scores, output_column, label_column)
        self.opts = EncodeOptions(max_batch_tokens=max_batch_tokens)
        self.loaded = _open(model, CLASSIFIER, device, dtype, revision, local_files_only)
        n = self.loaded.engine.head.spec.num_labels
        if scores == "softmax" and n == 1:
            raise ValueError(f"scores='softmax' needs two labels or more; {model} has one (a softmax over one "
                             "label is always 1): use 'activated' or 'logits'")
        self.scoring = Scoring(self.loaded, scores)
        self.text_column, self.text_pair_column = text_column, text_pair_column
        self.output_column, self.label_column = output_column, label_column
        self.keep_columns = keep_columns

    def _texts(self, column: str, values) -> list[str]:
        values = list(values)
        for i, t in enumerate(values):
            if not isinstance(t, str):
                what = "null" if t is None else f"a {type(t).__name__}"
                raise TypeError(f"column {column!r}, row {i} of this batch is {what}, not a string")
        return values

    def score(self, texts, text_pairs=None) -> tuple[np.ndarray, np.ndarray]:
        """(scores float32 [n] or [n, num_labels], labels int32 [n]) of texts, or of pairs."""
        import torch

        texts = self._texts(self.text_column, texts)
        pairs = None if text_pairs is None else list(zip(texts, self._texts(self.text_pair_column, text_pairs)))
        if not texts:
            return self.scoring.empty()
        m = self.loaded
        if pairs is None:
            def tokenize(a, b):
                return m.tokenize(texts[a:b])
        else:
            def tokenize(a, b):
                return m.tokenize_pairs(pairs[a:b])

        def compute(ids, out, check_finite):
            m.engine.score(ids, max_batch_tokens=self.opts.max_batch_tokens, out=out, check_finite=check_finite)

        with torch.inference_mode():
            logits, _ = m.through_model(len(texts), tokenize, compute, self.scoring.num_labels, what="logits")
        return self.scoring.scores(logits), self.scoring.labels(logits)

    def __call__(self, batch):
        return map_batch(batch, self.keep_columns, self._outputs)

    def _outputs(self, get, fmt: str) -> dict:
        scores, labels = self.score(get(self.text_column), get(self.text_pair_column) if self.text_pair_column else None)
        if fmt == "arrow":
            pa = _import("pyarrow")
            return {self.output_column: pa.array(scores) if scores.ndim == 1 else fixed_size_list(scores),
                    self.label_column: pa.array(labels, type=pa.int32())}
        return {self.output_column: list(scores) if fmt == "pandas" and scores.ndim == 2 else scores,
                self.label_column: labels}


class RayMultiVectorEncoder:
    """A callable class for `Dataset.map_batches` with a multi-vector (ColBERT) folder: adds
    `output_column` with the token vectors of each row, [n_i, dim] as
    `MultiVectorEncoder.encode_document` (`mode="query"`: `encode_query`) gives them, in
    `precision` float16 (the default, as the corpus command) or float32. pyarrow batches get a
    `list<fixed_size_list<float, dim>>` column; dicts and DataFrames one [n_i, dim] array per
    row. `truncate_dim`: the first features of each vector, normalised again (default: the
    folder's). Another kind of folder is refused, naming the class that runs it."""

    def __init__(self, model: str, *, text_column: str = "text", output_column: str = "token_vectors",
                 mode: str = "document", precision: str = "float16", truncate_dim: int | None = None,
                 max_batch_tokens: int | None = None, device: str | None = None, dtype: str | None = None,
                 revision: str | None = None, local_files_only: bool | None = None, keep_columns: bool = True):
        from .multivector import MultiVectorEncoder

        _check_multivector_options(mode, precision)
        self.opts = EncodeOptions(max_batch_tokens=max_batch_tokens)
        self.loaded = _open(model, MULTIVECTOR, device, dtype, revision, local_files_only)
        self.encoder = MultiVectorEncoder(self.loaded)
        width = self.encoder.spec.out_features
        if truncate_dim is not None and (isinstance(truncate_dim, bool) or not isinstance(truncate_dim, int)
                                         or not 1 <= truncate_dim <= width):
            raise ValueError(f"truncate_dim must be an int in 1..{width}, got {truncate_dim!r}")
        self.truncate_dim = truncate_dim
        self.dim = truncate_dim or self.encoder.get_embedding_dimension()
        self.is_query, self.dtype = mode == "query", np.dtype(precision)
        self.text_column, self.output_column = text_column, output_column
        self.keep_columns = keep_columns

    def encode(self, texts) -> tuple[np.ndarray, np.ndarray]:
        """(token vectors [K, dim] in `precision`, int64 offsets [n + 1]) of `texts`."""
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                what = "null" if t is None else f"a {type(t).__name__}"
                raise TypeError(f"column {self.text_column!r}, row {i} of this batch is {what}, not a string")
        offsets = np.zeros(len(texts) + 1, dtype=np.int64)
        if not texts:
            return np.empty((0, self.dim), dtype=self.dtype), offsets
        docs = self.encoder.encode(texts, is_query=self.is_query, truncate_dim=self.truncate_dim,
                                   max_batch_tokens=self.opts.max_batch_tokens)
        np.cumsum([len(d) for d in docs], out=offsets[1:])
        return np.concatenate(docs).astype(self.dtype, copy=False), offsets

    def __call__(self, batch):
        return map_batch(batch, self.keep_columns, self._outputs)

    def _outputs(self, get, fmt: str) -> dict:
        vectors, offsets = self.encode(get(self.text_column))
        if fmt == "arrow":
            pa = _import("pyarrow")
            return {self.output_column: pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)),
                                                                 fixed_size_list(vectors))}
        rows = _split(vectors, offsets)
        return {self.output_column: list(rows) if fmt == "pandas" else rows}


def map_batch(batch, keep_columns: bool, outputs: Callable[[Callable[[str], list], str], dict]):
    """One `map_batches` call for every Ray class here, whatever the batch format: `outputs(get,
    fmt)` reads input columns with `get(name)` (a list; a KeyError names a missing column) and
    returns the new columns for `fmt` ("arrow", "dict" or "pandas"); they replace columns of the
    same name, and stand alone unless `keep_columns`."""
    pa = _import("pyarrow")
    if isinstance(batch, pa.Table):
        fmt, names = "arrow", batch.column_names
        read = lambda c: batch.column(c).to_pylist()  # noqa: E731
    elif isinstance(batch, dict):
        fmt, names = "dict", list(batch)
        read = lambda c: np.asarray(batch[c]).tolist()  # noqa: E731
    elif hasattr(batch, "columns") and hasattr(batch, "copy"):  # pandas.DataFrame
        fmt, names = "pandas", list(batch.columns)
        read = lambda c: batch[c].tolist()  # noqa: E731
    else:
        raise TypeError(f"unsupported batch type {type(batch).__name__}; use batch_format='pyarrow'")

    def get(column: str) -> list:
        if column not in names:
            raise KeyError(f"no column {column!r} in the batch (columns: {list(names)})")
        return read(column)

    cols = outputs(get, fmt)
    if fmt == "arrow":
        if not keep_columns:
            return pa.table(cols)
        batch = batch.drop_columns([c for c in cols if c in names])
        for name, column in cols.items():
            batch = batch.append_column(name, column)
        return batch
    out = (dict(batch) if fmt == "dict" else batch.copy()) if keep_columns else \
        ({} if fmt == "dict" else batch.iloc[:, :0].copy())
    for name, column in cols.items():
        out[name] = column
    return out

def _split(vectors: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """One [n_i, dim] array per row, as a 1-D object array."""
    out = np.empty(len(offsets) - 1, dtype=object)
    for i, (a, b) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist())):
        out[i] = vectors[a:b]
    return out


def _check_multivector_options(mode, precision) -> None:
    if mode not in MULTIVECTOR_MODES:
        raise ValueError(f"mode must be one of {MULTIVECTOR_MODES}, got {mode!r}")
    if precision not in MULTIVECTOR_PRECISIONS:
        raise ValueError(f"precision must be one of {MULTIVECTOR_PRECISIONS} for token vectors, got {precision!r}")


def _check_score_options(text_column, text_pair_column, scores, output_column, label_column) -> None:
    if scores not in SCORE_VALUES:
        raise ValueError(f"scores must be one of {SCORE_VALUES}, got {scores!r}")
    if text_pair_column is not None and text_pair_column == text_column:
        raise ValueError(f"text_pair_column and text_column both name {text_column!r}; a pair is two columns")
    if output_column == label_column:
        raise ValueError(f"output_column and label_column both name {label_column!r}")


def fixed_size_list(emb: np.ndarray):
    """[n, d] numpy -> a pyarrow FixedSizeListArray of n lists of d values, same dtype."""
    pa = _import("pyarrow")
    emb = np.ascontiguousarray(emb)
    n, d = emb.shape
    return pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), d)


def embed_dataset(ds, model: str = DEFAULT_MODEL, *, num_actors: int | None = None, num_gpus: float | None = None,
                  num_cpus: float | None = None, batch_size: int = 512, **options):
    """`ds.map_batches` with a pool of `num_actors` RayEmbedder actors (pyarrow batches of
    `batch_size` rows). num_gpus per actor defaults to 1 where the cluster has GPUs, else 0 (and
    the actors then run on the CPU); num_actors defaults to the number of GPUs, or 1 without.
    Other keyword arguments go to RayEmbedder (text_column, prompt_name, truncate_dim, ...)."""
    opts = _check_distributed(_model_free(options))
    if opts.ranges is not None:
        options["ranges"] = opts.ranges.tolist()  # sent to every actor
    return _map_actors(ds, RayEmbedder, model, num_actors, num_gpus, num_cpus, batch_size, options)


def score_dataset(ds, model: str, *, num_actors: int | None = None, num_gpus: float | None = None,
                  num_cpus: float | None = None, batch_size: int = 512, **options):
    """`ds.map_batches` with a pool of `num_actors` RayScorer actors, as `embed_dataset` (the same
    actors and resources). Other keyword arguments go to RayScorer (text_column, text_pair_column,
    scores, output_column, label_column, max_batch_tokens, ...)."""
    _check_score_options(options.get("text_column", "text"), options.get("text_pair_column"),
                         options.get("scores", "activated"), options.get("output_column", "scores"),
                         options.get("label_column", "label"))
    EncodeOptions(max_batch_tokens=options.get("max_batch_tokens"))
    return _map_actors(ds, RayScorer, model, num_actors, num_gpus, num_cpus, batch_size, options)


def multivector_dataset(ds, model: str, *, num_actors: int | None = None, num_gpus: float | None = None,
                        num_cpus: float | None = None, batch_size: int = 512, **options):
    """`ds.map_batches` with a pool of `num_actors` RayMultiVectorEncoder actors, as
    `embed_dataset` (the same actors and resources). Other keyword arguments go to
    RayMultiVectorEncoder (text_column, output_column, mode, precision, truncate_dim, ...)."""
    _check_multivector_options(options.get("mode", "document"), options.get("precision", "float16"))
    EncodeOptions(max_batch_tokens=options.get("max_batch_tokens"))
    return _map_actors(ds, RayMultiVectorEncoder, model, num_actors, num_gpus, num_cpus, batch_size, options)


def _map_actors(ds, cls, model, num_actors, num_gpus, num_cpus, batch_size, options: dict):
    ray = _import("ray")
    ray_data = _import("ray.data")
    if not ray.is_initialized():  # Ray Data would start a local cluster anyway; look at it first
        ray.init()
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if num_gpus is None:
        num_gpus = 1 if gpus else 0
    if num_actors is None:
        num_actors = max(1, int(gpus // num_gpus)) if num_gpus else 1
    if not num_gpus:
        options.setdefault("device", "cpu")
    kwargs: dict[str, Any] = {"num_gpus": num_gpus}
    if num_cpus is not None:
        kwargs["num_cpus"] = num_cpus
    return ds.map_batches(
        cls,
        fn_constructor_kwargs={"model": str(model), **options},
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ray_data.ActorPoolStrategy(size=num_actors),
        zero_copy_batch=True,
        **kwargs,
    )


__all__ = ["RayEmbedder", "RayScorer", "RayMultiVectorEncoder", "embed_dataset", "score_dataset",
           "multivector_dataset", "fixed_size_list", "SCORE_VALUES", "MULTIVECTOR_MODES", "MULTIVECTOR_PRECISIONS"]
