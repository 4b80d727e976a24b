"""Turn a model name or path into a local folder holding the checkpoint's files."""

from __future__ import annotations

import os
from pathlib import Path

from .checkpoint import CheckpointError

DEFAULT_MODEL = "nomic-ai/modernbert-embed-base"

# Everything the engine reads; nothing else is downloaded (no ONNX, no PyTorch .bin).
HUB_FILES = [
    "config.json",
    "model*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",  # model_max_length, where sentence_bert_config.json does not say
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "modules.json",
    "*Pooling*/config.json",  # the Pooling module's folder, as modules.json names it (1_Pooling)
]


def _offline_env() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_checkpoint(
    name_or_path: str | os.PathLike,
    revision: str | None = None,
    local_files_only: bool | None = None,
) -> Path:
    """A local folder: returned as is. Otherwise a Hub repository id, looked up in the HF cache and
    downloaded when missing (unless `local_files_only` or `HF_HUB_OFFLINE` say not to)."""
    path = Path(os.fspath(name_or_path)).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; expected a checkpoint folder or a Hub repository id")
    text = os.fspath(name_or_path)
    # A Hub id is "name" or "owner/name"; anything else that does not exist is a missing folder.
    looks_local = text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text
    if looks_local:
        raise CheckpointError(f"checkpoint folder not found: {path}")

    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError as e:  # pragma: no cover - huggingface_hub is a dependency
        raise CheckpointError(f"huggingface_hub is needed to fetch {text!r}: {e}") from None

    offline = bool(local_files_only) or _offline_env()
    try:
        folder = snapshot_download(
            repo_id=text, revision=revision, allow_patterns=HUB_FILES, local_files_only=offline
        )
    except LocalEntryNotFoundError:
        how = "offline mode is on" if offline else "the Hub could not be reached"
        raise CheckpointError(
            f"{text!r} is not in the Hugging Face cache and {how}; download it once or pass a local folder"
        ) from None
    except RevisionNotFoundError:
        raise CheckpointError(f"revision {revision!r} of {text!r} does not exist on the Hub") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{text!r} is neither a local folder nor a Hub repository") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"could not fetch {text!r} from the Hub: {e}") from None
    return Path(folder)
