"""modernbert-embed: a from-scratch, unpadded inference engine for ModernBERT: text embeddings,
cross-encoders and classifiers, late-interaction (ColBERT) retrieval."""

from .api import Embedder
from .config import ConfigError, ModernBertConfig
from .crossencoder import CrossEncoder, TruncationWarning
from .engine import Engine, NonFiniteError
from .loaded import LoadedModel
from .multivector import MultiVectorEncoder
from .options import EncodeOptions, OptionError
from .tokenizer import PROMPTS
from .weights import Checkpoint, CheckpointError

__all__ = ["Embedder", "CrossEncoder", "MultiVectorEncoder", "LoadedModel", "Engine", "EncodeOptions", "OptionError", "NonFiniteError",
           "TruncationWarning", "Checkpoint", "ModernBertConfig", "ConfigError", "CheckpointError", "PROMPTS"]
__version__ = "0.1.0"
