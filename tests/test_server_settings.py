"""The server's settings: a value given is used or refused by name, never swapped for the default
(only None takes the default). Runs without the serve extra except where marked."""

from __future__ import annotations

import pytest

from modernbert_embed.cli import build_parser
from modernbert_embed.server.cli import settings_from_args
from modernbert_embed.server.settings import API_KEY_ENV, ServerSettings

CHECK = dict(model_limit=512, default_input_tokens=512, default_batch_tokens=4096)


@pytest.mark.parametrize("name", ["tokenization_workers", "warmup_tokens"])
@pytest.mark.parametrize("value", [0, -1, True, 2.5])
def test_a_bad_count_is_refused_not_defaulted(name, value):
    with pytest.raises(ValueError, match=rf"{name} must be a whole number >= 1 \(or None for the default\), "
                                         rf"got {value!r}"):
        ServerSettings(**{name: value}).check(**CHECK)


@pytest.mark.parametrize("name", ["tokenization_workers", "warmup_tokens"])
def test_none_takes_the_default_and_a_count_is_kept(name):
    assert getattr(ServerSettings().check(**CHECK), name) is None
    assert getattr(ServerSettings(**{name: 3}).check(**CHECK), name) == 3


def test_an_empty_name_or_key_is_refused():
    with pytest.raises(ValueError, match="served_model_name is empty"):
        ServerSettings(served_model_name="").check(**CHECK)
    with pytest.raises(ValueError, match=rf"api_key is empty \(--api-key or \${API_KEY_ENV}\)"):
        ServerSettings(api_key="").check(**CHECK)


def test_serve_command_line_empty_key_is_refused_not_dropped(monkeypatch):
    # `--api-key ""` (say, from an unset shell variable) must not serve without a key
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    args = build_parser().parse_args(["serve", "--api-key", ""])
    with pytest.raises(ValueError, match="api_key is empty"):
        settings_from_args(args).check(**CHECK)
    monkeypatch.setenv(API_KEY_ENV, "")  # the variable set, but empty
    with pytest.raises(ValueError, match="api_key is empty"):
        settings_from_args(build_parser().parse_args(["serve"])).check(**CHECK)
    monkeypatch.setenv(API_KEY_ENV, "s3cret")
    assert settings_from_args(build_parser().parse_args(["serve"])).api_key == "s3cret"
    assert settings_from_args(build_parser().parse_args(["serve", "--api-key", "k"])).api_key == "k"
    monkeypatch.delenv(API_KEY_ENV)
    assert settings_from_args(build_parser().parse_args(["serve"])).api_key is None


def test_an_empty_encoding_format_is_refused():
    pytest.importorskip("starlette", reason="the serve extra is not installed")
    from modernbert_embed.server.errors import ApiError
    from modernbert_embed.server.schemas import Limits, parse_openai

    limits = Limits(hidden_size=8, vocab_size=100, cls_id=1, sep_id=2, special_ids=(0, 1, 2),
                    max_client_batch_size=4, max_input_tokens=16, auto_truncate=True)
    assert parse_openai({"input": "x"}, limits).encoding_format == "float"
    with pytest.raises(ApiError, match="unknown `encoding_format` ''"):
        parse_openai({"input": "x", "encoding_format": ""}, limits)
