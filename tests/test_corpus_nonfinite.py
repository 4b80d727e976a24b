"""Non-finite embeddings in the corpus command: under --on-error stop a clear error naming the rows
by file and line (exit 1, no traceback); under --on-error skip the affected documents are embedded
again one by one, and those still NaN are recorded as skipped, the others kept.

The checkpoint is the shared one with one poisoned token: the embedding row of " fox" (token id
30013 in the real vocabulary) is NaN, so every text with " fox" inside it embeds to NaN."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TEST_DEVICE
from corpus_helpers import cli, make_texts, shared_checkpoint, write_text
from modernbert_embed.corpus import read_output
from modernbert_embed.engine import NonFiniteError

FOX = 30013


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory):
    """(checkpoint folder, Embedder) with the " fox" token's embedding set to NaN."""
    import shutil

    from safetensors.torch import load_file, save_file

    from modernbert_embed import Embedder

    folder = tmp_path_factory.mktemp("poisoned")
    shutil.copytree(shared_checkpoint(tmp_path_factory), folder, dirs_exist_ok=True)
    sd = load_file(folder / "model.safetensors")
    sd["embeddings.tok_embeddings.weight"][FOX] = float("nan")
    save_file(sd, folder / "model.safetensors")
    return folder, Embedder.from_pretrained(folder, device=TEST_DEVICE, dtype="float32")


def corpus(tmp_path, n=8, bad=(2, 5)):
    """A text file whose lines `bad` (0-based) hold " fox"; the others do not. Line 1 and the bad
    lines are longer than a window (several windows with --long chunk; the fox in the first)."""
    texts = [t.replace("fox", "cat") for t in make_texts(n, seed=30, max_words=12)]
    texts[0] = "over the lazy dog " * 30
    for i in bad:
        texts[i] = f"the quick brown fox number {i} " + "jumps over the lazy dog " * 20
    return write_text(tmp_path / "c.txt", texts), texts


def test_the_poison_is_where_the_tests_want_it(poisoned):
    _, model = poisoned
    ids, _ = model.tokenize(["the quick brown fox", "the quick brown cat"])
    assert FOX in ids[0] and FOX not in ids[1]
    with pytest.raises(NonFiniteError, match=r"input\(s\) \[0\]"):
        model.encode(["the quick brown fox", "the quick brown cat"])


def test_stop_names_the_rows_by_file_and_line(tmp_path, capsys, poisoned):
    folder, model = poisoned
    inp, _ = corpus(tmp_path)
    rc, _, err = cli(capsys, "embed", inp, "-o", tmp_path / "out", "--model", folder, "--shard-size", 4,
                     embedder=model)
    assert rc == 1, err
    assert f"non-finite embeddings (NaN or infinity) for 1 document(s): {inp}, line 3 " in err
    assert "--on-error skip" in err and "Traceback" not in err


@pytest.mark.parametrize("long", ["truncate", "chunk"])
def test_skip_records_the_rows_and_keeps_the_others(tmp_path, capsys, poisoned, long):
    folder, model = poisoned
    inp, texts = corpus(tmp_path)
    rc, out, err = cli(capsys, "embed", inp, "-o", tmp_path / "out", "--model", folder, "--shard-size", 4,
                       "--on-error", "skip", "--long", long, embedder=model)
    assert rc == 0, err
    assert "embedded 6 documents (2 rows skipped)" in out
    res = read_output(tmp_path / "out")
    skipped = [s for sh in res.manifest["shards"] for s in sh["skipped"]]
    assert [s["row"] for s in skipped] == [2, 5]
    assert [s["where"] for s in skipped] == [f"{inp}, line 3", f"{inp}, line 6"]
    assert all("non-finite embedding" in s["error"] for s in skipped)
    kept = [i for i in range(8) if i not in (2, 5)]
    assert res.meta["row"] == kept
    if long == "chunk":
        assert res.meta["windows"][0] > 1 and sum(sh["windows"] for sh in res.manifest["shards"]) == sum(
            res.meta["windows"])
    np.testing.assert_allclose(res.embeddings, model.encode([texts[i] for i in kept], long=long), atol=1e-5)


def test_a_document_finite_on_its_own_is_kept(tmp_path, capsys, poisoned, monkeypatch):
    """A batch that reports a document non-finite, which alone is finite: the retry keeps it."""
    folder, model = poisoned
    inp, texts = corpus(tmp_path, bad=())
    real = model.engine.embed

    def embed(ids, **kw):  # every batch of more than one document "overflows" in its first row
        out = real(ids, **kw)
        if len(ids) > 1:
            out[0] = float("inf")
            raise NonFiniteError([0], torch.float32)
        return out

    monkeypatch.setattr(model.engine, "embed", embed)
    rc, out, err = cli(capsys, "embed", inp, "-o", tmp_path / "out", "--model", folder, "--shard-size", 4,
                       embedder=model)
    assert rc == 0 and "embedded 8 documents" in out, err
    monkeypatch.undo()
    np.testing.assert_allclose(read_output(tmp_path / "out").embeddings, model.encode(texts), atol=1e-5)
