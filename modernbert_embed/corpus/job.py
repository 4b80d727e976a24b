"""`CorpusJob`: one run of `modernbert-embed embed`, from the options to a finished folder.

The model is opened as a `LoadedModel` of the kind its folder says: an embedder's shards hold
embeddings, a classifier's (cross-encoder's) hold scores and labels (see `scoring.py`), a
multi-vector (ColBERT) model's hold token vectors and offsets (see `multivector.py`); the rest
(the order below, the manifest, resume, verify) is the same for all three.

The order is the point: everything is checked before anything is written.

1. Options (`EmbedOptions.validate`) and inputs (`Source.open`) when the job is made.
2. The rows of every input counted; the model loaded and the options checked against it.
3. The output folder: refused if it is something else; then locked, and only then read (the
   manifest, its journal), and compared with this job: model, options, inputs, the recorded
   shards' files and the digests of their input rows, the calibration.
4. Only now is the folder written: a new manifest, or the existing one compacted with this run's
   record; the calibration; each shard; the totals.

A rerun that is refused at 1-3 leaves the folder as it was, so a finished folder stays complete and
readable. A rerun with nothing left to do writes nothing.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import quantize as Q
from ..loaded import LoadedModel, as_loaded
from ..weights import CLASSIFIER, EMBEDDER, MULTIVECTOR
from . import calibration, files
from .errors import CorpusError, RefusedError
from .manifest import (FORMAT_VERSION, LOCK, MANIFEST, Manifest, identity_differences, now, recorded_kind,
                       scalar_convention)
from .options import EmbedOptions
from .pipeline import Shards, progress_bar
from .multivector import TokenVectors
from .scoring import Scoring
from .sources import Rows, Source

# Settings of a run that may change between runs, though a change can alter the last bits of the
# floats of the shards written after it (recorded per run, warned about on resume).
RUN_SETTINGS = ("device", "ops", "max_batch_tokens", "threads")


@dataclass
class RunResult:
    documents: int = 0  # embedded by this run
    skipped: int = 0
    tokens: int = 0  # tokens through the model in this run
    seconds: float = 0.0
    shards_written: int = 0
    already_complete: bool = False
    total_documents: int = 0
    total_rows: int = 0
    device: str = ""
    load_seconds: float = 0.0
    calibration_seconds: float = 0.0
    verb: str = "embedded"  # "scored" for a classifier

    @property
    def docs_per_s(self) -> float:
        return self.documents / self.seconds if self.seconds > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        if self.already_complete:
            return (f"nothing to do: the output is already complete ({self.total_documents} documents "
                    f"of {self.total_rows} rows)")
        skipped = f" ({self.skipped} rows skipped)" if self.skipped else ""
        return (f"{self.verb} {self.documents} documents{skipped}, {self.tokens} tokens in {self.seconds:.2f} s: "
                f"{self.docs_per_s:.1f} documents/s, {self.tokens_per_s:.0f} tokens/s on {self.device}")


class CorpusJob:
    """Runs `modernbert-embed embed` (see the package docstring for the folder and its rules).
    `model`: an already loaded model (a `LoadedModel`, or an `Embedder` or `CrossEncoder` over
    one) to use instead of loading `opts.model`; `embedder`: the same, by its former name.
    `on_shard` hears of each shard as it is recorded (its manifest entry)."""

    def __init__(self, opts: EmbedOptions, embedder=None, log=None, on_shard=None, model=None):
        self.encode = opts.validate()
        self.opts = opts
        self.out = Path(opts.output)
        given = model if model is not None else embedder
        self._model = None if given is None else as_loaded(given)
        self.scoring: Scoring | None = None
        self.vectors: TokenVectors | None = None
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.on_shard = on_shard
        self.sources = [Source.open(p, opts.input_format, opts.text_field, opts.id_field, opts.id_required,
                                    opts.text_pair_field)
                        for p in opts.inputs]
        self._lock_file = None

    @property
    def kind(self) -> str:
        """EMBEDDER, CLASSIFIER or MULTIVECTOR: the model's kind (once loaded)."""
        return self._model.kind

    def run(self) -> RunResult:
        try:
            return self._run()
        finally:
            if self._lock_file is not None:
                self._lock_file.close()  # releases the lock
                self._lock_file = None

    # ---------------------------------------------------------------- 2. inputs and model
    def _count_rows(self) -> tuple[int, list[int], list[str]]:
        counts = [s.count() for s in self.sources]
        total = sum(counts)
        empty = [str(s.path) for s, c in zip(self.sources, counts) if c == 0]
        if total == 0:
            raise CorpusError(f"no documents to embed: {', '.join(empty)} "
                              f"{'is' if len(empty) == 1 else 'are'} empty")
        if empty and self.opts.on_error == "stop":
            raise CorpusError(f"{empty[0]}: empty input (no documents); remove it, or pass --on-error skip "
                              "to go on without it")
        return total, counts, empty

    def _load_model(self) -> LoadedModel:
        """The model (loaded from `opts.model` as the kind its folder says, or the one given),
        with the options checked against it: those of the other kind refused by name, an
        embedder's prompt and normalize settled from its folder (`EmbedOptions.resolve`)."""
        o = self.opts
        model = self._model
        if model is None:
            model = LoadedModel.open(o.model, device=o.device, dtype=o.dtype, revision=o.revision,
                                     local_files_only=o.local_files_only)
        else:  # given: it must be what the options ask for
            e = model.engine
            if o.dtype is not None and e.dtype_name != o.dtype:
                raise RefusedError(f"the model given runs {e.dtype_name}, but the options ask for --dtype {o.dtype}")
            if o.device is not None and not _same_device(o.device, e.device):
                raise RefusedError(f"the model given runs on {e.device}, but the options ask for --device {o.device}")
        if model.checkpoint is None:
            raise RefusedError("the corpus command needs a model loaded from a checkpoint folder "
                               "(LoadedModel.open, Embedder/CrossEncoder.from_pretrained or from_checkpoint)")
        if model.tokenizer is None:
            raise RefusedError(f"the model {o.model} has no tokenizer.json; the corpus command needs one")
        o.refuse_other_kind(model.kind, model.checkpoint.name or o.model, _describe(model))
        self.encode = o.resolve(model)
        if model.kind == CLASSIFIER:
            self.scoring = Scoring(model, o.score_values)
        elif model.kind == MULTIVECTOR:
            self.vectors = TokenVectors(model, o.mode, o.precision, o.truncate_dim)
        self._model = model
        return model

    def _model_record(self, model: LoadedModel) -> dict:
        ckpt = model.checkpoint
        record = {"kind": model.kind, "name": ckpt.name or self.opts.model, "revision": ckpt.revision,
                  "fingerprint": ckpt.fingerprint}
        if model.kind == CLASSIFIER:
            head = model.engine.head
            record.update(num_labels=head.spec.num_labels, pooling=head.pooling)
        elif model.kind == MULTIVECTOR:
            record.update(colbert=self.vectors.settings())
        else:
            record.update(embedding_dim=model.config.hidden_size, pooling=model.engine.pooling)
        return {**record, "max_seq_length": self._max_seq_length, "dtype": model.engine.dtype_name}

    def _settings(self, model: LoadedModel) -> dict:
        """This run's values of RUN_SETTINGS."""
        import torch

        e = model.engine
        dev = str(e.device)
        if e.device.type == "cuda":
            dev += f" ({torch.cuda.get_device_name(e.device)})"
        budget = e.budget(self.encode.max_batch_tokens)
        return {"device": dev, "ops": e.ops.name, "max_batch_tokens": budget,
                "threads": torch.get_num_threads() if e.device.type == "cpu" else None}

    # ---------------------------------------------------------------- 3. the folder, read and compared
    def _refuse(self, diffs: list[str]) -> None:
        if diffs:
            raise RefusedError(f"{self.out} holds the output of a different job; refusing to mix them.\n  "
                               + "\n  ".join(diffs)
                               + f"\nUse another output folder, or delete {self.out} to start over.")

    def _refuse_foreign(self) -> None:
        """A folder that is neither new, empty nor an output of this command is refused."""
        out = self.out
        if out.exists() and not out.is_dir():
            raise RefusedError(f"output {out} exists and is not a folder")
        if out.is_dir() and not (out / MANIFEST).is_file() and any(p.name != LOCK for p in out.iterdir()):
            raise RefusedError(f"output folder {out} is not empty and has no {MANIFEST}: it is not an "
                               "output of this command; give a new or empty folder")

    def _lock(self) -> None:
        """Hold an exclusive lock on the folder for the life of this job (released by the OS when
        the process ends, however it ends), so that two runs never write into one folder."""
        self.out.mkdir(parents=True, exist_ok=True)
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return
        f = open(self.out / LOCK, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            raise RefusedError(f"another modernbert-embed is writing into {self.out}; wait for it to "
                               "finish (or stop it) before running this command there") from None
        self._lock_file = f  # kept open: closing it would release the lock

    def _read_folder(self, model: dict, inputs: list[dict]) -> Manifest | None:
        """The folder's manifest (read under the lock), compared with this job; None when new."""
        if not (self.out / MANIFEST).is_file():
            self._refuse_foreign()
            return None
        m = Manifest.load(self.out)
        if m.version != FORMAT_VERSION:
            raise RefusedError(f"{self.out} was written by an earlier version of modernbert-embed (manifest "
                               f"format {m.version}); it can be read and verified (read_output, "
                               "modernbert-embed verify) but not resumed. Embed into a new folder.")
        kind = recorded_kind(m.data)
        if kind != self.kind:
            held = {EMBEDDER: "embeddings of an embedder", CLASSIFIER: "scores and labels of a classifier",
                    MULTIVECTOR: "token vectors of a multi-vector model"}
            is_a = {EMBEDDER: "an embedder", CLASSIFIER: "a classifier", MULTIVECTOR: "a multi-vector model"}
            self._refuse([f"model.kind: the folder holds {held.get(kind, kind)}, but {model['name']} is "
                          f"{is_a[self.kind]}"])
        recorded = {**m.data, "model": {"kind": kind, **m.data["model"]}}  # written before kind was recorded
        diffs = identity_differences(recorded, model, self.opts.identity(self.encode, self.kind), inputs)
        if self.opts.normalize is None and any(d.startswith("options.normalize:") for d in diffs):
            # e.g. a folder embedded when normalising was the command's default, whatever the model's folder said
            said = "lists a Normalize module" if self.encode.normalize_embeddings else "lists no Normalize module"
            flag = "--no-normalize" if self.encode.normalize_embeddings else "--normalize"
            diffs.append(f"(normalize follows the model's folder when not given, and it {said}; pass {flag} "
                         "to go on as the folder was written)")
        self._refuse(diffs)
        return m

    def _intact_shards(self, m: Manifest, shards: Shards, total: int) -> dict[int, dict]:
        """The recorded shards whose files are intact and whose input rows are the ones they were
        embedded from (RefusedError when the inputs changed). A missing or damaged shard is left
        out, to be embedded again."""
        done = {}
        for k, s in sorted(m.shards.items()):
            bad = [f["name"] for f in s["files"].values() if not files.file_matches(self.out, f)]
            if bad:
                self.log(f"warning: {self.out / bad[0]} is missing or damaged; shard {k} will be embedded again")
                continue
            start, end = shards.bounds(k, total)
            if s["rows"] != [start, end]:
                raise RefusedError(f"shard {k} of {self.out} holds rows {s['rows'][0]}..{s['rows'][1] - 1}, "
                                   f"which does not fit the {total} rows the inputs have now: the inputs "
                                   f"changed. Use another output folder, or delete {self.out} to start over.")
            done[k] = s
        return done

    def _warn_settings(self, m: Manifest, done: dict[int, dict], settings: dict) -> None:
        """Say which recorded shards were embedded with other run settings than this run's."""
        runs = {r["number"]: r for r in m.data["runs"]}
        changed: dict[tuple[str, str], list[int]] = {}
        for k, s in done.items():
            old = runs.get(s.get("run"), {})
            for key in RUN_SETTINGS:
                if old.get(key) != settings[key]:
                    changed.setdefault((key, str(old.get(key))), []).append(k)
        for (key, old), ks in sorted(changed.items()):
            self.log(f"warning: shards {_spans(ks)} were embedded with {key} {old}; this run uses {key} "
                     f"{settings[key]}. Batches form differently, so the shards this run writes may differ "
                     "in the last bits of their floats from an uninterrupted run (the manifest records "
                     "which run wrote each shard).")

    # ---------------------------------------------------------------- the run
    def _run(self) -> RunResult:
        o = self.opts
        total, counts, empty = self._count_rows()
        t_load = time.perf_counter()
        loaded = self._load_model()
        self._max_seq_length = loaded.max_seq_length  # read once: a shared model may change it
        model = self._model_record(loaded)
        load_seconds = time.perf_counter() - t_load
        inputs = [{**s.info(), "rows": c} for s, c in zip(self.sources, counts)]
        dim = self.encode.dim(loaded.config.hidden_size) if self.vectors is None else self.vectors.dim
        shards = Shards(self.sources, self.out, model=loaded, shard_size=o.shard_size, on_error=o.on_error,
                        prompt=self.encode.prompt or "", long=o.long, overlap=o.overlap,
                        max_seq_length=self._max_seq_length, dim=dim, normalize=self.encode.normalize_embeddings,
                        max_batch_tokens=self.encode.max_batch_tokens, precision=o.precision,
                        meta_format=o.meta_format, scoring=self.scoring, vectors=self.vectors)
        settings = self._settings(loaded)
        result = RunResult(device=f"{settings['device']}, {model['dtype']}", load_seconds=load_seconds,
                           total_rows=total, verb="embedded" if self.scoring is None else "scored")

        self._refuse_foreign()
        self._lock()
        m = self._read_folder(model, inputs)
        done = self._intact_shards(m, shards, total) if m is not None else {}
        rows = shards.check_recorded(done, total)
        ranges = None
        if o.precision in Q.SCALAR_PRECISIONS:
            ranges = calibration.known_ranges(o.calibration, m.data.get("calibration") if m else None, dim, self.out)
        n_shards = -(-total // o.shard_size)
        todo = [k for k in range(n_shards) if k not in done]
        if m is not None and not todo and m.data.get("complete"):
            result.already_complete = True
            result.total_documents = m.data["totals"]["documents"]
            return result

        # ---- 4. from here on, the folder is written
        if m is not None:
            self._warn_settings(m, done, settings)
        m = self._start_writing(m, model, inputs, empty, dim, done, settings)
        files.remove_temporaries(self.out)
        t0 = time.perf_counter()
        ranges = self._calibrate(m, shards, total, ranges)
        result.calibration_seconds = time.perf_counter() - t0
        # the folder's own convention: a resume adds codes made as the recorded ones were
        convention = scalar_convention(m.data["calibration"]) if ranges is not None else Q.CONVENTION

        if todo and todo[0] * o.shard_size < rows.position:
            rows = Rows(self.sources)  # a shard to redo lies before the last one checked: read again
        already = sum(s["rows"][1] - s["rows"][0] for s in done.values())
        bar = progress_bar(total, already, o.progress and not o.quiet,
                           "embedding" if self.scoring is None else "scoring")
        t0 = time.perf_counter()
        try:
            shards.run(m, todo, total, rows, ranges, self._run_number, result, bar, self.on_shard, convention)
        finally:
            result.seconds = time.perf_counter() - t0
            if bar is not None:
                bar.close()
            m.close()
        self._finish(m, total, n_shards, result)
        return result

    def _start_writing(self, m: Manifest | None, model: dict, inputs: list[dict], empty: list[str], dim: int,
                       done: dict[int, dict], settings: dict) -> Manifest:
        """The first write of a run: a new manifest, or the existing one marked incomplete, damaged
        shards forgotten, inputs updated; with this run's record. Compacts the journal."""
        o = self.opts
        if m is None:
            m = Manifest.new(self.out, {
                "complete": False, "model": model, "options": o.identity(self.encode, self.kind), "inputs": inputs,
                "calibration": None, "totals": None, "shards": [], "runs": []})
        else:
            m.drop_shards([k for k in m.shards if k not in done])
            m.data["model"].update({k: model[k] for k in ("name", "revision")})
            m.data.update(complete=False, totals=None, inputs=inputs)
        if empty:
            m.data["empty_inputs"] = empty
        if self.scoring is not None:
            m.data["scores"] = self.scoring.record()
        elif self.vectors is not None:
            m.data["vectors"] = self.vectors.record()
        else:
            m.data["embeddings"] = {"precision": o.precision, "dtype": str(Q.output_dtype(o.precision)),
                                    "width": Q.output_width(o.precision, dim), "dim": dim,
                                    "packed_bits": o.precision in Q.BINARY_PRECISIONS,
                                    "normalized": self.encode.normalize_embeddings}
        self._run_number = len(m.data["runs"]) + 1
        m.data["runs"].append({"number": self._run_number, "started": now(), "on_error": o.on_error, **settings})
        m.save()
        return m

    def _calibrate(self, m: Manifest, shards: Shards, total: int, ranges) -> np.ndarray | None:
        """int8/uint8: the ranges every shard is quantised with, recorded before the first shard."""
        o = self.opts
        if o.precision not in Q.SCALAR_PRECISIONS or m.data.get("calibration") is not None:
            return ranges
        if ranges is not None:
            source = {"source": "file", "file": str(Path(o.calibration).resolve())}
        else:
            ranges, source = calibration.sample_ranges(shards, self.sources, total, o.calibration_size,
                                                       None if o.quiet else self.log)
        calibration.record(m, o.precision, ranges, source)
        return ranges

    def _finish(self, m: Manifest, total: int, n_shards: int, result: RunResult) -> None:
        """Check the counts, record the totals and this run's numbers, compact: complete."""
        shards = m.shards
        if sorted(shards) != list(range(n_shards)):
            raise CorpusError(f"internal error: shards {sorted(shards)} recorded, {n_shards} expected")
        documents = sum(s["documents"] for s in shards.values())
        skipped = sum(len(s["skipped"]) for s in shards.values())
        if documents + skipped != total:
            raise CorpusError(f"internal error: {documents} documents + {skipped} skipped != {total} rows")
        m.data["totals"] = {
            "rows": total, "documents": documents, "skipped": skipped, "shards": n_shards,
            "tokens": sum(s["tokens"] for s in shards.values()),
            "truncated": sum(s["truncated"] for s in shards.values()),
        }
        if self.vectors is not None:
            m.data["totals"]["vectors"] = sum(s["vectors"] for s in shards.values())
        m.data["complete"] = True
        m.data["runs"][self._run_number - 1].update({
            "seconds": round(result.seconds, 3), "documents": result.documents, "skipped": result.skipped,
            "tokens": result.tokens, "shards_written": result.shards_written,
            "documents_per_s": round(result.docs_per_s, 2), "tokens_per_s": round(result.tokens_per_s, 1),
            "load_seconds": round(result.load_seconds, 3),
            "calibration_seconds": round(result.calibration_seconds, 3),
        })
        m.save()
        result.total_documents = documents


def _describe(model: LoadedModel) -> str:
    """What a model is, for a message: "a classifier (ModernBertForSequenceClassification, 3 labels)"."""
    arch = model.checkpoint.architecture if model.checkpoint is not None else None
    if model.kind == MULTIVECTOR:
        return f"a multi-vector model ({arch or 'ColBERT'}, one vector per token)"
    if model.kind == CLASSIFIER:
        n = model.engine.head.spec.num_labels
        return f"a classifier ({arch or 'ModernBertForSequenceClassification'}, {n} label{'s' if n > 1 else ''})"
    return f"an embedder ({arch or 'ModernBertModel'})"


def _same_device(asked: str, device) -> bool:
    import torch

    want = torch.device(asked)
    return want.type == device.type and (want.index is None or want.index == device.index)


def _spans(ks: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    ks = sorted(ks)
    out, start = [], ks[0]
    for a, b in zip(ks, ks[1:] + [None]):
        if b != a + 1:
            out.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ", ".join(out)


__all__ = ["CorpusJob", "RunResult", "RUN_SETTINGS"]
