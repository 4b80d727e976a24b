"""modernbert-embed: a from-scratch, unpadded inference engine for ModernBERT text embeddings."""

from .api import Embedder
from .config import ConfigError, ModernBertConfig
from .engine import Engine, NonFiniteError
from .options import EncodeOptions, OptionError
from .tokenizer import PROMPTS
from .weights import Checkpoint, CheckpointError

__all__ = ["Embedder", "Engine", "EncodeOptions", "OptionError", "NonFiniteError", "Checkpoint",
           "ModernBertConfig", "ConfigError", "CheckpointError", "PROMPTS"]
__version__ = "0.1.0"
