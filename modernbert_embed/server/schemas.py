"""Request bodies in, engine inputs out; engine rows in, response bodies out.

Both embedding contracts are parsed here into one `EmbedRequest`, checked before any work: the
inputs (a string, strings, token ids, lists of token ids), the options (through `EncodeOptions`,
whose messages are re-spelled with the route's field names), and the server's limits. Token-id
inputs are this model's ids WITHOUT [CLS]/[SEP]: the server adds them, as it does for text, so
that the two kinds of input of the same text give the same embedding.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..options import EncodeOptions, OptionError
from ..tokenizer import PROMPTS, TextTokenizer
from .errors import ApiError, quote

MISSING = object()

# OpenAI-route `input_type` values -> the trained prompt they pick (Cohere's and our own names).
INPUT_TYPES = {"query": "search_query", "document": "search_document",
               **{name: name for name in PROMPTS}}
ENCODING_FORMATS = ("float", "base64")


@dataclass(frozen=True)
class Limits:
    """What the server accepts; also what `/info` reports."""

    hidden_size: int
    vocab_size: int
    cls_id: int
    sep_id: int
    special_ids: tuple[int, ...]
    max_client_batch_size: int
    max_input_tokens: int
    auto_truncate: bool


@dataclass
class EmbedRequest:
    """One embedding request, checked: `inputs` holds texts (str) and token-id lists (without
    [CLS]/[SEP]) in the client's order."""

    inputs: list
    prompt: str
    dim: int
    normalize: bool
    truncate: bool
    encoding_format: str = "float"


def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"


def parse_json(body: bytes) -> dict:
    """The request body as a JSON object, or a 400 saying why not."""
    try:
        value = json.loads(body)
    except UnicodeDecodeError:
        raise ApiError("malformed", "the request body is not valid UTF-8") from None
    except ValueError as e:
        raise ApiError("malformed", f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise ApiError("malformed", "the request body is nested too deeply") from None
    if not isinstance(value, dict):
        raise ApiError("validation", f"the request body must be a JSON object, got {_json_type(value)}")
    return value


def _is_int(value) -> bool:
    return type(value) is int  # JSON true/false are bools, never token ids


def check_token_ids(seq: list, where: str, limits: Limits) -> list[int]:
    """One list of token ids (without [CLS]/[SEP]), or a validation error naming the bad one."""
    if not seq:
        raise ApiError("empty", f"`{where}` is an empty list of token ids", where.split("[")[0])
    param = where.split("[")[0]
    if not all(type(t) is int for t in seq):
        j = next(j for j, t in enumerate(seq) if type(t) is not int)
        raise ApiError("validation", f"`{where}[{j}]` is {_json_type(seq[j])}, not a token id (an integer)", param)
    V = limits.vocab_size
    try:
        arr = np.array(seq, dtype=np.int64)
        bad = np.flatnonzero((arr < 0) | (arr >= V))
        first = int(bad[0]) if bad.size else None
    except OverflowError:
        first = next(j for j, t in enumerate(seq) if not 0 <= t < V)
    if first is not None:
        raise ApiError("validation", f"token id {seq[first]} at `{where}[{first}]` is outside the vocabulary "
                                     f"0..{V - 1}", param)
    special = np.flatnonzero(np.isin(arr, limits.special_ids))
    if special.size:
        j = int(special[0])
        raise ApiError("validation", f"`{where}[{j}]` is the special token id {seq[j]}: send ids without "
                                     "[CLS]/[SEP]/[PAD]; the server adds [CLS] and [SEP]", param)
    return seq


def parse_inputs(value, field: str, limits: Limits, allow_ids: bool = True) -> list:
    """A string, a list of strings, a list of token ids (one input) or a list of those: the inputs
    as a list of non-empty strings and checked token-id lists."""
    if value is MISSING or value is None:
        raise ApiError("validation", f"`{field}` is required", field)
    if isinstance(value, str):
        items = [value]
    elif isinstance(value, list):
        if not value:
            raise ApiError("empty", f"`{field}` cannot be empty", field)
        items = [value] if allow_ids and _is_int(value[0]) else value
    else:
        kinds = "a string, a list of strings, a list of token ids or a list of lists of token ids" \
            if allow_ids else "a string or a list of strings"
        raise ApiError("validation", f"`{field}` must be {kinds}, got {_json_type(value)}", field)
    if len(items) > limits.max_client_batch_size:
        raise ApiError("too_many_inputs", f"batch size {len(items)} > maximum allowed batch size "
                                          f"{limits.max_client_batch_size}", field)
    single = len(items) == 1 and items[0] is value
    out = []
    for i, item in enumerate(items):
        where = field if single else f"{field}[{i}]"
        if isinstance(item, str):
            if not item:
                raise ApiError("empty", f"`{where}` is an empty string", field)
            out.append(item)
        elif allow_ids and isinstance(item, list):
            out.append(check_token_ids(item, where, limits))
        else:
            what = "a string or a list of token ids" if allow_ids else "a string"
            raise ApiError("validation", f"`{where}` is {_json_type(item)}, not {what}", field)
    return out


def _optional(body: dict, field: str, kind: type, what: str):
    value = body.get(field)
    if value is not None and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
        raise ApiError("validation", f"`{field}` must be {what}, got {_json_type(value)}", field)
    return value


def _options(prompt_name, dimensions, normalize, limits: Limits, names: dict) -> EncodeOptions:
    """The options checked once by the engine's own rules, messages in the route's spelling."""
    if isinstance(prompt_name, str) and prompt_name not in PROMPTS:  # said here: the value quoted, cut
        raise ApiError("validation", f"unknown `prompt_name` {quote(prompt_name)}; known: {sorted(PROMPTS)}",
                       "prompt_name")
    try:
        return EncodeOptions(prompt_name=prompt_name, truncate_dim=dimensions,
                             normalize_embeddings=normalize).for_model(limits.hidden_size)
    except OptionError as e:
        raise ApiError("validation", e.render(names), names.get(e.option, e.option).strip("`")) from None


def _request(inputs, opts: EncodeOptions, truncate, limits: Limits, prompt_field: str, **extra) -> EmbedRequest:
    if opts.prompt and any(not isinstance(x, str) for x in inputs):
        raise ApiError("validation", f"`{prompt_field}` applies to text inputs; token-id inputs are embedded "
                                     "as given", prompt_field)
    return EmbedRequest(inputs=inputs, prompt=opts.prompt, dim=opts.dim(limits.hidden_size),
                        normalize=opts.normalize_embeddings,
                        truncate=limits.auto_truncate if truncate is None else truncate, **extra)


def parse_openai(body: dict, limits: Limits) -> EmbedRequest:
    """`POST /v1/embeddings`: input, model, encoding_format, dimensions, user, and our extras
    input_type (query | document | a prompt name), prompt_name and truncate."""
    inputs = parse_inputs(body.get("input", MISSING), "input", limits)
    _optional(body, "model", str, "a string")
    _optional(body, "user", str, "a string")
    fmt = _optional(body, "encoding_format", str, "a string")
    fmt = "float" if fmt is None else fmt  # "" is refused below, not taken for the default
    if fmt not in ENCODING_FORMATS:
        raise ApiError("validation", f"unknown `encoding_format` {quote(fmt)}; choose one of {list(ENCODING_FORMATS)}",
                       "encoding_format")
    input_type = _optional(body, "input_type", str, "a string")
    prompt_name = _optional(body, "prompt_name", str, "a string")
    if input_type is not None:
        if input_type not in INPUT_TYPES:
            raise ApiError("validation", f"unknown `input_type` {quote(input_type)}; choose one of "
                                         f"{sorted(INPUT_TYPES)}",
                           "input_type")
        if prompt_name is not None and prompt_name != INPUT_TYPES[input_type]:
            raise ApiError("validation", "give either `input_type` or `prompt_name`, not both", "input_type")
        prompt_name = INPUT_TYPES[input_type]
    dimensions = body.get("dimensions")
    truncate = _optional(body, "truncate", bool, "true or false")
    opts = _options(prompt_name, dimensions, True, limits,
                    {"truncate_dim": "`dimensions`", "prompt_name": "`prompt_name`"})
    return _request(inputs, opts, truncate, limits, "input_type" if input_type else "prompt_name",
                    encoding_format=fmt)


def parse_tei(body: dict, limits: Limits) -> EmbedRequest:
    """`POST /embed`: inputs, normalize, truncate, truncation_direction, prompt_name, dimensions."""
    inputs = parse_inputs(body.get("inputs", MISSING), "inputs", limits)
    normalize = body.get("normalize", True)
    truncate = _optional(body, "truncate", bool, "true or false")
    direction = _optional(body, "truncation_direction", str, "a string")
    if direction is not None and direction.lower() != "right":
        raise ApiError("validation", f"`truncation_direction` {quote(direction)} is not supported; this server "
                                     "keeps the start of a text (right)", "truncation_direction")
    prompt_name = _optional(body, "prompt_name", str, "a string")
    opts = _options(prompt_name, body.get("dimensions"), normalize, limits,
                    {"truncate_dim": "`dimensions`", "prompt_name": "`prompt_name`",
                     "normalize_embeddings": "`normalize`"})
    return _request(inputs, opts, truncate, limits, "prompt_name")


def parse_tokenize(body: dict, limits: Limits) -> tuple[list[str], bool, str]:
    """`POST /tokenize`: (texts, add_special_tokens, prompt)."""
    texts = parse_inputs(body.get("inputs", MISSING), "inputs", limits, allow_ids=False)
    add_special = body.get("add_special_tokens", True)
    if not isinstance(add_special, bool):
        raise ApiError("validation", f"`add_special_tokens` must be true or false, got {_json_type(add_special)}",
                       "add_special_tokens")
    prompt_name = _optional(body, "prompt_name", str, "a string")
    opts = _options(prompt_name, None, True, limits, {"prompt_name": "`prompt_name`"})
    return texts, add_special, opts.prompt


# ----------------------------------------------------------------------------- inputs -> token ids
def check_encodable(texts: Sequence[str], field: str, indices: Sequence[int] | None = None) -> None:
    """Name the first text the tokenizer cannot take (JSON may carry lone surrogates, which are
    not Unicode text); `indices` are the texts' places in the request."""
    for k, t in enumerate(texts):
        try:
            t.encode("utf-8")
        except UnicodeEncodeError as e:
            i = indices[k] if indices is not None else k
            raise ApiError("tokenizer", f"`{field}[{i}]` is not valid Unicode text ({e.reason} at character "
                                        f"{e.start})", field) from None


# An over-long text's tokens are counted for its error message only up to this many characters per
# token of the limit (a count would otherwise tokenise a megabyte string whole).
COUNT_CHARS_PER_TOKEN = 64


def _count_tokens(tokenizer: TextTokenizer, text: str, prompt: str, limit: int) -> int | None:
    """The tokens of `prompt + text`, [CLS] and [SEP] included; None when too long to count."""
    if len(prompt) + len(text) > COUNT_CHARS_PER_TOKEN * limit:
        return None
    return len(tokenizer.encode([text], prompt, None)[0][0])


def to_token_ids(req: EmbedRequest, tokenizer: TextTokenizer | None, limits: Limits, field: str
                 ) -> tuple[list[list[int]], list[int]]:
    """Token ids ([CLS] ... [SEP]) of every input, in order, and the indices of those truncated to
    `max_input_tokens`. With truncation off, an over-long input is a validation error naming it.
    Runs beside the model (the tokenizer releases the GIL)."""
    limit = limits.max_input_tokens
    ids: list = [None] * len(req.inputs)
    text_at = [i for i, x in enumerate(req.inputs) if isinstance(x, str)]
    truncated: list[int] = []
    if text_at:
        if tokenizer is None:
            raise ApiError("validation", "this model has no tokenizer: send token ids", field)
        texts = [req.inputs[i] for i in text_at]
        try:
            encoded, cut = tokenizer.encode(texts, req.prompt, limit)
        except Exception:  # tokenizers raises plain Exceptions: name the text it could not take
            check_encodable(texts, field, text_at)
            raise
        for i, seq, was_cut in zip(text_at, encoded, cut):
            ids[i] = seq
            if was_cut:
                truncated.append(i)
    for i, x in enumerate(req.inputs):
        if not isinstance(x, str):
            seq = [limits.cls_id, *x, limits.sep_id]
            if len(seq) > limit:
                seq = seq[:limit - 1] + [limits.sep_id]
                truncated.append(i)
            ids[i] = seq
    truncated.sort()
    if truncated and not req.truncate:
        i = truncated[0]
        x = req.inputs[i]
        n = len(x) + 2 if not isinstance(x, str) else _count_tokens(tokenizer, x, req.prompt, limit)
        where = field if len(req.inputs) == 1 else f"{field}[{i}]"
        has = f"has {n} tokens" if n is not None else f"has more than {limit} tokens"
        raise ApiError("input_too_long", f"`{where}` {has} ([CLS] and [SEP] included); the limit is "
                                         f"{limit}. Send shorter input or set truncate=true", field)
    return ids, truncated


# ----------------------------------------------------------------------------- rows -> bodies
def b64_float32(row: np.ndarray) -> str:
    """base64 of the little-endian float32 bytes (what the openai client decodes)."""
    return base64.b64encode(np.ascontiguousarray(row, dtype="<f4").tobytes()).decode("ascii")


def openai_body(rows: np.ndarray, fmt: str, model: str, tokens: int) -> bytes:
    if fmt == "base64":
        embeddings = [b64_float32(r) for r in rows]
    else:
        embeddings = rows.tolist()
    data = [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(embeddings)]
    return json.dumps({"object": "list", "data": data, "model": model,
                       "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}).encode()


def tei_body(rows: np.ndarray) -> bytes:
    return json.dumps(rows.tolist()).encode()


def tokenize_piece(tokenizer: TextTokenizer, text: str, prompt: str, add_special: bool, max_length: int) -> bytes:
    """TEI's `/tokenize` answer for one text, as JSON: per token {id, text, special, start, stop};
    offsets are characters of the prompted text. At most `max_length` tokens (the text is cut
    first, as for embedding): the tokens the model would see."""
    full = prompt + text
    enc = tokenizer.encode_offsets([full], max_length, add_special)[0]
    return json.dumps([{"id": i, "text": full[a:b] if b > a else tok, "special": bool(special), "start": a, "stop": b}
                       for i, tok, (a, b), special in zip(enc.ids, enc.tokens, enc.offsets,
                                                          enc.special_tokens_mask)]).encode()


__all__ = ["EmbedRequest", "Limits", "parse_json", "parse_openai", "parse_tei", "parse_tokenize",
           "to_token_ids", "openai_body", "tei_body", "tokenize_piece", "b64_float32", "INPUT_TYPES"]
