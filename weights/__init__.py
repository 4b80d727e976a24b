"""Checkpoint I/O: find a checkpoint (local folder, HF cache or Hub), read its folder and tensors
strictly, write random ones in the real layout for tests and benchmarks."""

from .checkpoint import CLASSIFIER_PREFIXES, CheckpointError, load_state_dict, map_key
from .folder import CLASSIFIER, EMBEDDER, Checkpoint, ClassifierSpec, resolve_activation_fn
from .random_checkpoint import classifier_config, ettin_config, small_config, write_random_checkpoint
from .resolve import DEFAULT_MODEL, resolve_checkpoint

__all__ = [
    "CLASSIFIER",
    "CLASSIFIER_PREFIXES",
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
