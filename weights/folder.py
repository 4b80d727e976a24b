"""Everything the engine knows about a checkpoint folder, read in one place.

A sentence-transformers checkpoint is a folder of a transformer (config.json, the safetensors,
tokenizer.json) and a pipeline of modules named in `modules.json`: here Transformer -> Pooling
(-> Normalize). `Checkpoint` reads the config, where the tokenizer is, the pooling mode (from the
Pooling module's own folder, found through `modules.json`), `max_seq_length`, and gives a
fingerprint of the files that decide the embeddings.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from pathlib import Path

from ..config import ModernBertConfig
from .checkpoint import CheckpointError
from .resolve import DEFAULT_MODEL, resolve_checkpoint

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_ST = "sentence_transformers.models."
_KNOWN_MODULES = ("Transformer", "Pooling", "Normalize")


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {what} {path}: {e}") from None


def read_modules(folder: Path) -> dict[str, str]:
    """{module kind: its sub-folder} from `modules.json` ({} when absent). Kinds other than a
    Transformer at the folder's root, a Pooling and a Normalize are refused by name: an engine that
    skipped a Dense layer would return other embeddings without a word."""
    path = folder / "modules.json"
    if not path.is_file():
        return {}
    modules = _read_json(path, "the module list")
    if not isinstance(modules, list):
        raise CheckpointError(f"{path} is not a list of modules")
    found: dict[str, str] = {}
    for m in modules:
        kind = str((m or {}).get("type", "")).removeprefix(_ST)
        if kind not in _KNOWN_MODULES:
            raise CheckpointError(f"{path}: module {m.get('type')!r} is not supported (this engine runs "
                                  f"{', '.join(_KNOWN_MODULES)})")
        found[kind] = str(m.get("path", ""))
    if found.get("Transformer", "") != "":
        raise CheckpointError(f"{path}: the Transformer module lives in {found['Transformer']!r}; this "
                              "engine reads it from the folder itself")
    return found


def read_pooling(folder: Path, sub: str | None) -> str:
    """'mean' or 'cls' from the Pooling module's config.json in `folder / sub` (mean when the
    checkpoint names no Pooling module)."""
    if sub is None:
        return "mean"
    path = folder / sub / "config.json"
    if not path.is_file():
        raise CheckpointError(f"modules.json names a Pooling module in {sub!r}, but {path} is missing")
    cfg = _read_json(path, "the pooling config")
    if not cfg.get("include_prompt", True):
        raise CheckpointError(f"{path}: include_prompt=false is not supported")
    modes = [k for k, v in cfg.items() if k.startswith("pooling_mode_") and v]
    if modes == ["pooling_mode_mean_tokens"]:
        return "mean"
    if modes == ["pooling_mode_cls_token"]:
        return "cls"
    raise CheckpointError(f"{path}: pooling {modes} is not supported (mean or cls tokens only)")


def read_max_seq_length(folder: Path, cfg: ModernBertConfig) -> int:
    path = folder / "sentence_bert_config.json"
    if path.is_file():
        value = _read_json(path, "the sentence-transformers config").get("max_seq_length")
        if value:
            return min(int(value), cfg.max_position_embeddings)
    return cfg.max_position_embeddings


def snapshot_revision(folder: Path) -> str | None:
    """The commit of a Hugging Face cache snapshot folder (…/snapshots/<commit>), else None."""
    parts = Path(os.path.abspath(folder)).parts
    if len(parts) >= 2 and parts[-2] == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", parts[-1]):
        return parts[-1]
    return None


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


class Checkpoint:
    """A checkpoint folder, read: `config`, `tokenizer_path` (None without tokenizer.json),
    `pooling`, `max_seq_length`, `revision`, and `fingerprint` (computed on first use)."""

    def __init__(self, folder: str | os.PathLike, name: str | None = None, revision: str | None = None):
        self.folder = Path(folder)
        self.name = name or os.fspath(folder)
        self.config = ModernBertConfig.from_file(self.folder / "config.json")
        self.modules = read_modules(self.folder)
        self.pooling = read_pooling(self.folder, self.modules.get("Pooling"))
        self.max_seq_length = read_max_seq_length(self.folder, self.config)
        tok = self.folder / "tokenizer.json"
        self.tokenizer_path = tok if tok.is_file() else None
        self.revision = revision or snapshot_revision(self.folder)

    @classmethod
    def open(cls, name_or_path: str | os.PathLike = DEFAULT_MODEL, revision: str | None = None,
             local_files_only: bool | None = None) -> "Checkpoint":
        """A local folder, or a Hub id looked up in the HF cache (downloaded when missing, unless
        `local_files_only` or HF_HUB_OFFLINE say not to)."""
        folder = resolve_checkpoint(name_or_path, revision=revision, local_files_only=local_files_only)
        return cls(folder, name=os.fspath(name_or_path), revision=revision)

    def decisive_files(self) -> list[Path]:
        """The files that decide the embeddings: config, tokenizer, sentence-transformers files,
        the pooling config and the weights."""
        names = ["config.json", "tokenizer.json", "sentence_bert_config.json", "modules.json",
                 "model.safetensors.index.json"]
        if "Pooling" in self.modules:
            names.insert(4, f"{self.modules['Pooling']}/config.json")
        files = [self.folder / n for n in names if (self.folder / n).is_file()]
        return files + sorted(self.folder.glob("model*.safetensors"))

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 over the decisive files' sha256s. Files of the Hugging Face cache are links to
        blobs named by their sha256, which is used as is (no need to read 600 MB)."""
        per = {}
        for f in self.decisive_files():
            target = Path(os.path.realpath(f))
            per[f.relative_to(self.folder).as_posix()] = target.name if _HEX64.match(target.name) else _sha256_file(f)
        return hashlib.sha256(json.dumps(per, sort_keys=True).encode()).hexdigest()

    def __repr__(self) -> str:
        return f"Checkpoint({self.name!r}, folder={str(self.folder)!r}, pooling={self.pooling!r})"
