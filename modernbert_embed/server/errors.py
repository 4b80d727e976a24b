"""One error type for every refusal, rendered in the shape of the route that refused.

A handler raises `ApiError(kind, message, param)`; the kind says what went wrong, and the route
family decides the status code and the body:

- the OpenAI routes (`/v1/...`, vLLM's `/classify`): `{"error": {"message", "type", "param", "code"}}`, with the
  status codes the official clients map to exception classes (400, 401, 404, 413, 429, 5xx);
- the TEI routes (everything else): `{"error": message, "error_type": type}`, with TEI's codes
  (400 empty, 422 validation, 413 payload, 429 overloaded, 424 backend, 503 unhealthy).

Every refusal has a JSON body in its route's shape (TEI itself answers an oversized body, bad JSON
and a bad key in plain text or with no body). No response ever carries a stack trace: what is not
an `ApiError` becomes a 500 with a fixed message, and the trace goes to the server's log only.
"""

from __future__ import annotations

import json

from starlette.responses import Response

# kind: (OpenAI status, OpenAI type, TEI status, TEI error_type)
KINDS = {
    "malformed": (400, "invalid_request_error", 400, "validation"),
    "empty": (400, "invalid_request_error", 400, "empty"),
    "validation": (400, "invalid_request_error", 422, "validation"),
    "too_many_inputs": (400, "invalid_request_error", 422, "validation"),
    "input_too_long": (400, "invalid_request_error", 422, "validation"),
    "request_too_large": (400, "invalid_request_error", 422, "validation"),
    "tokenizer": (400, "invalid_request_error", 422, "tokenizer"),
    "payload_too_large": (413, "invalid_request_error", 413, "payload_too_large"),
    "request_timeout": (408, "invalid_request_error", 408, "validation"),
    "unauthorized": (401, "authentication_error", 401, "unauthorized"),
    "not_found": (404, "invalid_request_error", 404, "not_found"),
    "model_not_found": (404, "invalid_request_error", 404, "model_not_found"),
    # a route asked of a model that cannot do it (TEI: 424 with its "backend" type for the wrong model type)
    "wrong_model": (400, "invalid_request_error", 424, "backend"),
    "method_not_allowed": (405, "invalid_request_error", 405, "method_not_allowed"),
    "overloaded": (429, "rate_limit_error", 429, "overloaded"),
    "draining": (503, "service_unavailable_error", 503, "unhealthy"),
    "not_ready": (503, "service_unavailable_error", 503, "unhealthy"),
    "backend": (500, "server_error", 424, "backend"),
    "internal": (500, "server_error", 500, "internal"),
}

INTERNAL_MESSAGE = "internal server error; the server's log has the details"
# What an error quotes of a client's value, and the longest message, in characters: a refusal
# never echoes a large value back whole.
QUOTE_LIMIT = 100
MESSAGE_LIMIT = 1000


def clip(text: str, limit: int = QUOTE_LIMIT) -> str:
    """`text` cut to `limit` characters, marked as cut."""
    return text if len(text) <= limit else f"{text[:limit]}... (cut; {len(text)} characters)"


def quote(value, limit: int = QUOTE_LIMIT) -> str:
    """`repr(value)` for an error message, cut to `limit` characters and marked as cut."""
    return clip(repr(value), limit)


class ApiError(Exception):
    """A refusal: `kind` (a key of KINDS), a message for the client, the request field it is about
    (`param`, in the route's spelling), and extra response headers (Retry-After, WWW-Authenticate)."""

    def __init__(self, kind: str, message: str, param: str | None = None, headers: dict | None = None):
        if kind not in KINDS:
            raise ValueError(f"unknown error kind {kind!r}")
        message = clip(message, MESSAGE_LIMIT)
        super().__init__(message)
        self.kind, self.message, self.param = kind, message, param
        self.headers = dict(headers or {})

    def status(self, openai: bool) -> int:
        return KINDS[self.kind][0 if openai else 2]


def is_openai_path(path: str) -> bool:
    """The OpenAI-shaped routes: everything under /v1/, the /embeddings alias and vLLM's /classify."""
    return path.startswith("/v1/") or path in ("/v1", "/embeddings", "/classify")


def error_body(err: ApiError, openai: bool) -> dict:
    """The JSON body of `err` in the OpenAI or the TEI shape."""
    o_status, o_type, _, t_type = KINDS[err.kind]
    if openai:
        return {"error": {"message": err.message, "type": o_type, "param": err.param, "code": err.kind}}
    return {"error": err.message, "error_type": t_type}


def error_response(err: ApiError, path: str) -> Response:
    openai = is_openai_path(path)
    return Response(json.dumps(error_body(err, openai)), status_code=err.status(openai),
                    media_type="application/json", headers=err.headers)


def internal_error() -> ApiError:
    return ApiError("internal", INTERNAL_MESSAGE)


__all__ = ["ApiError", "KINDS", "error_body", "error_response", "internal_error", "is_openai_path",
           "INTERNAL_MESSAGE", "clip", "quote"]
