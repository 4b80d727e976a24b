"""The corpus command's options: what to embed, how, and into which folder.

The encoding options (prompt, truncate_dim, normalize, precision, long, overlap,
max_batch_tokens) are checked by the engine's own `EncodeOptions`, so that the command refuses
exactly what `Embedder.encode` refuses, with the same reasons, spelled as command-line flags. The
options only the command has (shards, input fields, error policy, calibration, metadata format)
are checked here.

Which options are part of the folder's identity (a rerun with another value is refused), and
which may change between runs, is listed in the package docstring (`modernbert_embed.corpus`).
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import quantize as Q
from ..options import EncodeOptions, OptionError
from ..weights import DEFAULT_MODEL
from .errors import RefusedError
from .files import META_FORMATS
from .sources import have_pyarrow, need_pyarrow

ON_ERROR = ("stop", "skip")

# How the command line spells the options that EncodeOptions names in the API's words.
CLI_NAMES = {
    "prompt": "--prompt", "prompt_name": "--prompt-name", "truncate_dim": "--truncate-dim",
    "normalize_embeddings": "--no-normalize", "precision": "--precision", "long": "--long",
    "overlap": "--overlap", "max_batch_tokens": "--max-batch-tokens",
}

# Options that decide what ends up in the folder: a rerun must give the same values.
IDENTITY_OPTIONS = ("input_format", "text_field", "id_field", "id_required", "prompt", "truncate_dim",
                    "normalize", "precision", "calibration_size", "long", "overlap", "shard_size",
                    "meta_format")


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
    prompt: str | None = None
    prompt_name: str | None = None
    truncate_dim: int | None = None
    normalize: bool = True
    precision: str = "float32"
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
        """Check every option (RefusedError naming the flag) and return the encoding options.
        Resolves `prompt` (from `prompt_name`) and `meta_format` (from what is installed)."""
        if not self.inputs:
            raise RefusedError("no input files given")
        try:
            encode = EncodeOptions(prompt=self.prompt, prompt_name=self.prompt_name, truncate_dim=self.truncate_dim,
                                   normalize_embeddings=self.normalize, precision=self.precision, long=self.long,
                                   overlap=self.overlap, max_batch_tokens=self.max_batch_tokens)
        except OptionError as e:
            raise RefusedError(e.render(CLI_NAMES)) from None
        self.prompt = encode.prompt
        for flag, name in (("--text-field", self.text_field), ("--id-field", self.id_field)):
            if name is not None and (not isinstance(name, str) or not name):
                raise RefusedError(f"{flag} must name a field, got {name!r}")
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

    def identity(self) -> dict:
        """The options a rerun into the same folder must repeat (after `validate`)."""
        return {k: getattr(self, k) for k in IDENTITY_OPTIONS}


__all__ = ["EmbedOptions", "CLI_NAMES", "IDENTITY_OPTIONS", "ON_ERROR"]
