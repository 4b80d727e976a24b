"""Ray Data adapter: embed a Dataset's text column with one Embedder per actor.

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
can also be handed to `map_batches` directly. `ray` itself is needed only by `embed_dataset`;
the actors need just this package and pyarrow (install the `ray` extra).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

import numpy as np

from . import quantize as Q
from .options import EncodeOptions, OptionError
from .weights import DEFAULT_MODEL

_ENCODE_OPTIONS = {f.name for f in dataclasses.fields(EncodeOptions)}


def _check_distributed(opts: EncodeOptions) -> EncodeOptions:
    """int8/uint8 over many actors need fixed ranges: calibrating each batch on itself would put
    batches on different scales."""
    if opts.precision in Q.SCALAR_PRECISIONS and opts.ranges is None:
        raise OptionError("ranges", f"{{precision}} {opts.precision!r} in a distributed job needs fixed "
                                    "{ranges}=[minima, maxima] (e.g. quantize.load_calibration(path)[0]); "
                                    "calibrating each batch on itself would put batches on different scales")
    return opts


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
    vectors) or dicts of numpy arrays (a 2-D array). Options are those of `Embedder.encode`.
    int8/uint8 need fixed `ranges` ([2, d], e.g. from `quantize.load_calibration`), so that every
    batch, on every actor, is quantised on the same scale.
    """

    def __init__(self, model: str = DEFAULT_MODEL, *, text_column: str = "text", output_column: str = "embedding",
                 prompt_name: str | None = None, prompt: str | None = None, truncate_dim: int | None = None,
                 normalize_embeddings: bool = True, precision: str = "float32", ranges=None,
                 long: str = "truncate", overlap: int | None = None, max_batch_tokens: int | None = None,
                 device: str | None = None, dtype: str | None = None, revision: str | None = None,
                 local_files_only: bool | None = None, keep_columns: bool = True):
        from .api import Embedder

        self.options: dict[str, Any] = dict(
            prompt_name=prompt_name, prompt=prompt, truncate_dim=truncate_dim,
            normalize_embeddings=normalize_embeddings, precision=precision, long=long, overlap=overlap,
            max_batch_tokens=max_batch_tokens, ranges=ranges)
        _check_distributed(EncodeOptions(**self.options))  # a bad option fails here, not on the first batch
        self.embedder = Embedder.from_pretrained(model, device=device, dtype=dtype, revision=revision,
                                                 local_files_only=local_files_only)
        self.opts = EncodeOptions(**self.options).for_model(self.embedder.embedding_dim)
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
        pa = _import("pyarrow")
        if isinstance(batch, pa.Table):
            if self.text_column not in batch.column_names:
                raise KeyError(f"no column {self.text_column!r} in the batch (columns: {batch.column_names})")
            emb = self.embed(batch.column(self.text_column).to_pylist())
            column = fixed_size_list(emb)
            if not self.keep_columns:
                return pa.table({self.output_column: column})
            if self.output_column in batch.column_names:
                batch = batch.drop_columns([self.output_column])
            return batch.append_column(self.output_column, column)
        if isinstance(batch, dict):
            if self.text_column not in batch:
                raise KeyError(f"no column {self.text_column!r} in the batch (columns: {list(batch)})")
            emb = self.embed(np.asarray(batch[self.text_column]).tolist())
            out = dict(batch) if self.keep_columns else {}
            out[self.output_column] = emb
            return out
        if hasattr(batch, "columns") and hasattr(batch, "copy"):  # pandas.DataFrame
            emb = self.embed(batch[self.text_column].tolist())
            out = batch.copy() if self.keep_columns else batch.iloc[:, :0].copy()
            out[self.output_column] = list(emb)
            return out
        raise TypeError(f"unsupported batch type {type(batch).__name__}; use batch_format='pyarrow'")


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
    opts = _check_distributed(EncodeOptions(**{k: v for k, v in options.items() if k in _ENCODE_OPTIONS}))
    if opts.ranges is not None:
        options["ranges"] = opts.ranges.tolist()  # sent to every actor
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
        RayEmbedder,
        fn_constructor_kwargs={"model": str(model), **options},
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ray_data.ActorPoolStrategy(size=num_actors),
        zero_copy_batch=True,
        **kwargs,
    )


__all__ = ["RayEmbedder", "embed_dataset", "fixed_size_list"]
