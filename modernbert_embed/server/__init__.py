"""The HTTP server: OpenAI's embeddings API and TEI's `/embed` over the engine core.

```
HTTP handlers (app.py: check, tokenise beside the model) ──► Batcher (batcher.py: one worker owns
the Engine, packs many requests into token-budget forwards) ──► Engine.embed ──► rows per request
```

`modernbert-embed serve` (cli.py) runs it with uvicorn; `create_app(embedder, ServerSettings(...))`
gives the ASGI application for any other ASGI server. Needs the `serve` extra (starlette, uvicorn,
prometheus-client); this package's `__init__` imports none of them, so the command line works
without it.
"""

from .settings import API_KEY_ENV, ServerSettings


def create_app(embedder, settings: ServerSettings | None = None):
    """The server's ASGI application over a loaded `Embedder` (see `app.ServerApp`)."""
    from .app import create_app as _create

    return _create(embedder, settings)


__all__ = ["create_app", "ServerSettings", "API_KEY_ENV"]
