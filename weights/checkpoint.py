"""Reading a ModernBERT safetensors checkpoint, strictly.

One explicit key map: the names in the nomic checkpoint are the model's own parameter names.
Masked-LM and classifier checkpoints of the same family prefix the backbone with `model.`; a
masked-LM one carries a prediction head (`head.*`, `decoder.*`), which an encoder ignores; a
classifier's head (`head.*`, `classifier.*`) is kept when the caller asks for it (`heads`).
Missing, unexpected and mis-shaped tensors are all named in one error, and nothing runs with any
of them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_IGNORED_PREFIXES = ("head.", "decoder.", "classifier.")
CLASSIFIER_PREFIXES = ("head.", "classifier.")  # a sequence classifier's head, kept as named


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, with the reason and the names involved."""


def map_key(name: str, heads: tuple[str, ...] = ()) -> str | None:
    """Checkpoint tensor name -> model parameter name, or None for tensors an encoder ignores.
    Tensors under a prefix in `heads` are kept under their own names."""
    if name.startswith(heads):
        return name
    if name.startswith(_IGNORED_PREFIXES):
        return None
    if name.startswith("model."):
        name = name[len("model."):]
    return name


def _files(folder: Path) -> list[Path]:
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from None
        files = sorted({folder / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} names shard files that do not exist: {missing}")
        return files
    single = folder / SINGLE_FILE
    if single.is_file():
        return [single]
    raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {folder}")


def load_state_dict(
    folder: str | Path,
    expected: Mapping[str, torch.Size],
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    heads: tuple[str, ...] = (),
) -> dict[str, torch.Tensor]:
    """Read every tensor of the checkpoint in `folder`, map its name, check it against `expected`
    (parameter name -> shape), and return them cast to `dtype` on `device`. Tensors under a
    prefix in `heads` are kept (see `map_key`) and stay in float32, whatever `dtype`: a head is
    small, and its logits are computed in float32."""
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    out: dict[str, torch.Tensor] = {}
    unexpected, misshaped, duplicated = [], [], []
    seen: set[str] = set()
    for path in _files(folder):
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:  # memory-mapped
                for name in f.keys():
                    key = map_key(name, heads)
                    if key is None:
                        continue
                    if key not in expected:
                        unexpected.append(name)
                        continue
                    if key in seen:
                        duplicated.append(name)
                        continue
                    seen.add(key)
                    shape = tuple(f.get_slice(name).get_shape())
                    if shape != tuple(expected[key]):
                        misshaped.append(f"{name}: checkpoint {list(shape)}, model {list(expected[key])}")
                        continue
                    as_dtype = torch.float32 if heads and key.startswith(heads) else dtype
                    out[key] = f.get_tensor(name).to(device=device, dtype=as_dtype)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"cannot read {path}: {e}") from None
    missing = sorted(set(expected) - seen)
    problems = []
    if missing:
        problems.append(f"missing tensors: {missing}")
    if unexpected:
        problems.append(f"unexpected tensors: {sorted(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped tensors: {misshaped}")
    if duplicated:
        problems.append(f"tensors present twice: {sorted(duplicated)}")
    if problems:
        raise CheckpointError(f"checkpoint in {folder} does not match the model config: " + "; ".join(problems))
    return out
