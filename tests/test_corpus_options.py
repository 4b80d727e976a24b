"""The corpus command's options: the encoding ones refused by the engine's own EncodeOptions, with
its reasons spelled as command-line flags; the corpus-only ones checked here; inputs checked when
the job is made."""

from __future__ import annotations

import re

import pytest

from corpus_helpers import shared_checkpoint, shared_embedder
from modernbert_embed.corpus import CorpusError, CorpusJob, EmbedOptions, RefusedError
from modernbert_embed.corpus.options import CLI_NAMES
from modernbert_embed.options import EncodeOptions, OptionError


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return shared_embedder(shared_checkpoint(tmp_path_factory)).loaded


@pytest.mark.parametrize("encode_kw, corpus_kw", [
    ({"long": "sideways"}, {"long": "sideways"}),
    ({"overlap": 4}, {"overlap": 4}),
    ({"overlap": -1, "long": "chunk"}, {"overlap": -1, "long": "chunk"}),
    ({"truncate_dim": 0}, {"truncate_dim": 0}),
    ({"truncate_dim": 129}, {"truncate_dim": 129}),
    ({"precision": "int4"}, {"precision": "int4"}),
    ({"max_batch_tokens": 0}, {"max_batch_tokens": 0}),
    ({"prompt": "x: ", "prompt_name": "clustering"}, {"prompt": "x: ", "prompt_name": "clustering"}),
    ({"prompt_name": "shouting"}, {"prompt_name": "shouting"}),
    ({"normalize_embeddings": "yes"}, {"normalize": "yes"}),
])
def test_encoding_options_are_refused_as_encode_refuses_them(tmp_path, loaded, encode_kw, corpus_kw):
    """Refused by `validate` (before the model is loaded) or by `resolve` (against the model: its
    prompts, its width), with EncodeOptions' reasons spelled as flags."""
    try:
        EncodeOptions(prompts=loaded.prompts, **encode_kw).for_model(loaded.config.hidden_size)
    except OptionError as e:
        want = e.render(CLI_NAMES)
    else:
        pytest.fail(f"EncodeOptions accepted {encode_kw}")
    assert "--" in want  # spelled as flags
    with pytest.raises(RefusedError, match=f"^{re.escape(want)}$"):
        opts = EmbedOptions([str(tmp_path / "c.txt")], str(tmp_path / "out"), **corpus_kw)
        opts.validate()
        opts.resolve(loaded)


def test_prompt_name_is_resolved_against_the_model(tmp_path, loaded):
    opts = EmbedOptions(["c.txt"], "out", prompt_name="search_document")
    opts.validate()
    encode = opts.resolve(loaded)
    assert encode.prompt == "search_document: " and opts.prompt is None  # the options as given stay
    assert opts.identity(encode)["prompt"] == "search_document: "
    assert opts.resolve(loaded).prompt == "search_document: "  # resolving again changes nothing


@pytest.mark.parametrize("kw, message", [
    ({"shard_size": 0}, "--shard-size must be >= 1, got 0"),
    ({"shard_size": "5"}, "--shard-size must be a whole number, got '5'"),
    ({"calibration_size": 0}, "--calibration-size must be >= 1, got 0"),
    ({"on_error": "ignore"}, "--on-error must be one of ('stop', 'skip'), got 'ignore'"),
    ({"calibration": "c.json"}, "--calibration applies to --precision int8 or uint8 only"),
    ({"meta_format": "csv"}, "--meta-format must be one of ('parquet', 'jsonl'), got 'csv'"),
    ({"inputs": []}, "no input files given"),
])
def test_corpus_options_are_refused_by_name(kw, message):
    opts = EmbedOptions(**{"inputs": ["c.txt"], "output": "out", **kw})
    with pytest.raises(RefusedError, match=f"^{re.escape(message)}$"):
        opts.validate()


def test_inputs_are_checked_when_the_job_is_made(tmp_path):
    (tmp_path / "ok.txt").write_text("a\n")
    (tmp_path / "dir").mkdir()
    (tmp_path / "notes.csv").write_text("a\n")
    cases = [("nope.txt", RefusedError, "input not found: "), ("dir", RefusedError, "is a folder"),
             ("notes.csv", CorpusError, "cannot tell the format from the name; use --input-format")]
    for name, error, message in cases:
        opts = EmbedOptions([str(tmp_path / "ok.txt"), str(tmp_path / name)], str(tmp_path / "out"))
        with pytest.raises(error, match=message):
            CorpusJob(opts)
    assert not (tmp_path / "out").exists()
