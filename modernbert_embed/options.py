"""What a caller may ask of an embedding, checked once, before any work, with one set of messages.

Every front end (the Python API, the corpus command, the Ray adapter, the HTTP server) builds one
`EncodeOptions` from its own spelling of the options. The options are checked when the object is
made; what depends on the model (the largest `truncate_dim`) is checked by `for_model`. A refused
value raises `OptionError`, whose message names the option in the API's spelling
(`truncate_dim`); a front end re-spells the names in its own words with `OptionError.render`
(`--truncate-dim` on the command line, `dimensions` over HTTP), so that the reasons read the same
everywhere.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from . import quantize
from .tokenizer import PROMPTS

LONG_MODES = ("truncate", "chunk")


class OptionError(ValueError):
    """An option value the engine refuses. `option` is the option's name in the Python API;
    the message template names options as `{name}`, so that `render` can spell them another way."""

    def __init__(self, option: str, template: str):
        self.option, self.template = option, template
        super().__init__(self.render())

    def render(self, names: Mapping[str, str] | None = None) -> str:
        """The message with each `{option}` spelled as `names` says (unchanged where it is silent)."""
        names = names or {}
        return re.sub(r"\{(\w+)\}", lambda m: names.get(m[1], m[1]), self.template)


class OptionTypeError(OptionError, TypeError):
    """An option of the wrong type (a TypeError as well, as Python's own calls raise)."""


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _int_option(name: str, value, minimum: int) -> int:
    if not _is_int(value):
        raise OptionTypeError(name, f"{{{name}}} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise OptionError(name, f"{{{name}}} must be >= {minimum}, got {value}")
    return int(value)


def resolve_prompt(prompt: str | None, prompt_name: str | None, prompts: Mapping[str, str] | None = None) -> str:
    """The text to prepend: `prompt` as given, or the prompt named by `prompt_name` in `prompts`
    (default: the trained prefixes, `PROMPTS`)."""
    prompts = PROMPTS if prompts is None else prompts
    if prompt is not None and prompt_name is not None and prompts.get(prompt_name) != prompt:
        raise OptionError("prompt", "give either {prompt} or {prompt_name}, not both")
    if prompt_name is not None and prompt is not None:  # already resolved (dataclasses.replace)
        return prompt
    if prompt is not None:
        if not isinstance(prompt, str):
            raise OptionTypeError("prompt", f"{{prompt}} must be a string, got {type(prompt).__name__}")
        return prompt
    if prompt_name is None:
        return ""
    if prompt_name not in prompts:
        raise OptionError("prompt_name", f"unknown {{prompt_name}} {prompt_name!r}; known: {sorted(prompts)}")
    return prompts[prompt_name]


@dataclass(frozen=True)
class EncodeOptions:
    """The options of `Embedder.encode`, checked when made. `prompt` is the resolved prefix (from
    `prompt` or `prompt_name`, looked up in `prompts`, default `PROMPTS`); `max_batch_tokens=None`
    means the default budget; `normalize_embeddings=None` means what the model's folder says,
    settled by `for_model`."""

    prompt: str | None = None
    prompt_name: str | None = None
    truncate_dim: int | None = None
    normalize_embeddings: bool | None = True
    precision: str = "float32"
    long: str = "truncate"
    overlap: int | None = None
    max_batch_tokens: int | None = None  # None: the engine's budget for its device
    batch_size: int | None = None
    ranges: object = None  # [2, d] minima and maxima for int8 / uint8
    calibration_embeddings: object = None  # float embeddings to take int8 / uint8 ranges from
    prompts: Mapping[str, str] | None = None  # the model's prompts by name (None: PROMPTS)

    def __post_init__(self):
        set_ = object.__setattr__
        set_(self, "prompt", resolve_prompt(self.prompt, self.prompt_name, self.prompts))
        if self.truncate_dim is not None:
            set_(self, "truncate_dim", _int_option("truncate_dim", self.truncate_dim, 1))
        if self.normalize_embeddings is not None:
            if not isinstance(self.normalize_embeddings, (bool, np.bool_)):
                raise OptionTypeError("normalize_embeddings", "{normalize_embeddings} must be True or False (or "
                                      f"None: the model's default), got {type(self.normalize_embeddings).__name__}")
            set_(self, "normalize_embeddings", bool(self.normalize_embeddings))
        if self.precision not in quantize.PRECISIONS:
            raise OptionError("precision", f"{{precision}} {self.precision!r} is not supported; "
                                           f"choose one of {quantize.PRECISIONS}")
        if self.long not in LONG_MODES:
            raise OptionError("long", f"{{long}} {self.long!r} is not supported; choose one of {LONG_MODES}")
        if self.overlap is not None:
            set_(self, "overlap", _int_option("overlap", self.overlap, 0))
            if self.long != "chunk":
                raise OptionError("overlap", "{overlap} applies to {long}='chunk' only")
        if self.max_batch_tokens is not None:
            set_(self, "max_batch_tokens", _int_option("max_batch_tokens", self.max_batch_tokens, 1))
        if self.batch_size is not None:
            set_(self, "batch_size", _int_option("batch_size", self.batch_size, 1))
        for name in ("ranges", "calibration_embeddings"):
            if getattr(self, name) is not None and self.precision not in quantize.SCALAR_PRECISIONS:
                raise OptionError(name, f"{{{name}}} applies to {{precision}} int8 and uint8, not "
                                        f"{self.precision!r}")
        if self.ranges is not None:
            try:
                set_(self, "ranges", quantize.check_ranges(self.ranges, self.truncate_dim))
            except ValueError as e:
                raise OptionError("ranges", f"{{ranges}}: {e}") from None

    def for_model(self, hidden_size: int, normalize: bool = True) -> "EncodeOptions":
        """These options, checked against a model of `hidden_size` features, with
        `normalize_embeddings=None` settled to `normalize` (what the model's folder says)."""
        if self.normalize_embeddings is None:
            return dataclasses.replace(self, normalize_embeddings=bool(normalize)).for_model(hidden_size)
        if self.truncate_dim is not None and self.truncate_dim > hidden_size:
            raise OptionError("truncate_dim", f"{{truncate_dim}} must be in 1..{hidden_size}, got {self.truncate_dim}")
        if self.ranges is not None and self.ranges.shape[1] != self.dim(hidden_size):
            raise OptionError("ranges", f"{{ranges}} cover {self.ranges.shape[1]} dimensions but the "
                                        f"embeddings have {self.dim(hidden_size)}")
        return self

    def dim(self, hidden_size: int) -> int:
        """Features per output vector."""
        return hidden_size if self.truncate_dim is None else self.truncate_dim


__all__ = ["EncodeOptions", "OptionError", "OptionTypeError", "LONG_MODES", "resolve_prompt"]
