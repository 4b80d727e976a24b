"""Checkpoint I/O: find a checkpoint (local folder, HF cache or Hub), read its folder and tensors
strictly, write random ones in the real layout for tests and benchmarks."""

from .checkpoint import CheckpointError, load_state_dict, map_key
from .folder import Checkpoint
from .random_checkpoint import small_config, write_random_checkpoint
from .resolve import DEFAULT_MODEL, resolve_checkpoint

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "DEFAULT_MODEL",
    "load_state_dict",
    "map_key",
    "resolve_checkpoint",
    "small_config",
    "write_random_checkpoint",
]
