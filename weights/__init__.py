"""Checkpoint I/O: find a checkpoint (local folder, HF cache or Hub), read its folder and tensors
strictly, write random ones in the real layout for tests and benchmarks."""

from .checkpoint import CLASSIFIER_PREFIXES, CheckpointError, load_state_dict, map_key
from .folder import CLASSIFIER, COLBERT_DEFAULTS, EMBEDDER, MULTIVECTOR, Checkpoint, ClassifierSpec, MultiVectorSpec, resolve_activation_fn
from .random_checkpoint import (classifier_config, colbert_st_config, ettin_config, small_config, write_colbert_tokenizer,
                                write_random_checkpoint)
from .resolve import DEFAULT_MODEL, resolve_checkpoint

__all__ = [
    "CLASSIFIER",
    "CLASSIFIER_PREFIXES",
    "COLBERT_DEFAULTS",
    "MULTIVECTOR",
    "MultiVectorSpec",
    "colbert_st_config",
    "write_colbert_tokenizer",
    "Checkpoint",
    "CheckpointError",
    "ClassifierSpec",
    "EMBEDDER",
    "classifier_config",
    "ettin_config",
    "resolve_activation_fn",
    "DEFAULT_MODEL",
    "load_state_dict",
    "map_key",
    "resolve_checkpoint",
    "small_config",
    "write_random_checkpoint",
]
