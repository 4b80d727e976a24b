"""Everything the engine knows about a checkpoint folder, read in one place.

A sentence-transformers checkpoint is a folder of a transformer (config.json, the safetensors,
tokenizer.json) and a pipeline of modules named in `modules.json`: here Transformer -> Pooling
(-> Normalize). `Checkpoint` reads the config, where the tokenizer is, what the folder is (its
`kind`: an embedder, or a classifier with its head), the pooling mode (from the Pooling module's
own folder, found through `modules.json`), whether the embeddings are normalised (a Normalize
module is listed), the prompts, `max_seq_length`, and gives a fingerprint of the files that decide
the outputs.

What a folder is comes from `config.architectures`, never from a guess:
  - `ModernBertModel` (or none named): an embedder;
  - `ModernBertForMaskedLM`: an embedder over its backbone (the prediction head is not a task
    head), as sentence-transformers loads it;
  - `ModernBertForSequenceClassification`: a classifier (a cross-encoder when it scores pairs),
    whose head is read from config.json (`classifier_*`, `num_labels`, `id2label`, and
    sentence-transformers' `activation_fn`).
  - Transformer -> Dense (-> MultiVectorMask -> Normalize), no Pooling (PyLate's ColBERT folders,
    whose Dense is `pylate.models.Dense.Dense`, or sentence-transformers 6's `MultiVectorEncoder`
    saves): a late-interaction model (MULTIVECTOR), whose projection and ColBERT fields (prefixes,
    lengths, query expansion, skiplist: PyLate's config_sentence_transformers.json, or
    sentence-transformers 6's prompts, Transformer config and MultiVectorMask) are read into a
    `MultiVectorSpec`.
Without `modules.json` an embedder pools by mean and does not normalise, as sentence-transformers
does.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import os
import re
import string
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ModernBertConfig
from .checkpoint import CheckpointError
from .resolve import DEFAULT_MODEL, resolve_checkpoint

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_ST = "sentence_transformers."
_KNOWN_MODULES = ("Transformer", "Pooling", "Normalize", "Dense", "MultiVectorMask")
# A token-level projection: PyLate's Dense (a subclass of sentence-transformers' Dense), or
# sentence-transformers' own (before 6 and from 6 on), by the name modules.json gives it.
_DENSE_TYPES = ("pylate.models.Dense.Dense", "sentence_transformers.models.Dense",
                "sentence_transformers.models.Dense.Dense", "sentence_transformers.base.modules.dense.Dense")


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
    dense_type = None
    for m in modules:
        # sentence-transformers' class, by name: `sentence_transformers.models.Pooling` (before 6),
        # `sentence_transformers.base.modules.transformer.Transformer` (6 and later)
        name = str((m or {}).get("type", ""))
        kind = "Dense" if name in _DENSE_TYPES else name.rpartition(".")[2] if name.startswith(_ST) else name
        if kind not in _KNOWN_MODULES:
            raise CheckpointError(f"{path}: module {m.get('type')!r} is not supported (this engine runs "
                                  f"{', '.join(_KNOWN_MODULES)})")
        if kind == "Dense" and "Pooling" in found or kind == "Pooling" and "Dense" in found:
            dense = m.get("type") if kind == "Dense" else dense_type
            raise CheckpointError(f"{path}: module {dense!r} is not supported beside a Pooling module (this engine "
                                  "runs a Dense only as a ColBERT model's per-token projection: Transformer -> Dense)")
        if kind == "Dense":
            dense_type = m.get("type")
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
    mode = cfg.get("pooling_mode")  # sentence-transformers 6: "cls", "mean", or a list of modes
    if mode is None:  # before 6: one flag per mode; none set means mean, as sentence-transformers reads it
        modes = [k.removeprefix("pooling_mode_") for k, v in cfg.items() if k.startswith("pooling_mode_") and v]
        modes = [{"cls_token": "cls", "mean_tokens": "mean"}.get(m, m) for m in modes] or ["mean"]
    else:
        modes = [mode] if isinstance(mode, str) else list(mode)
    if modes in (["mean"], ["cls"]):
        return modes[0]
    raise CheckpointError(f"{path}: pooling {modes} is not supported (mean or cls tokens only)")


def read_max_seq_length(folder: Path, cfg: ModernBertConfig) -> int:
    """sentence_bert_config.json's `max_seq_length`, else the tokenizer's `model_max_length`
    (tokenizer_config.json), capped at `max_position_embeddings`, as sentence-transformers does."""
    for name, key in (("sentence_bert_config.json", "max_seq_length"), ("tokenizer_config.json", "model_max_length")):
        path = folder / name
        if path.is_file():
            value = _read_json(path, f"the {name}").get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 2:
                return int(min(value, cfg.max_position_embeddings))
    return cfg.max_position_embeddings


# ----------------------------------------------------------------------------- what the folder is
EMBEDDER, CLASSIFIER, MULTIVECTOR = "embedder", "classifier", "multivector"
_ARCHITECTURES = {
    "ModernBertModel": EMBEDDER,
    "ModernBertForMaskedLM": EMBEDDER,  # the backbone; the MLM head is not a task head
    "ModernBertForSequenceClassification": CLASSIFIER,
}
# transformers' ACT2FN names a classifier head may use (see heads.py)
HEAD_ACTIVATIONS = ("gelu", "gelu_python", "gelu_new", "gelu_pytorch_tanh", "relu", "silu", "swish", "tanh",
                    "sigmoid", "linear")


@dataclass(frozen=True)
class ClassifierSpec:
    """The head of a `ModernBertForSequenceClassification` folder, as transformers builds it:
    `pooling` ("cls" or "mean") over the final-norm states, then `dense` (bias iff `bias`) ->
    `activation` -> LayerNorm(`norm_eps`, bias iff `norm_bias`) -> classifier [num_labels].
    `activation_fn`: sentence-transformers' score activation named in config.json (a torch.nn
    path), or None for its default (sigmoid for one label, identity for more)."""

    num_labels: int
    pooling: str = "cls"
    activation: str = "gelu"
    bias: bool = False
    norm_bias: bool = False
    norm_eps: float = 1e-5
    id2label: dict = field(default_factory=dict)
    activation_fn: str | None = None


def read_architecture(raw: dict, path: Path) -> tuple[str | None, str]:
    """(the architecture named in config.json or None, EMBEDDER or CLASSIFIER); an architecture
    this engine does not run is refused by name."""
    names = raw.get("architectures") or []
    if not isinstance(names, list):
        raise CheckpointError(f"{path}: architectures must be a list, got {names!r}")
    if not names:
        return None, EMBEDDER
    name = str(names[0])
    if name not in _ARCHITECTURES:
        raise CheckpointError(f"{path}: architecture {name!r} is not supported (this engine runs "
                              f"{', '.join(_ARCHITECTURES)})")
    return name, _ARCHITECTURES[name]


def resolve_activation_fn(path: str):
    """An instance of the torch.nn activation named by its dotted path (sentence-transformers'
    `activation_fn`, e.g. "torch.nn.modules.activation.Sigmoid"); only torch.nn classes are taken."""
    module_name, _, cls_name = str(path).rpartition(".")
    if not module_name.startswith("torch.nn"):
        raise CheckpointError(f"activation_fn {path!r} is not a torch.nn class; only those are loaded")
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError):
        raise CheckpointError(f"activation_fn {path!r} does not exist in this torch") from None
    import torch

    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise CheckpointError(f"activation_fn {path!r} is not a torch.nn module")
    return cls()


def read_classifier(raw: dict, cfg: ModernBertConfig, path: Path, activation_fn: str | None = None) -> ClassifierSpec:
    """The classifier head from config.json, with transformers' defaults; values this engine
    cannot run exactly are refused by name. `activation_fn`: the one config_sentence_transformers.json
    names (sentence-transformers 6 saves it there), which wins over config.json's."""
    pooling = raw.get("classifier_pooling", "cls")
    if pooling not in ("cls", "mean"):
        raise CheckpointError(f"{path}: classifier_pooling {pooling!r} is not supported (cls or mean)")
    act = raw.get("classifier_activation", "gelu")
    if act not in HEAD_ACTIVATIONS:
        raise CheckpointError(f"{path}: classifier_activation {act!r} is not supported ({', '.join(HEAD_ACTIVATIONS)})")
    id2label = raw.get("id2label") or {}
    try:
        id2label = {int(k): str(v) for k, v in id2label.items()}
    except (AttributeError, TypeError, ValueError):
        raise CheckpointError(f"{path}: id2label must map label ids to names, got {raw.get('id2label')!r}") from None
    num_labels = raw.get("num_labels", len(id2label) or 2)  # transformers: 2 when neither is given
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
        raise CheckpointError(f"{path}: num_labels must be an int >= 1, got {num_labels!r}")
    if id2label and sorted(id2label) != list(range(num_labels)):
        raise CheckpointError(f"{path}: id2label has ids {sorted(id2label)} for num_labels={num_labels}")
    st = raw.get("sentence_transformers") or {}
    if activation_fn is None and isinstance(st, dict):
        activation_fn = st.get("activation_fn")
    if activation_fn is not None:
        resolve_activation_fn(activation_fn)  # refused now, not at the first call
    return ClassifierSpec(
        num_labels=num_labels, pooling=pooling, activation=act, bias=bool(raw.get("classifier_bias", False)),
        norm_bias=bool(raw.get("norm_bias", False)), norm_eps=cfg.norm_eps,
        id2label=id2label or {i: f"LABEL_{i}" for i in range(num_labels)}, activation_fn=activation_fn)


# PyLate's defaults for the fields its config_sentence_transformers.json may leave out
# (`pylate.models.ColBERT.__init__`, 1.6): what it runs when a folder does not say.
COLBERT_DEFAULTS = {"query_prefix": "[Q] ", "document_prefix": "[D] ", "query_length": 32, "document_length": 180,
                    "attend_to_expansion_tokens": False, "skiplist_words": list(string.punctuation),
                    "do_query_expansion": True}
_IDENTITY = ("torch.nn.modules.linear.Identity", "torch.nn.Identity")


@dataclass(frozen=True)
class MultiVectorSpec:
    """A late-interaction (ColBERT) folder as PyLate and sentence-transformers' `MultiVectorEncoder`
    run it: the backbone's final-norm states of every token -> the Dense projection (`dense`: its
    sub-folder, `in_features` -> `out_features`, bias iff `bias`, identity activation) -> per-token
    L2 normalisation. Text in: [CLS] prefix text [SEP], the prefix token (`query_prefix` /
    `document_prefix`, an added token of the tokenizer) inserted after [CLS]; queries to
    `query_length` tokens (padded with [MASK] when `do_query_expansion`, the [MASK]s attended to
    only when `attend_to_expansion_tokens`), documents to `document_length`, whose tokens in
    `skiplist_words` are dropped from the output. `truncate_dim`: the folder's default (None: all)."""

    dense: str
    in_features: int
    out_features: int
    bias: bool = False
    query_prefix: str = "[Q] "
    document_prefix: str = "[D] "
    query_length: int = 32
    document_length: int = 180
    attend_to_expansion_tokens: bool = False
    skiplist_words: tuple = tuple(string.punctuation)
    do_query_expansion: bool = True
    truncate_dim: int | None = None


def st6_colbert_fields(folder: Path, st_raw: dict, mask: str | None, max_seq_length: int) -> dict:
    """The ColBERT fields of a folder saved by sentence-transformers 6's `MultiVectorEncoder`, in
    PyLate's names: the prefixes are its `query` / `document` prompts (prepended to the text: the
    same ids as PyLate's insertion when the prompt is one added token, which `MultiVectorEncoder`
    checks), the lengths and `query_expansion` are the Transformer's (sentence_bert_config.json),
    the skiplist the MultiVectorMask module's. Settings PyLate has no equal of are refused."""
    sb_path = folder / "sentence_bert_config.json"
    sb = _read_json(sb_path, "the Transformer config") if sb_path.is_file() else {}
    exp = sb.get("query_expansion")
    if exp is not None:
        if not isinstance(exp, dict) or exp.get("strategy", "fixed") != "fixed" or exp.get("token") not in (None, "[MASK]"):
            raise CheckpointError(f"{sb_path}: query_expansion {exp!r} is not supported (strategy 'fixed' with [MASK])")
    m: dict = {}
    if mask is not None:
        m_path = folder / mask / "config.json"
        m = _read_json(m_path, "the MultiVectorMask config") if m_path.is_file() else {}
        if m.get("skiplist_tasks", ["document"]) not in (["document"], "document") or m.get("keep_only_token_ids"):
            raise CheckpointError(f"{m_path}: only a skiplist for documents is supported (skiplist_tasks "
                                  f"{m.get('skiplist_tasks')!r}, keep_only_token_ids {m.get('keep_only_token_ids')!r})")
    prompts = st_raw.get("prompts") or {}
    return {"query_prefix": prompts.get("query", ""), "document_prefix": prompts.get("document", ""),
            "query_length": exp["length"] if exp else sb.get("query_length") or max_seq_length,
            "document_length": sb.get("document_length") or max_seq_length,
            "do_query_expansion": exp is not None, "attend_to_expansion_tokens": bool(exp and exp.get("attend", False)),
            "skiplist_words": m.get("skiplist_words") or []}


def read_multivector(folder: Path, dense: str, hidden: int, st_raw: dict) -> MultiVectorSpec:
    """The multi-vector head from the Dense module's config (`folder / dense / config.json`) and
    the ColBERT fields of config_sentence_transformers.json (`st_raw`; PyLate's names, see
    `st6_colbert_fields` for sentence-transformers 6's), with PyLate's defaults; what this engine
    cannot run exactly is refused by name."""
    path = folder / dense / "config.json"
    if not path.is_file():
        raise CheckpointError(f"modules.json names a Dense module in {dense!r}, but {path} is missing")
    cfg = _read_json(path, "the Dense config")
    act = cfg.get("activation_function", _IDENTITY[0])
    if act not in _IDENTITY:
        raise CheckpointError(f"{path}: activation_function {act!r} is not supported (identity only, as PyLate's "
                              "ColBERT runs it)")
    if cfg.get("use_residual"):
        raise CheckpointError(f"{path}: use_residual=true is not supported")
    if cfg.get("module_input_name", "token_embeddings") != "token_embeddings":
        raise CheckpointError(f"{path}: a Dense over {cfg['module_input_name']!r} is not a per-token projection")
    dims = {k: cfg.get(k) for k in ("in_features", "out_features")}
    for k, v in dims.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise CheckpointError(f"{path}: {k} must be a positive int, got {v!r}")
    if dims["in_features"] != hidden:
        raise CheckpointError(f"{path}: in_features {dims['in_features']} is not the backbone's hidden size {hidden}")
    where = folder / "config_sentence_transformers.json"
    f = {k: st_raw.get(k, v) if st_raw.get(k) is not None else v for k, v in COLBERT_DEFAULTS.items()}
    for k in ("query_prefix", "document_prefix"):
        if not isinstance(f[k], str):
            raise CheckpointError(f"{where}: {k} must be a string, got {f[k]!r}")
    for k in ("query_length", "document_length"):
        if isinstance(f[k], bool) or not isinstance(f[k], int) or f[k] < 3:
            raise CheckpointError(f"{where}: {k} must be an int >= 3, got {f[k]!r}")
    for k in ("attend_to_expansion_tokens", "do_query_expansion"):
        if not isinstance(f[k], bool):
            raise CheckpointError(f"{where}: {k} must be true or false, got {f[k]!r}")
    words = f["skiplist_words"]
    if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
        raise CheckpointError(f"{where}: skiplist_words must be a list of strings")
    truncate_dim = st_raw.get("truncate_dim")
    if truncate_dim is not None and (isinstance(truncate_dim, bool) or not isinstance(truncate_dim, int)
                                     or not 1 <= truncate_dim <= dims["out_features"]):
        raise CheckpointError(f"{where}: truncate_dim must be an int in 1..{dims['out_features']}, got {truncate_dim!r}")
    return MultiVectorSpec(
        dense=dense, in_features=dims["in_features"], out_features=dims["out_features"], bias=bool(cfg.get("bias", True)),
        query_prefix=f["query_prefix"], document_prefix=f["document_prefix"], query_length=f["query_length"],
        document_length=f["document_length"],
        # PyLate: no expansion, no expansion tokens to attend to
        attend_to_expansion_tokens=f["attend_to_expansion_tokens"] and f["do_query_expansion"],
        skiplist_words=tuple(words), do_query_expansion=f["do_query_expansion"], truncate_dim=truncate_dim)


def read_st_config(folder: Path) -> dict:
    """config_sentence_transformers.json: prompts, default_prompt_name, similarity_fn_name, and a
    cross-encoder's activation_fn ({} when absent)."""
    path = folder / "config_sentence_transformers.json"
    if not path.is_file():
        return {}
    d = _read_json(path, "the sentence-transformers config")
    prompts = d.get("prompts") or {}
    if not isinstance(prompts, dict) or not all(isinstance(v, str) for v in prompts.values()):
        raise CheckpointError(f"{path}: prompts must map names to strings")
    default = d.get("default_prompt_name")
    if default is not None and default not in prompts:
        raise CheckpointError(f"{path}: default_prompt_name {default!r} is not one of the prompts {sorted(prompts)}")
    return {"prompts": dict(prompts), "default_prompt_name": default,
            "similarity_fn_name": d.get("similarity_fn_name"), "activation_fn": d.get("activation_fn"), "raw": d}


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
    `architecture`, `kind` (EMBEDDER, CLASSIFIER or MULTIVECTOR), for an embedder `pooling` and
    `normalize`, for a classifier `classifier` (a `ClassifierSpec`), for a late-interaction model
    `multivector` (a `MultiVectorSpec`), `prompts`, `default_prompt_name`,
    `similarity_fn_name`, `max_seq_length`, `revision`, and `fingerprint` (computed on first use)."""

    def __init__(self, folder: str | os.PathLike, name: str | None = None, revision: str | None = None):
        self.folder = Path(folder)
        self.name = name or os.fspath(folder)
        config_path = self.folder / "config.json"
        self.config = ModernBertConfig.from_file(config_path)
        raw = _read_json(config_path, "the model config")
        self.architecture, self.kind = read_architecture(raw, config_path)
        self.modules = read_modules(self.folder)
        st = read_st_config(self.folder)
        self.classifier = (read_classifier(raw, self.config, config_path, st.get("activation_fn"))
                           if self.kind == CLASSIFIER else None)
        if self.classifier is not None and set(self.modules) - {"Transformer"}:
            raise CheckpointError(f"{self.folder}: a {self.architecture} folder lists sentence-transformers "
                                  f"modules {sorted(set(self.modules) - {'Transformer'})}; a classifier has none")
        self.multivector: MultiVectorSpec | None = None
        if "Dense" in self.modules:  # a per-token projection: a late-interaction (ColBERT) model
            if self.kind != EMBEDDER:  # beside a Pooling: refused by read_modules
                raise CheckpointError(f"{self.folder}: modules.json lists a Dense module in a {self.architecture} "
                                      "folder; this engine runs a Dense only as a ColBERT model's per-token "
                                      "projection (Transformer -> Dense)")
            self.kind = MULTIVECTOR
            raw_st = st.get("raw", {})
            if raw_st.get("model_type") == "MultiVectorEncoder" or "MultiVectorMask" in self.modules:
                raw_st = {**raw_st, **st6_colbert_fields(self.folder, raw_st, self.modules.get("MultiVectorMask"),
                                                         read_max_seq_length(self.folder, self.config))}
            self.multivector = read_multivector(self.folder, self.modules["Dense"], self.config.hidden_size, raw_st)
        elif "MultiVectorMask" in self.modules:
            raise CheckpointError(f"{self.folder}: modules.json lists a MultiVectorMask without a Dense projection")
        self.pooling = read_pooling(self.folder, self.modules.get("Pooling"))
        self.normalize = "Normalize" in self.modules  # none listed (or no modules.json): not normalised
        self.prompts: dict[str, str] = st.get("prompts", {})
        self.default_prompt_name: str | None = st.get("default_prompt_name")
        self.similarity_fn_name: str | None = st.get("similarity_fn_name")
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
        """The files that decide the outputs: config, tokenizer, sentence-transformers files, the
        pooling config (a classifier: the sentence-transformers config and the tokenizer config)
        and the weights."""
        names = ["config.json", "tokenizer.json", "sentence_bert_config.json", "modules.json",
                 "model.safetensors.index.json"]
        if "Pooling" in self.modules:
            names.insert(4, f"{self.modules['Pooling']}/config.json")
        if self.classifier is not None:  # the score activation and the truncation length
            names += ["config_sentence_transformers.json", "tokenizer_config.json"]
        if self.multivector is not None:  # the ColBERT fields and the projection
            dense = self.multivector.dense
            names += ["config_sentence_transformers.json", f"{dense}/config.json", f"{dense}/model.safetensors"]
            if "MultiVectorMask" in self.modules:
                names.append(f"{self.modules['MultiVectorMask']}/config.json")
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
        head = (f"classifier={self.classifier}" if self.classifier else f"multivector={self.multivector}"
                if self.multivector else f"pooling={self.pooling!r}, normalize={self.normalize}")
        return f"Checkpoint({self.name!r}, folder={str(self.folder)!r}, {self.kind}, {head})"
