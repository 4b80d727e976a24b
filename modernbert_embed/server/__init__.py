"""The HTTP server: OpenAI's embeddings API, TEI's `/embed`, `/rerank` and `/predict`, the
Cohere/Jina `/v1/rerank` and vLLM's `/classify` over the engine core, for one model or several:
embedders, cross-encoders (rerankers, classifiers) and multi-vector (ColBERT) models, whose
per-token vectors `/v1/embeddings` returns and whose MaxSim scores the rerank routes.

```
HTTP handlers (app.py: check, pick the model, tokenise beside it) ──► Batcher (batcher.py: one
worker per model owns its Engine, packs many requests into token-budget forwards) ──►
Engine.embed / Engine.score / Engine.tokens ──► rows (or token vectors) per request
```

`modernbert-embed serve` (cli.py) runs it with uvicorn; `create_app(model_or_models,
ServerSettings(...))` gives the ASGI application for any other ASGI server. Needs the `serve` extra (starlette, uvicorn,
prometheus-client); this package's `__init__` imports none of them, so the command line works
without it.
"""

from .settings import API_KEY_ENV, ServerSettings


def create_app(models, settings: ServerSettings | None = None):
    """The server's ASGI application over a loaded model (`Embedder`, `CrossEncoder`,
    `MultiVectorEncoder`, `LoadedModel`) or a list of them (see `app.ServerApp`)."""
    from .app import create_app as _create

    return _create(models, settings)


__all__ = ["create_app", "ServerSettings", "API_KEY_ENV"]
