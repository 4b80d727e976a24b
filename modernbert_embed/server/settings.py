"""The server's limits and switches, kept apart from the HTTP code so that the command line can
build its parser without the serve extra installed."""

from __future__ import annotations

from dataclasses import dataclass, replace


API_KEY_ENV = "MODERNBERT_EMBED_API_KEY"


@dataclass(frozen=True)
class ServerSettings:
    """The serving limits and switches (the `serve` command's options)."""

    # default: the model's name or path; with several models, one name per model (a tuple) or None
    served_model_name: str | tuple[str, ...] | None = None
    api_key: str | None = None
    max_batch_tokens: int | None = None  # tokens per forward; None: the engine's (4096 CPU, 16384 GPU)
    max_client_batch_size: int = 2048  # inputs per request (OpenAI's limit)
    max_input_tokens: int | None = None  # per input, [CLS]/[SEP] included; default: the model's max_seq_length
    max_queued_tokens: int = 1 << 19  # tokens waiting for a forward; more -> 429
    payload_limit: int = 2_000_000  # request body bytes (TEI's default); more -> 413
    max_concurrent_requests: int = 512  # requests handled at once (TEI's default); more -> 429
    max_bytes_in_flight: int = 128 * 1024 * 1024  # request and response bodies held at once; more -> 429
    read_timeout: float = 30.0  # seconds a client may take to send a request's headers, and its body
    keep_alive_timeout: float = 5.0  # seconds an idle connection is kept open between requests
    auto_truncate: bool = True
    drain_timeout: float = 30.0
    tokenization_workers: int | None = None  # default: min(4, CPUs)
    warmup_tokens: int | None = None  # default: max_batch_tokens on a GPU, 128 on the CPU

    def check(self, model_limit: int, default_input_tokens: int, default_batch_tokens: int) -> "ServerSettings":
        """These settings with the input limit resolved (`default_input_tokens`, the checkpoint's
        max_seq_length, unless given; at most `model_limit`, its positions) and the batch budget
        (`default_batch_tokens`, the engine's, unless given), or a ValueError naming the bad one."""
        # None only takes the default: a 0 given is refused below, not replaced
        resolved = replace(self, max_batch_tokens=default_batch_tokens) if self.max_batch_tokens is None else self
        for name in ("max_batch_tokens", "max_client_batch_size", "max_queued_tokens", "payload_limit",
                     "max_concurrent_requests", "max_bytes_in_flight"):
            value = getattr(resolved, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
        for name in ("tokenization_workers", "warmup_tokens"):  # None: the default; 0 is no default
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a whole number >= 1 (or None for the default), got {value!r}")
        names = self.served_model_name if isinstance(self.served_model_name, (list, tuple)) else \
            (self.served_model_name,)
        if "" in names:
            raise ValueError("served_model_name is empty; leave it unset for the model's name")
        if self.api_key == "":
            raise ValueError(f"api_key is empty (--api-key or ${API_KEY_ENV}); leave both unset to serve "
                             "without a key")
        limit = default_input_tokens if self.max_input_tokens is None else self.max_input_tokens
        if not 2 <= limit <= model_limit:
            raise ValueError(f"max_input_tokens must be in 2..{model_limit} (this model's limit), got {limit}")
        if self.max_queued_tokens < limit:
            raise ValueError(f"max_queued_tokens ({self.max_queued_tokens}) must hold at least one input of "
                             f"max_input_tokens ({limit})")
        if self.max_bytes_in_flight < self.payload_limit:
            raise ValueError(f"max_bytes_in_flight ({self.max_bytes_in_flight}) must hold at least one body of "
                             f"payload_limit ({self.payload_limit})")
        if self.drain_timeout < 0:
            raise ValueError(f"drain_timeout must be >= 0, got {self.drain_timeout}")
        for name in ("read_timeout", "keep_alive_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        return replace(resolved, max_input_tokens=limit)


__all__ = ["ServerSettings", "API_KEY_ENV"]
