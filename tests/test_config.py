import json

import pytest

from modernbert_embed.config import ConfigError, ModernBertConfig

from conftest import SMALL_CONFIG, fixture_file


def test_real_config_448_schema():
    cfg = ModernBertConfig.from_file(fixture_file("config.json"))
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.head_dim) == (768, 22, 12, 64)
    assert cfg.intermediate_size == 1152 and cfg.vocab_size == 50368
    assert [i for i, g in enumerate(cfg.layer_is_global) if g] == [0, 3, 6, 9, 12, 15, 18, 21]
    assert cfg.local_window == 64
    assert cfg.rope_theta(0) == 160000.0 and cfg.rope_theta(1) == 10000.0
    assert cfg.window(0) is None and cfg.window(1) == 64


def test_both_schemas_give_the_same_config(tmp_path):
    transformers = pytest.importorskip("transformers")
    old = ModernBertConfig.from_dict(SMALL_CONFIG)
    # What the installed transformers writes for the same model.
    hf = transformers.ModernBertConfig(**{k: v for k, v in SMALL_CONFIG.items() if k != "architectures"})
    hf.save_pretrained(tmp_path)
    assert ModernBertConfig.from_file(tmp_path / "config.json") == old
    # And our own 5.x writer round-trips.
    assert ModernBertConfig.from_dict(old.to_dict()) == old


def test_transformers_5_schema_alone(tmp_path):
    """transformers 5.x writes layer_types and rope_parameters (beside some 4.48 keys): those alone,
    with the 4.48 layer pattern and thetas removed, give the same config. The pattern and thetas
    differ from the defaults, so that a reader ignoring the 5.x keys would be caught."""
    transformers = pytest.importorskip("transformers", minversion="5", reason="the 5.x schema needs transformers 5")
    d = {**SMALL_CONFIG, "global_attn_every_n_layers": 2, "global_rope_theta": 50000.0, "local_rope_theta": 500.0}
    hf = transformers.ModernBertConfig(**{k: v for k, v in d.items() if k != "architectures"})
    hf.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["layer_types"] == ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    only_5x = {k: v for k, v in written.items()
               if k not in ("global_attn_every_n_layers", "global_rope_theta", "local_rope_theta")}
    cfg = ModernBertConfig.from_dict(only_5x)
    assert cfg == ModernBertConfig.from_dict(d)
    assert cfg.layer_is_global == (True, False, True, False)
    assert (cfg.global_rope_theta, cfg.local_rope_theta) == (50000.0, 500.0)


def test_5x_schema_explicit():
    d = {
        "num_hidden_layers": 4,
        "layer_types": ["full_attention", "sliding_attention", "full_attention", "sliding_attention"],
        "rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": 1000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
        },
        "sliding_window": 8,
    }
    cfg = ModernBertConfig.from_dict(d)
    assert cfg.layer_is_global == (True, False, True, False)
    assert cfg.global_rope_theta == 1000.0 and cfg.local_rope_theta == 10.0
    assert cfg.local_window == 8


@pytest.mark.parametrize(
    "change, message",
    [
        ({"hidden_activation": "silu"}, "hidden_activation"),
        ({"attention_bias": True}, "attention_bias"),
        ({"norm_bias": True}, "norm_bias"),
        ({"model_type": "bert"}, "model_type"),
        ({"layer_types": ["full_attention", "chunked_attention", "full_attention", "full_attention"]}, "layer type"),
        ({"rope_parameters": {"full_attention": {"rope_type": "yarn", "rope_theta": 1.0}}}, "rope_type"),
        ({"hidden_size": 129}, "divisible"),
        ({"hidden_size": 130}, "even"),
        ({"layer_types": ["full_attention"]}, "num_hidden_layers"),
    ],
)
def test_unsupported_settings_are_refused(change, message):
    with pytest.raises(ConfigError, match=message):
        ModernBertConfig.from_dict({**SMALL_CONFIG, **change})


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        ModernBertConfig.from_file(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModernBertConfig.from_file(tmp_path / "bad.json")


def test_flops_per_token_counts_the_window():
    cfg = ModernBertConfig()
    short, long = cfg.flops_per_token(128), cfg.flops_per_token(8192)
    # linear part alone is ~0.22 GFLOP per token; global layers add attention that grows with length
    assert 0.2e9 < short < 0.26e9
    extra_global = 8 * 4 * (8192 - 128) * 768
    extra_local = 14 * 4 * (129 - 128) * 768
    assert long - short == pytest.approx(extra_global + extra_local)


def test_missing_keys_take_the_fields_defaults():
    assert ModernBertConfig.from_dict({}) == ModernBertConfig()
    assert ModernBertConfig.from_dict({"num_hidden_layers": 7}) == ModernBertConfig(num_hidden_layers=7)
    cfg = ModernBertConfig.from_dict({"layer_norm_eps": 1e-6, "bos_token_id": 1, "eos_token_id": 2})  # older names
    assert (cfg.norm_eps, cfg.cls_token_id, cfg.sep_token_id) == (1e-6, 1, 2)
    assert ModernBertConfig.from_dict({"norm_eps": 1e-7, "layer_norm_eps": 1e-6}).norm_eps == 1e-7


def test_defaults_are_written_once_on_the_fields():
    """from_dict reads its defaults from the fields: a subclass that changes them changes what a
    config without those keys gives (a second copy of a default in from_dict would not follow)."""
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Other(ModernBertConfig):
        hidden_size: int = 512
        num_attention_heads: int = 8
        local_window: int = 32
        global_rope_theta: float = 1000.0
        pad_token_id: int = 7

    cfg = Other.from_dict({})
    assert cfg == Other()
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.local_window, cfg.global_rope_theta, cfg.pad_token_id) \
        == (512, 8, 32, 1000.0, 7)
