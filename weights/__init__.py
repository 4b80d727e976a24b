"""Checkpoint I/O: find a checkpoint (local folder, HF cache or Hub), read it strictly, write random
ones in the real layout for tests and benchmarks."""

from .checkpoint import CheckpointError, load_state_dict, map_key
from .random_checkpoint import small_config, write_random_checkpoint
from .resolve import resolve_checkpoint

__all__ = [
    "CheckpointError",
    "load_state_dict",
    "map_key",
    "resolve_checkpoint",
    "small_config",
    "write_random_checkpoint",
]
