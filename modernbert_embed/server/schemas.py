"""Request bodies in, engine inputs out; engine rows in, response bodies out.

Both embedding contracts are parsed here into one `EmbedRequest`, checked before any work: the
inputs (a string, strings, token ids, lists of token ids), the options (through `EncodeOptions`,
whose messages are re-spelled with the route's field names), and the server's limits. Token-id
inputs are this model's ids WITHOUT [CLS]/[SEP]: the server adds them, as it does for text, so
that the two kinds of input of the same text give the same embedding.

The scoring routes (`/rerank`, `/v1/rerank`, `/predict`, `/classify`) are parsed into a
`ScoreRequest` (pairs or single texts, tokenised by `score_token_ids` as `CrossEncoder` does:
each side cut before it is tokenised, a pair truncated longest first) and answered from the
model's float32 logits.

A multi-vector (ColBERT) model answers `/v1/embeddings` with per-token vectors: the request says
whether its texts are queries or documents (`input_type` "query" | "document", or PyLate's
`is_query`), they are tokenised as `MultiVectorEncoder` tokenises them (`VectorRequest`,
`vector_token_ids`), and each input's `embedding` is a list of vectors (`vectors_body`). Its
rerank requests are the cross-encoder's, tokenised as one query and documents
(`vector_rerank_token_ids`) and scored by MaxSim.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..options import EncodeOptions, OptionError
from ..tokenizer import PROMPTS, TextTokenizer
from ..multivector import maxsim
from .batcher import TokenRows
from .errors import ApiError, quote

MISSING = object()

# OpenAI-route `input_type` values -> the trained prompt they pick (Cohere's and our own names).
INPUT_TYPES = {"query": "search_query", "document": "search_document",
               **{name: name for name in PROMPTS}}
ENCODING_FORMATS = ("float", "base64")
# A multi-vector model's `encoding_format: "base64"`: one string per input.
TOKENS_B64_LAYOUT = ("float32 little-endian, row-major [n_tokens, dim]: n_tokens = bytes / (4 * dim); each item's "
                     "`shape` is [n_tokens, dim]")


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


json_type = _json_type


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


# ----------------------------------------------------------------------------- multi-vector requests
@dataclass
class VectorRequest:
    """A multi-vector model's `/v1/embeddings` request, checked: texts, all queries or all
    documents."""

    texts: list
    is_query: bool
    truncate: bool
    encoding_format: str = "float"


VECTOR_INPUT_TYPES = ("query", "document")


def parse_vectors(body: dict, served) -> VectorRequest:
    """`POST /v1/embeddings` to a multi-vector model: input (text only), model, user,
    encoding_format, truncate, and `input_type` ("query" | "document") or PyLate's `is_query`
    (true | false): one of them is required. `dimensions` and `prompt_name` do not apply (the
    vectors have the folder's width; the [Q]/[D] prefixes are the model's prompts)."""
    limits = served.limits
    inputs = parse_inputs(body.get("input", MISSING), "input", limits, allow_ids=False)
    _optional(body, "model", str, "a string")
    _optional(body, "user", str, "a string")
    fmt = _optional(body, "encoding_format", str, "a string")
    fmt = "float" if fmt is None else fmt
    if fmt not in ENCODING_FORMATS:
        raise ApiError("validation", f"unknown `encoding_format` {quote(fmt)}; choose one of {list(ENCODING_FORMATS)}",
                       "encoding_format")
    input_type = _optional(body, "input_type", str, "a string")
    is_query = _optional(body, "is_query", bool, "true or false")
    if input_type is not None and input_type not in VECTOR_INPUT_TYPES:
        raise ApiError("validation", f"unknown `input_type` {quote(input_type)} for the multi-vector model "
                                     f"{served.name!r}; choose one of {list(VECTOR_INPUT_TYPES)}", "input_type")
    if input_type is None and is_query is None:
        raise ApiError("validation", f"`input_type` is required for the multi-vector model {served.name!r}: "
                                     "\"query\" or \"document\" (or PyLate's `is_query`: true or false); queries and "
                                     "documents are encoded differently", "input_type")
    if input_type is not None and is_query is not None and (input_type == "query") != is_query:
        raise ApiError("validation", f"`input_type` {quote(input_type)} and `is_query` {str(is_query).lower()} "
                                     "disagree: give one of them", "input_type")
    for field, why in (("dimensions", "its vectors have the folder's width"),
                       ("prompt_name", "its [Q]/[D] prefixes are its prompts; use `input_type`")):
        if body.get(field) is not None:
            raise ApiError("validation", f"`{field}` does not apply to the multi-vector model {served.name!r}: {why}",
                           field)
    truncate = _optional(body, "truncate", bool, "true or false")
    return VectorRequest(texts=inputs, is_query=is_query if input_type is None else input_type == "query",
                         truncate=limits.auto_truncate if truncate is None else truncate, encoding_format=fmt)


def _vector_tokens(served, texts: list, is_query: bool, field: str, indices: list):
    """`MultiVectorEncoder.tokenize` of `texts`, naming a text the tokenizer cannot take."""
    try:
        return served.vectors.tokenize(texts, is_query=is_query)
    except Exception:  # tokenizers raises plain Exceptions: name the text it could not take
        check_encodable(texts, field, indices)
        raise


def _too_long(served, what: str, is_query: bool) -> ApiError:
    v = served.vectors
    limit, kind = (v.query_length, "query") if is_query else (v.document_length, "document")
    return ApiError("input_too_long", f"`{what}` has more than {limit} tokens, the model's {kind} length "
                                      "([CLS], its prefix and [SEP] included). Send shorter input or set "
                                      "truncate=true", what.split("[")[0])


def vector_token_ids(req: VectorRequest, served):
    """(ids, truncated indices, keep, key_lengths) of a multi-vector request's texts, as
    `MultiVectorEncoder` tokenises them: queries or documents, cut to the folder's lengths (with
    truncate=false an input that would be cut is a 4xx naming it)."""
    ids, cut, keep, keys = _vector_tokens(served, req.texts, req.is_query, "input", list(range(len(req.texts))))
    truncated = [i for i, t in enumerate(cut) if t]
    if truncated and not req.truncate:
        raise _too_long(served, "input" if len(req.texts) == 1 else f"input[{truncated[0]}]", req.is_query)
    return ids, truncated, keep, keys


def vector_rerank_token_ids(req: "ScoreRequest", served):
    """A rerank for a multi-vector model: the query tokenised as a query, then the documents as
    documents (one request: they share forwards), as `MultiVectorEncoder.rank` encodes them."""
    query = req.inputs[0][0]
    q_ids, q_cut, _, q_keys = _vector_tokens(served, [query], True, "query", [0])
    d_ids, d_cut, d_keep, _ = _vector_tokens(served, req.documents, False, req.field,
                                             list(range(len(req.documents))))
    if not req.truncate and (q_cut[0] or any(d_cut)):
        raise _too_long(served, "query" if q_cut[0] else f"{req.field}[{d_cut.index(True)}]", q_cut[0])
    ids = q_ids + d_ids
    keep = None if d_keep is None else [None] + list(d_keep)
    keys = None if q_keys is None else q_keys + [None] * len(d_ids)
    truncated = [i for i, t in enumerate([q_cut[0], *d_cut]) if t]
    return ids, truncated, keep, keys


def vectors_body(req: VectorRequest, rows: TokenRows, tokens: int, served) -> bytes:
    """OpenAI's list shape (PyLate's server answers the same), each `embedding` a list of
    per-token vectors, or with base64 one string of float32 little-endian row-major
    [n_tokens, dim] (`shape` beside it); usage counts tokens (queries' expansion included)."""
    mats = rows.split()
    data = []
    for i, m in enumerate(mats):
        item = {"object": "embedding", "index": i}
        if req.encoding_format == "base64":
            item["embedding"] = b64_float32(m)
            item["shape"] = list(m.shape)
        else:
            item["embedding"] = m.tolist()
        data.append(item)
    return json.dumps({"object": "list", "data": data, "model": served.name,
                       "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}).encode()


def maxsim_scores(rows: TokenRows) -> list[float]:
    """A multi-vector rerank's scores: MaxSim (float32) of the first input (the query) with each
    of the others (the documents)."""
    mats = [torch.from_numpy(m) for m in rows.split()]
    return maxsim(mats[:1], mats[1:])[0].tolist()


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


# ----------------------------------------------------------------------------- scoring requests
@dataclass
class ScoreRequest:
    """One rerank or classification request, checked: `inputs` holds single texts (str) and pairs
    (a tuple of two str) in the client's order; for a rerank, every input is (query, document)."""

    inputs: list
    truncate: bool
    field: str  # where the inputs were, in the route's spelling
    raw_scores: bool = False
    single: bool = False  # /predict: one input given (answered without the outer list)
    documents: list | None = None  # a rerank's documents (returned when asked)
    return_documents: bool = False
    top_n: int | None = None


def _flag(body: dict, field: str, default: bool) -> bool:
    value = _optional(body, field, bool, "true or false")
    return default if value is None else value


def _truncate(body: dict, limits: Limits) -> bool:
    truncate = _optional(body, "truncate", bool, "true or false")
    direction = _optional(body, "truncation_direction", str, "a string")
    if direction is not None and direction.lower() != "right":
        raise ApiError("validation", f"`truncation_direction` {quote(direction)} is not supported; this server "
                                     "keeps the start of a text (right)", "truncation_direction")
    return limits.auto_truncate if truncate is None else truncate


def _query(body: dict) -> str:
    query = body.get("query", MISSING)
    if query is MISSING or query is None:
        raise ApiError("validation", "`query` is required", "query")
    if not isinstance(query, str):
        raise ApiError("validation", f"`query` must be a string, got {_json_type(query)}", "query")
    if not query:
        raise ApiError("empty", "`query` is an empty string", "query")
    return query


def _documents(value, field: str, limits: Limits, objects: bool) -> list[str]:
    """A rerank's documents: a non-empty list (at most `max_client_batch_size`) of strings, or
    (`objects`) of `{"text": str}` objects."""
    if value is MISSING or value is None:
        raise ApiError("validation", f"`{field}` is required", field)
    if not isinstance(value, list):
        raise ApiError("validation", f"`{field}` must be a list of strings, got {_json_type(value)}", field)
    if not value:
        raise ApiError("empty", f"`{field}` cannot be empty", field)
    if len(value) > limits.max_client_batch_size:
        raise ApiError("too_many_inputs", f"{len(value)} {field} > the maximum of {limits.max_client_batch_size} "
                                          "per request", field)
    out = []
    for i, d in enumerate(value):
        if objects and isinstance(d, dict):
            if not isinstance(d.get("text"), str):
                raise ApiError("validation", f"`{field}[{i}]` is an object without a string `text`", field)
            d = d["text"]
        if not isinstance(d, str):
            what = "a string or an object with a string `text`" if objects else "a string"
            raise ApiError("validation", f"`{field}[{i}]` is {_json_type(d)}, not {what}", field)
        if not d:
            raise ApiError("empty", f"`{field}[{i}]` is an empty string", field)
        out.append(d)
    return out


def parse_tei_rerank(body: dict, served) -> ScoreRequest:
    """TEI's `POST /rerank`: query, texts, raw_scores, return_text, truncate, truncation_direction
    (and our `model`)."""
    limits = served.limits
    query = _query(body)
    texts = _documents(body.get("texts", MISSING), "texts", limits, objects=False)
    return ScoreRequest(inputs=[(query, t) for t in texts], truncate=_truncate(body, limits), field="texts",
                        raw_scores=_flag(body, "raw_scores", False), documents=texts,
                        return_documents=_flag(body, "return_text", False))


def parse_v1_rerank(body: dict, served) -> ScoreRequest:
    """The Cohere/Jina `POST /v1/rerank`: model, query, documents (strings or {text}), top_n,
    return_documents; Infinity's raw_scores; our truncate."""
    limits = served.limits
    query = _query(body)
    documents = _documents(body.get("documents", MISSING), "documents", limits, objects=True)
    top_n = _optional(body, "top_n", int, "a whole number")
    if top_n is not None and top_n < 1:
        raise ApiError("validation", f"`top_n` must be at least 1, got {top_n}", "top_n")
    return ScoreRequest(inputs=[(query, d) for d in documents], truncate=_truncate(body, limits), field="documents",
                        raw_scores=_flag(body, "raw_scores", False), documents=documents,
                        return_documents=_flag(body, "return_documents", False), top_n=top_n)


def _predict_item(item, where: str):
    """A text, `[text]` or `[a, b]`: a str or a pair."""
    if isinstance(item, str):
        if not item:
            raise ApiError("empty", f"`{where}` is an empty string", "inputs")
        return item
    if isinstance(item, list) and len(item) in (1, 2):
        for j, t in enumerate(item):
            if not isinstance(t, str):
                raise ApiError("validation", f"`{where}[{j}]` is {_json_type(t)}, not a string", "inputs")
            if not t:
                raise ApiError("empty", f"`{where}[{j}]` is an empty string", "inputs")
        return item[0] if len(item) == 1 else (item[0], item[1])
    raise ApiError("validation", f"`{where}` is {_json_type(item)}"
                                 f"{f' of {len(item)} items' if isinstance(item, list) else ''}, not a text, "
                                 "[text] or a pair [a, b]", "inputs")


def parse_predict(body: dict, served) -> ScoreRequest:
    """TEI's `POST /predict`: inputs (a text, a pair [a, b], or a list of texts, [text] and
    pairs), raw_scores, truncate, truncation_direction (and our `model`)."""
    limits = served.limits
    value = body.get("inputs", MISSING)
    if value is MISSING or value is None:
        raise ApiError("validation", "`inputs` is required", "inputs")
    if isinstance(value, str) or (isinstance(value, list) and len(value) == 2
                                  and all(isinstance(t, str) for t in value)):
        inputs, single = [_predict_item(value, "inputs")], True
    elif isinstance(value, list):
        if not value:
            raise ApiError("empty", "`inputs` cannot be empty", "inputs")
        if len(value) > limits.max_client_batch_size:
            raise ApiError("too_many_inputs", f"batch size {len(value)} > maximum allowed batch size "
                                              f"{limits.max_client_batch_size}", "inputs")
        inputs, single = [_predict_item(x, f"inputs[{i}]") for i, x in enumerate(value)], False
    else:
        raise ApiError("validation", f"`inputs` must be a text, a pair [a, b] or a list of them, got "
                                     f"{_json_type(value)}", "inputs")
    return ScoreRequest(inputs=inputs, truncate=_truncate(body, limits), field="inputs",
                        raw_scores=_flag(body, "raw_scores", False), single=single)


def parse_classify(body: dict, served) -> ScoreRequest:
    """vLLM's `POST /classify`: model, input (a text or a list of texts), user; our truncate."""
    inputs = parse_inputs(body.get("input", MISSING), "input", served.limits, allow_ids=False)
    _optional(body, "user", str, "a string")
    return ScoreRequest(inputs=inputs, truncate=_truncate(body, served.limits), field="input")


def score_token_ids(req: ScoreRequest, served) -> tuple[list[list[int]], list[int]]:
    """Token ids of every input (a pair `[CLS] a [SEP] b [SEP]`, truncated longest first; a text
    `[CLS] t [SEP]`; each side cut before it is tokenised), in order, and the indices of those
    truncated to `max_input_tokens`; with truncation off, an over-long input is a 4xx naming it."""
    tokenizer, limit, field = served.tokenizer, served.limits.max_input_tokens, req.field
    if tokenizer is None:
        raise ApiError("validation", "this model has no tokenizer", field)
    ids: list = [None] * len(req.inputs)
    cut = [False] * len(req.inputs)
    pair_at = [i for i, x in enumerate(req.inputs) if isinstance(x, tuple)]
    text_at = [i for i, x in enumerate(req.inputs) if not isinstance(x, tuple)]
    for at, encode in ((pair_at, tokenizer.encode_pairs), (text_at, lambda xs, n: tokenizer.encode(xs, "", n))):
        if not at:
            continue
        items = [req.inputs[i] for i in at]
        try:
            got, tr = encode(items, limit)
        except Exception:  # tokenizers raises plain Exceptions: name the text it could not take
            for k, item in zip(at, items):
                check_encodable(item if isinstance(item, tuple) else (item,), field, [k] * 2)
            raise
        for i, seq, t in zip(at, got, tr):
            ids[i], cut[i] = seq, t
    truncated = [i for i, t in enumerate(cut) if t]
    if truncated and not req.truncate:
        i = truncated[0]
        x = req.inputs[i]
        if req.documents is not None:  # a rerank: the query may be what is too long
            q = _count_tokens(tokenizer, x[0], "", limit)
            if q is None or q + 1 >= limit:
                has = f"has {q} tokens" if q is not None else f"has more than {limit} tokens"
                raise ApiError("input_too_long", f"`query` {has} ([CLS] and [SEP] included); with a document "
                                                 f"and its [SEP] the limit is {limit}. Send a shorter query or set "
                                                 "truncate=true", "query")
        where = field if req.single else f"{field}[{i}]"
        what = " with the query" if req.documents is not None else ""
        raise ApiError("input_too_long", f"`{where}`{what} has more than {limit} tokens ([CLS] and [SEP] included), "
                                         f"the limit. Send shorter input or set truncate=true", field)
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


# ----------------------------------------------------------------------------- logits -> bodies
def activated(rows: np.ndarray, raw: bool) -> np.ndarray:
    """TEI's scores: the logits when `raw`, else sigmoid for one label and softmax for more."""
    if raw:
        return rows
    t = torch.from_numpy(rows)
    return (torch.sigmoid(t) if t.shape[1] == 1 else torch.softmax(t, dim=-1)).numpy()


def _ranked(scores: list, documents: list, top_n: int | None, text_key: str | None, score_key: str) -> list:
    results = [{"index": i, score_key: s} for i, s in enumerate(scores)]
    results.sort(key=lambda r: r[score_key], reverse=True)  # stable: ties keep input order
    results = results[:top_n]
    if text_key is not None:
        for r in results:
            r[text_key] = documents[r["index"]] if text_key == "text" else {"text": documents[r["index"]]}
    return results


def tei_rerank_body(req: ScoreRequest, rows: np.ndarray, tokens: int, served) -> bytes:
    """TEI's `/rerank` answer: `[{index, score, text?}]`, best first (sigmoid unless raw_scores;
    a multi-vector model: the MaxSim score, which has no activation)."""
    scores = maxsim_scores(rows) if isinstance(rows, TokenRows) else activated(rows, req.raw_scores)[:, 0].tolist()
    return json.dumps(_ranked(scores, req.documents, None, "text" if req.return_documents else None,
                              "score")).encode()


def v1_rerank_body(req: ScoreRequest, rows: np.ndarray, tokens: int, served) -> bytes:
    """The Cohere/Jina answer: `{id, model, results: [{index, relevance_score, document?}], usage}`,
    best first, cut to top_n; the score is the folder's activation of the logit (as
    `CrossEncoder.rank`: sigmoid by default) unless raw_scores; a multi-vector model's is the
    MaxSim score (as `MultiVectorEncoder.rank`), raw_scores or not."""
    if isinstance(rows, TokenRows):
        scores = maxsim_scores(rows)
    else:
        logits = torch.from_numpy(rows)
        scores = (logits if req.raw_scores else served.loaded.activation_fn(logits))[:, 0].tolist()
    results = _ranked(scores, req.documents, req.top_n, "document" if req.return_documents else None,
                      "relevance_score")
    return json.dumps({"id": f"rerank-{uuid.uuid4().hex}", "object": "rerank", "model": served.name,
                       "results": results, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}).encode()


def predict_body(req: ScoreRequest, rows: np.ndarray, tokens: int, served) -> bytes:
    """TEI's `/predict` answer: per input `[{label, score}]`, best first (sigmoid for one label,
    softmax for more, unless raw_scores); one input given: its list alone."""
    scores = activated(rows, req.raw_scores).tolist()
    labels = served.labels
    out = [sorted(({"label": labels[j], "score": s} for j, s in enumerate(row)), key=lambda r: r["score"],
                  reverse=True) for row in scores]
    return json.dumps(out[0] if req.single else out).encode()


def classify_body(req: ScoreRequest, rows: np.ndarray, tokens: int, served) -> bytes:
    """vLLM's `/classify` answer: `{id, object, created, model, data: [{index, label, probs,
    num_classes}], usage}`; probs are the softmax over the labels (sigmoid for one label), label
    the most probable."""
    probs = activated(rows, False)
    labels = served.labels
    data = [{"index": i, "label": labels[int(np.argmax(p))], "probs": p.tolist(), "num_classes": len(labels)}
            for i, p in enumerate(probs)]
    return json.dumps({"id": f"classify-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                       "model": served.name, "data": data,
                       "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0,
                                 "prompt_tokens_details": None}}).encode()


__all__ = ["EmbedRequest", "ScoreRequest", "VectorRequest", "parse_vectors", "vector_token_ids",
           "vector_rerank_token_ids", "vectors_body", "maxsim_scores", "TOKENS_B64_LAYOUT", "Limits", "parse_tei_rerank", "parse_v1_rerank", "parse_predict",
           "parse_classify", "score_token_ids", "tei_rerank_body", "v1_rerank_body", "predict_body", "classify_body",
           "parse_json", "parse_openai", "parse_tei", "parse_tokenize",
           "to_token_ids", "openai_body", "tei_body", "tokenize_piece", "b64_float32", "INPUT_TYPES"]
