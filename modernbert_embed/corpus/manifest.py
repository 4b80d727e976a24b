"""manifest.json and its shard journal: what a folder was asked to hold, and what it holds so far.

manifest.json holds the job's identity (model, options, inputs), its calibration, its runs and,
once compacted, every shard. While a run writes, each finished shard is appended to
`journal.jsonl` as one JSON line, flushed and fsync'd: recording a shard costs the same whether it
is the first or the ten-thousandth (the manifest is not rewritten per shard). The manifest is
rewritten (compacted: journal entries folded in, journal removed) only at the start of a run that
writes and at its end, so a run's cost for the manifest is one rewrite plus one line per shard.

Reading: the shards are those of manifest.json, overridden by index by the journal's lines. A torn
last line (a crash in the middle of an append) is ignored: its shard was not recorded, so it is
embedded again. A damaged line before the last one means the journal was changed by something
else, and the folder is refused.

Format versions: 2 (this one: the journal, run numbers, `id_required` in the options). Folders of
version 1 (every shard in manifest.json, no journal) are read and verified, not resumed.

int8/uint8 codes: the manifest's `calibration` records the `convention` they were made with
(`quantize.CONVENTION`). A folder written before that was recorded has none: its codes are read,
and a resume adds to them, under `quantize.LEGACY_CONVENTION` (see `scalar_convention`).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path

from .. import quantize as Q
from .errors import CorpusError, RefusedError
from .files import atomic_write, fsync_dir

MANIFEST = "manifest.json"
JOURNAL = "journal.jsonl"
LOCK = ".lock"
CALIBRATION = "calibration.json"
FORMAT_NAME = "modernbert-embed corpus"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """'key: old in the folder, new now' for every leaf that differs, nested keys dotted."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, prefix + k + ".")
        elif a != b:
            out.append(f"{prefix}{k}: {json.dumps(a)} in the folder, {json.dumps(b)} now")
    return out


def scalar_convention(calibration: dict) -> str:
    """How the int8/uint8 codes of a folder were made from its ranges (`calibration`, the manifest's
    record): the recorded convention, or for a folder written before it was recorded, the one of
    then (`quantize.LEGACY_CONVENTION`)."""
    convention = calibration.get("convention", Q.LEGACY_CONVENTION)
    if convention not in Q.CONVENTIONS:
        raise CorpusError(f"int8/uint8 convention {convention!r} in the {MANIFEST} is unknown to this version "
                          f"of modernbert-embed (it knows {', '.join(Q.CONVENTIONS)}); read the folder with the "
                          "version that wrote it")
    return convention


def recorded_kind(data: dict) -> str:
    """The kind of model a manifest's folder was written by: "embedder" or "classifier" (a folder
    written before the kind was recorded holds embeddings)."""
    return (data.get("model") or {}).get("kind", "embedder")


# The model's name and revision as given are notes: its fingerprint is what must match (a local
# copy of the same weights, or the same folder by another path, is the same model).
MODEL_NOTES = ("name", "revision")


def identity_differences(recorded: dict, model: dict, options: dict, inputs: list[dict]) -> list[str]:
    """How a job (model record, identity options, inputs with their row counts) differs from the one
    a manifest records."""
    diffs = differences({"options": recorded["options"]}, {"options": options})
    old_inputs = [(i["path"], i["format"]) for i in recorded["inputs"]]
    new_inputs = [(i["path"], i["format"]) for i in inputs]
    if old_inputs != new_inputs:
        diffs.append(f"inputs: {[p for p, _ in old_inputs]} in the folder, {[p for p, _ in new_inputs]} now")
    else:
        diffs += [f"inputs: {i['path']} has {i['rows']} rows, {old['rows']} in the folder: the inputs changed"
                  for old, i in zip(recorded["inputs"], inputs) if old["rows"] != i["rows"]]
    if model is not None:
        diffs += differences({"model": {k: v for k, v in recorded["model"].items() if k not in MODEL_NOTES}},
                             {"model": {k: v for k, v in model.items() if k not in MODEL_NOTES}})
    return diffs


def _read_journal(path: Path) -> list[dict]:
    """The shard entries of a journal; a torn last line is left out."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as e:
        raise RefusedError(f"{path} cannot be read ({e})") from None
    lines = data.split(b"\n")  # after the last newline: b"", or the fragment of a torn append
    entries = []
    for i, line in enumerate(lines):
        if not line:
            continue
        try:
            entry = json.loads(line)
            if not isinstance(entry, dict) or not isinstance(entry.get("index"), int):
                raise ValueError("not a shard entry")
        except ValueError:
            if i == len(lines) - 1:
                break  # torn by a crash in the middle of an append: that shard was not recorded
            raise CorpusError(f"{path}: line {i + 1} is damaged; this folder was changed by something "
                              "other than modernbert-embed") from None
        entries.append(entry)
    return entries


class Manifest:
    """An output folder's manifest.json plus its journal. `data` is the manifest's JSON object;
    `shards` the recorded shards by index (manifest and journal together); `runs` its runs."""

    def __init__(self, folder: Path, data: dict):
        self.folder, self.data = Path(folder), data
        self._shards: dict[int, dict] = {s["index"]: s for s in data.get("shards") or []}
        self._journal = None  # the journal, open for appending, from the first add_shard

    @property
    def path(self) -> Path:
        return self.folder / MANIFEST

    @property
    def journal_path(self) -> Path:
        return self.folder / JOURNAL

    @property
    def version(self) -> int:
        return self.data["version"]

    @classmethod
    def new(cls, folder: Path, data: dict) -> "Manifest":
        return cls(folder, {"format": FORMAT_NAME, "version": FORMAT_VERSION, "created": now(), **data})

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "Manifest":
        """The manifest of `folder` with its journal folded in; RefusedError if it is not one."""
        folder = Path(folder)
        path = folder / MANIFEST
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RefusedError(f"{path} cannot be read ({e}); not an output folder of this command") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise RefusedError(f"{path} is not a manifest of modernbert-embed")
        if data.get("version") not in READABLE_VERSIONS:
            raise RefusedError(f"{path} has format version {data.get('version')}; this program reads versions "
                               f"{', '.join(map(str, READABLE_VERSIONS))}")
        m = cls(folder, data)
        if m.version >= 2:
            for entry in _read_journal(m.journal_path):
                m._shards[entry["index"]] = entry
        return m

    # ---------------------------------------------------------------- reading
    @property
    def shards(self) -> dict[int, dict]:
        return self._shards

    def shard_list(self) -> list[dict]:
        return [self._shards[k] for k in sorted(self._shards)]

    def view(self) -> dict:
        """The manifest as one JSON object, the journal's shards folded in."""
        return {**self.data, "shards": self.shard_list()}

    # ---------------------------------------------------------------- writing
    def save(self) -> None:
        """Rewrite manifest.json with every shard recorded so far and remove the journal (compaction).
        A crash between the two leaves journal lines the manifest already holds: harmless."""
        self.close()
        self.data["shards"] = self.shard_list()
        atomic_write(self.path, (json.dumps(self.data, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))
        try:
            self.journal_path.unlink()
        except FileNotFoundError:
            pass
        else:
            fsync_dir(self.folder)

    def add_shard(self, entry: dict) -> None:
        """Record a finished shard: one line appended to the journal, on disk when this returns."""
        if self._journal is None:
            new = not self.journal_path.exists()
            self._journal = open(self.journal_path, "ab")
            if new:
                fsync_dir(self.folder)
        line = (json.dumps(entry, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
        self._journal.write(line)
        self._journal.flush()
        os.fsync(self._journal.fileno())
        self._shards[entry["index"]] = entry

    def drop_shards(self, indices) -> None:
        """Forget shards (their files are damaged); written out by the next `save`."""
        for k in indices:
            self._shards.pop(k, None)

    def close(self) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None


__all__ = ["Manifest", "differences", "identity_differences", "scalar_convention", "recorded_kind", "now",
           "MANIFEST", "JOURNAL", "LOCK", "CALIBRATION", "FORMAT_NAME", "FORMAT_VERSION", "READABLE_VERSIONS", "MODEL_NOTES"]
