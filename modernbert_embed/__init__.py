"""modernbert-embed: a from-scratch, unpadded inference engine for ModernBERT text embeddings."""

from .api import Embedder
from .config import ConfigError, ModernBertConfig
from .tokenizer import PROMPTS
from .weights import CheckpointError

__all__ = ["Embedder", "ModernBertConfig", "ConfigError", "CheckpointError", "PROMPTS"]
__version__ = "0.1.0"
