"""The corpus command's options: what to embed (or score), how, and into which folder.

The encoding options (prompt, truncate_dim, normalize, precision, long, overlap,
max_batch_tokens) are checked by the engine's own `EncodeOptions`, so that the command refuses
exactly what `Embedder.encode` refuses, with the same reasons, spelled as command-line flags. The
options only the command has (shards, input fields, error policy, calibration, metadata format)
are checked here.

Two steps: `validate` checks what can be checked without the model (before anything is read);
`resolve(model)` checks the options against the loaded model and settles the defaults that follow
its folder: for an embedder, the prompt (`prompt_name` looked up among the folder's prompts and the
built-in ones; neither given: the folder's `default_prompt_name`) and `normalize` (None: whether
the folder lists a Normalize module); for a classifier (cross-encoder), the score values. The
options of the other kind of model are refused by name (`--truncate-dim` for a classifier,
`--text-pair-field` for an embedder). A multi-vector (ColBERT) model takes `--multivector-mode`,
`--truncate-dim` and `--precision` float16 (its default) or float32, and refuses the pooled
embedding's options (prompts, normalize, long/overlap, calibration) and the classifier's.

Which options are part of the folder's identity (a rerun with another value is refused), and
which may change between runs, is listed in the package docstring (`modernbert_embed.corpus`).
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import quantize as Q
from ..options import EncodeOptions, OptionError
from ..weights import CLASSIFIER, DEFAULT_MODEL, EMBEDDER, MULTIVECTOR
from .errors import RefusedError
from .files import META_FORMATS
from .sources import have_pyarrow, need_pyarrow

ON_ERROR = ("stop", "skip")
MULTIVECTOR_MODES = ("document", "query")
MULTIVECTOR_DEFAULT_PRECISION = "float16"

# How the command line spells the options that EncodeOptions names in the API's words.
CLI_NAMES = {
    "prompt": "--prompt", "prompt_name": "--prompt-name", "truncate_dim": "--truncate-dim",
    "normalize_embeddings": "--normalize/--no-normalize", "precision": "--precision", "long": "--long",
    "overlap": "--overlap", "max_batch_tokens": "--max-batch-tokens",
}

# Options that decide what ends up in the folder: a rerun must give the same values. An embedder's
# (the prompt and normalize as resolved from the folder) and a classifier's.
IDENTITY_OPTIONS = ("input_format", "text_field", "id_field", "id_required", "prompt", "truncate_dim",
                    "normalize", "precision", "calibration_size", "long", "overlap", "shard_size",
                    "meta_format")
CLASSIFIER_IDENTITY_OPTIONS = ("input_format", "text_field", "text_pair_field", "id_field", "id_required",
                               "scores", "shard_size", "meta_format")
MULTIVECTOR_IDENTITY_OPTIONS = ("input_format", "text_field", "id_field", "id_required", "multivector_mode",
                                "truncate_dim", "precision", "shard_size", "meta_format")

# What a classifier writes per document (`--scores`): the folder's score activation applied to the
# logits, as CrossEncoder.predict does by default; the raw float32 logits; or the activation then a
# softmax over the labels (predict's apply_softmax=True; two labels or more).
SCORE_VALUES = ("activated", "logits", "softmax")

# The options that only mean something for an embedder, with the value that means "not given".
EMBEDDING_ONLY = (("prompt", "--prompt", None), ("prompt_name", "--prompt-name", None),
                  ("truncate_dim", "--truncate-dim", None), ("normalize", "--normalize/--no-normalize", None),
                  ("precision", "--precision", None), ("calibration", "--calibration", None),
                  ("calibration_size", "--calibration-size", 1000), ("long", "--long", "truncate"),
                  ("overlap", "--overlap", None))
CLASSIFIER_ONLY = (("text_pair_field", "--text-pair-field", None), ("scores", "--scores", None))
MULTIVECTOR_ONLY = (("multivector_mode", "--multivector-mode", None),)
# The options that mean nothing for a multi-vector (ColBERT) model: the pooled embedding's
# (its vectors are normalised per token, its prefixes are the folder's, a document is truncated to
# the folder's document_length) and the classifier's. --truncate-dim and --precision (float16,
# float32) apply to its token vectors.
NOT_MULTIVECTOR = tuple(o for o in EMBEDDING_ONLY if o[0] not in ("truncate_dim", "precision")) + CLASSIFIER_ONLY


def _whole_number(flag: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RefusedError(f"{flag} must be a whole number, got {value!r}")
    if value < minimum:
        raise RefusedError(f"{flag} must be >= {minimum}, got {value}")
    return value


@dataclass
class EmbedOptions:
    """Everything `modernbert-embed embed` is asked, in the command line's terms. `prompt` is the
    prefix as given (or None); `validate` resolves it from `prompt_name`."""

    inputs: list[str]
    output: str
    model: str = DEFAULT_MODEL
    revision: str | None = None
    input_format: str = "auto"
    text_field: str = "text"
    id_field: str | None = "id"
    id_required: bool = False
    text_pair_field: str | None = None  # a classifier: the second text of each pair
    scores: str | None = None  # a classifier: one of SCORE_VALUES (None: "activated")
    multivector_mode: str | None = None  # a multi-vector model: "document" (None) or "query"
    prompt: str | None = None
    prompt_name: str | None = None
    truncate_dim: int | None = None
    normalize: bool | None = None  # None: what the model's folder says (a Normalize module listed)
    precision: str | None = None  # None: float32 for an embedder, float16 for a multi-vector model
    calibration: str | None = None
    calibration_size: int = 1000
    long: str = "truncate"
    overlap: int | None = None
    shard_size: int = 10000
    meta_format: str | None = None  # None: parquet when pyarrow is installed, else jsonl
    on_error: str = "stop"
    max_batch_tokens: int | None = None  # None: the engine's default budget
    device: str | None = None
    dtype: str | None = None
    local_files_only: bool | None = None
    progress: bool = True
    quiet: bool = False

    def validate(self) -> EncodeOptions:
        """Check every option that does not depend on the model (RefusedError naming the flag) and
        return the encoding options as far as they are known without it (the prompt unresolved,
        normalize as given). Resolves `meta_format` (from what is installed). `resolve` finishes
        the checks once the model is loaded."""
        if not self.inputs:
            raise RefusedError("no input files given")
        if self.prompt is not None and self.prompt_name is not None:
            raise RefusedError(OptionError("prompt", "give either {prompt} or {prompt_name}, not both")
                               .render(CLI_NAMES))
        if self.prompt_name is not None and (not isinstance(self.prompt_name, str) or not self.prompt_name):
            raise RefusedError(f"--prompt-name must name a prompt, got {self.prompt_name!r}")
        try:
            encode = EncodeOptions(prompt=self.prompt, truncate_dim=self.truncate_dim,
                                   normalize_embeddings=self.normalize, precision=self.precision or "float32",
                                   long=self.long,
                                   overlap=self.overlap, max_batch_tokens=self.max_batch_tokens)
        except OptionError as e:
            raise RefusedError(e.render(CLI_NAMES)) from None
        for flag, name in (("--text-field", self.text_field), ("--id-field", self.id_field),
                           ("--text-pair-field", self.text_pair_field)):
            if name is not None and (not isinstance(name, str) or not name):
                raise RefusedError(f"{flag} must name a field, got {name!r}")
        if self.text_pair_field is not None:
            if self.text_pair_field == self.text_field:
                raise RefusedError(f"--text-pair-field and --text-field both name {self.text_field!r}; a pair "
                                   "is two fields (--text-field the first text, --text-pair-field the second)")
            if self.text_pair_field == self.id_field:
                raise RefusedError(f"--text-pair-field and --id-field both name {self.id_field!r}")
            if self.input_format == "text":
                raise RefusedError("--text-pair-field needs JSON Lines or Parquet input: a text file has one "
                                   "document a line, not pairs")
        if self.multivector_mode is not None and self.multivector_mode not in MULTIVECTOR_MODES:
            raise RefusedError(f"--multivector-mode must be one of {MULTIVECTOR_MODES}, got {self.multivector_mode!r}")
        if self.scores is not None and self.scores not in SCORE_VALUES:
            raise RefusedError(f"--scores must be one of {SCORE_VALUES}, got {self.scores!r}")
        _whole_number("--shard-size", self.shard_size, 1)
        _whole_number("--calibration-size", self.calibration_size, 1)
        if self.on_error not in ON_ERROR:
            raise RefusedError(f"--on-error must be one of {ON_ERROR}, got {self.on_error!r}")
        if self.calibration and self.precision not in Q.SCALAR_PRECISIONS:
            raise RefusedError("--calibration applies to --precision int8 or uint8 only")
        if self.meta_format is None:
            self.meta_format = "parquet" if have_pyarrow() else "jsonl"
        if self.meta_format not in META_FORMATS:
            raise RefusedError(f"--meta-format must be one of {META_FORMATS}, got {self.meta_format!r}")
        if self.meta_format == "parquet":
            need_pyarrow("--meta-format parquet")
        return encode

    def refuse_other_kind(self, kind: str, model_name: str, what: str) -> None:
        """Refuse, by name, the options that mean nothing for a model of `kind` (EMBEDDER,
        CLASSIFIER or MULTIVECTOR); `what` says what the model is, for the message."""
        others = {CLASSIFIER: EMBEDDING_ONLY + MULTIVECTOR_ONLY, MULTIVECTOR: NOT_MULTIVECTOR}.get(
            kind, CLASSIFIER_ONLY + MULTIVECTOR_ONLY)
        given = [flag for name, flag, unset in others if getattr(self, name) != unset]
        if not given:
            return
        if kind == MULTIVECTOR:
            raise RefusedError(f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply to multi-vector "
                               f"(ColBERT) models; {model_name} is {what}: it writes one normalised vector per "
                               "token, with the prefixes and lengths of its folder. Leave out " + ", ".join(given))
        verb = "applies" if len(given) == 1 else "apply"
        kinds = []
        if kind != CLASSIFIER and any(f in given for _, f, _ in CLASSIFIER_ONLY):
            kinds.append("classifiers (cross-encoders)")
        if kind != CLASSIFIER and "--multivector-mode" in given:
            kinds.append("multi-vector (ColBERT) models")
        if kind == CLASSIFIER:
            kinds = ["embedding models"] + (["multi-vector (ColBERT) models"] if "--multivector-mode" in given else [])
            writes = "scores and labels (float32), not embeddings"
        else:
            writes = "embeddings"
        raise RefusedError(f"{', '.join(given)} {verb} to {' or '.join(kinds)}; {model_name} is {what}: it "
                           f"writes {writes}. Leave out " + ", ".join(given))

    def resolve(self, model) -> EncodeOptions:
        """The encoding options for `model` (a `LoadedModel`), checked against it (RefusedError
        naming the flag): an embedder's prompt looked up among its folder's prompts (neither
        --prompt nor --prompt-name: the folder's default_prompt_name), normalize None settled to
        what the folder says, truncate_dim checked against its width; a classifier refuses the
        embedding options. Call after `validate`."""
        encode = self.validate()
        if model.kind == MULTIVECTOR:
            if self.precision is None:
                self.precision = MULTIVECTOR_DEFAULT_PRECISION
            return encode
        if model.kind == CLASSIFIER:
            return encode
        if self.precision is None:
            self.precision = "float32"
        prompt_name = self.prompt_name
        if self.prompt is None and prompt_name is None:
            prompt_name = model.default_prompt_name
        try:
            return EncodeOptions(prompt=self.prompt, prompt_name=prompt_name, prompts=model.prompts,
                                 truncate_dim=self.truncate_dim, normalize_embeddings=self.normalize,
                                 precision=self.precision, long=self.long, overlap=self.overlap,
                                 max_batch_tokens=self.max_batch_tokens
                                 ).for_model(model.config.hidden_size, model.normalize)
        except OptionError as e:
            raise RefusedError(e.render(CLI_NAMES)) from None

    def identity(self, encode: EncodeOptions | None = None, kind: str = EMBEDDER) -> dict:
        """The options a rerun into the same folder must repeat (after `validate`): for an embedder,
        with the prompt and normalize as `encode` (from `resolve`) settled them; for a classifier,
        its own (the pair field, the score values)."""
        if kind == CLASSIFIER:
            return {**{k: getattr(self, k) for k in CLASSIFIER_IDENTITY_OPTIONS}, "scores": self.score_values}
        if kind == MULTIVECTOR:
            return {**{k: getattr(self, k) for k in MULTIVECTOR_IDENTITY_OPTIONS}, "multivector_mode": self.mode}
        out = {k: getattr(self, k) for k in IDENTITY_OPTIONS}
        out["precision"] = self.precision or "float32"
        if encode is not None:
            out.update(prompt=encode.prompt, normalize=encode.normalize_embeddings)
        return out

    @property
    def mode(self) -> str:
        """What a multi-vector model encodes: `multivector_mode`, or "document" when not given."""
        return self.multivector_mode or "document"

    @property
    def score_values(self) -> str:
        """What a classifier writes per document: `scores`, or "activated" when not given."""
        return self.scores or "activated"


__all__ = ["EmbedOptions", "CLI_NAMES", "IDENTITY_OPTIONS", "CLASSIFIER_IDENTITY_OPTIONS", "ON_ERROR", "SCORE_VALUES",
           "EMBEDDING_ONLY", "CLASSIFIER_ONLY", "MULTIVECTOR_IDENTITY_OPTIONS", "MULTIVECTOR_ONLY", "NOT_MULTIVECTOR",
           "MULTIVECTOR_MODES", "MULTIVECTOR_DEFAULT_PRECISION"]
