"""ModernBERT configuration: one frozen dataclass that knows both spellings of `config.json`.

transformers 4.48 wrote `global_attn_every_n_layers`, `global_rope_theta`, `local_rope_theta` and
`local_attention` (the full window width); transformers 5.x writes `layer_types`,
`rope_parameters` and `sliding_window` (the half width). Both describe the same model. Everything
the model needs per layer (global or local, rope theta, half window) is derived here, once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping


class ConfigError(ValueError):
    """A config.json this engine cannot run, with the reason."""


FULL, SLIDING = "full_attention", "sliding_attention"
# Every how many layers one is global, when a config does not say (ModernBERT's: 0, 3, 6, ...).
GLOBAL_EVERY = 3
# Older spellings of a field in config.json, read when the field's own name is absent.
ALIASES = {"norm_eps": ("layer_norm_eps",), "cls_token_id": ("bos_token_id",), "sep_token_id": ("eos_token_id",)}


@dataclass(frozen=True)
class ModernBertConfig:
    vocab_size: int = 50368
    hidden_size: int = 768
    intermediate_size: int = 1152
    num_hidden_layers: int = 22
    num_attention_heads: int = 12
    max_position_embeddings: int = 8192
    norm_eps: float = 1e-5
    # Per layer: True for global (full) attention, False for sliding-window attention (empty: every
    # GLOBAL_EVERY-th layer global).
    layer_is_global: tuple[bool, ...] = field(default=())
    global_rope_theta: float = 160000.0
    local_rope_theta: float = 10000.0
    # Half window: a local-layer query i sees keys j with |i - j| <= local_window (inclusive).
    local_window: int = 64
    cls_token_id: int = 50281
    sep_token_id: int = 50282
    pad_token_id: int = 50283

    def __post_init__(self):
        if self.num_hidden_layers < 1:
            raise ConfigError(f"num_hidden_layers must be >= 1, got {self.num_hidden_layers}")
        if not self.layer_is_global:
            object.__setattr__(
                self, "layer_is_global", tuple(i % GLOBAL_EVERY == 0 for i in range(self.num_hidden_layers))
            )
        if len(self.layer_is_global) != self.num_hidden_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_is_global)} entries but num_hidden_layers is "
                f"{self.num_hidden_layers}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim {self.head_dim} must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def rope_theta(self, layer: int) -> float:
        return self.global_rope_theta if self.layer_is_global[layer] else self.local_rope_theta

    def window(self, layer: int) -> int | None:
        """Half window of `layer`, or None for a global layer."""
        return None if self.layer_is_global[layer] else self.local_window

    def flops_per_token(self, seq_len: int) -> float:
        """Model FLOPs per token of a sequence of `seq_len` tokens: matmuls only, 2 per MAC.

        Local layers see at most 2w + 1 keys, global layers the whole sequence.
        """
        H, I = self.hidden_size, self.intermediate_size
        linear = 2 * (H * 3 * H + H * H + H * 2 * I + I * H)
        total = 0.0
        for layer in range(self.num_hidden_layers):
            w = self.window(layer)
            keys = seq_len if w is None else min(seq_len, 2 * w + 1)
            total += linear + 2 * 2 * keys * H  # q.k^T and p.v
        return total

    # ------------------------------------------------------------------ reading
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModernBertConfig":
        """Either schema of config.json; a key it does not give takes the field's default (each
        default is written once, on its field)."""
        _refuse_unsupported(d)
        defaults = {f.name: f.default for f in fields(cls)}

        def value(name: str):
            """The field `name` from its key (or an older spelling), as the type of its default."""
            for key in (name, *ALIASES.get(name, ())):
                if key in d:
                    return type(defaults[name])(d[key])
            return defaults[name]

        n_layers = value("num_hidden_layers")
        if d.get("layer_types") is not None:  # 5.x schema
            kinds = list(d["layer_types"])
            bad = [k for k in kinds if k not in (FULL, SLIDING)]
            if bad:
                raise ConfigError(f"unknown layer type(s) {sorted(set(bad))} in layer_types")
            layer_is_global = tuple(k == FULL for k in kinds)
        else:  # 4.48 schema
            every = int(d.get("global_attn_every_n_layers", GLOBAL_EVERY))
            if every < 1:
                raise ConfigError(f"global_attn_every_n_layers must be >= 1, got {every}")
            layer_is_global = tuple(i % every == 0 for i in range(n_layers))

        global_theta, local_theta = value("global_rope_theta"), value("local_rope_theta")
        rope = d.get("rope_parameters")
        if rope:  # 5.x schema: per layer type
            for kind, params in rope.items():
                rtype = (params or {}).get("rope_type", "default")
                if rtype != "default":
                    raise ConfigError(f"rope_type {rtype!r} for {kind} is not supported (only 'default')")
            global_theta = float(rope.get(FULL, {}).get("rope_theta", global_theta))
            local_theta = float(rope.get(SLIDING, {}).get("rope_theta", local_theta))
        if d.get("rope_scaling"):
            raise ConfigError(f"rope_scaling {d['rope_scaling']!r} is not supported")

        if d.get("sliding_window") is not None:  # 5.x: the half width
            half = int(d["sliding_window"])
        else:  # 4.48: the full width
            full_width = int(d.get("local_attention", 2 * defaults["local_window"]))
            if full_width % 2:
                raise ConfigError(f"local_attention must be even, got {full_width}")
            half = full_width // 2

        derived = {"num_hidden_layers": n_layers, "layer_is_global": layer_is_global,
                   "global_rope_theta": global_theta, "local_rope_theta": local_theta, "local_window": half}
        return cls(**{name: derived[name] if name in derived else value(name) for name in defaults})

    @classmethod
    def from_file(cls, path: str | Path) -> "ModernBertConfig":
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {path} is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise ConfigError(f"config file {path} does not hold a JSON object")
        return cls.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        """The 5.x schema (what transformers' save_pretrained writes today)."""
        return {
            "architectures": ["ModernBertModel"],
            "model_type": "modernbert",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "max_position_embeddings": self.max_position_embeddings,
            "norm_eps": self.norm_eps,
            "norm_bias": False,
            "attention_bias": False,
            "mlp_bias": False,
            "hidden_activation": "gelu",
            "layer_types": [FULL if g else SLIDING for g in self.layer_is_global],
            "rope_parameters": {
                FULL: {"rope_type": "default", "rope_theta": self.global_rope_theta},
                SLIDING: {"rope_type": "default", "rope_theta": self.local_rope_theta},
            },
            "local_attention": 2 * self.local_window,
            "cls_token_id": self.cls_token_id,
            "bos_token_id": self.cls_token_id,
            "sep_token_id": self.sep_token_id,
            "eos_token_id": self.sep_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": "float32",
        }


def _refuse_unsupported(d: Mapping[str, Any]) -> None:
    """Settings this engine does not implement are refused by name rather than silently ignored."""
    model_type = d.get("model_type", "modernbert")
    if model_type != "modernbert":
        raise ConfigError(f"model_type {model_type!r} is not ModernBERT")
    act = d.get("hidden_activation", "gelu")
    if act != "gelu":
        raise ConfigError(f"hidden_activation {act!r} is not supported (only exact 'gelu')")
    for key in ("attention_bias", "mlp_bias", "norm_bias"):
        if d.get(key, False):
            raise ConfigError(f"{key}=true is not supported: this engine implements bias-free ModernBERT")
    pos = d.get("position_embedding_type", "absolute")
    if pos not in ("absolute", "rope", None):
        raise ConfigError(f"position_embedding_type {pos!r} is not supported")
