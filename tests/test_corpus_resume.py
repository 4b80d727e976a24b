"""The output folder across runs: a refused rerun spoils nothing, the lock comes before the read,
a full disk leaves a folder that resumes, run settings that changed are recorded and warned about,
shards are recorded one journal line each, and the pipeline's threads end with the run."""

from __future__ import annotations

import fcntl
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from corpus_helpers import (cli, full_disk_after, make_texts, same_folder, shard_entries, shared_checkpoint,
                            shared_embedder, write_jsonl, write_text)
from modernbert_embed.corpus import CorpusError, CorpusJob, EmbedOptions, Manifest, read_output
from modernbert_embed.engine import NonFiniteError


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return shared_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def model(ckpt):
    return shared_embedder(ckpt)


@pytest.fixture
def embed(capsys, ckpt, model):
    def run(inputs, out, *extra):
        return cli(capsys, "embed", *inputs, "-o", out, "--model", ckpt, *extra, embedder=model)

    return run


def test_refused_rerun_leaves_a_finished_folder_complete_and_readable(tmp_path, embed, capsys):
    lines = make_texts(10, seed=20)
    inp = write_text(tmp_path / "c.txt", lines)
    out = tmp_path / "out"
    assert embed([inp], out, "--shard-size", 5)[0] == 0
    rc, report, _ = cli(capsys, "verify", out)
    assert rc == 0 and "complete, 10 documents" in report
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    write_text(inp, lines[:2] + ["line three, edited"] + lines[3:])
    rc, _, err = embed([inp], out, "--shard-size", 5)
    assert rc == 2 and "the input rows 0..4 of shard 0 differ" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # not one byte written
    rc, report, err = cli(capsys, "verify", out)
    assert rc == 0 and "complete, 10 documents + 0 skipped = 10 rows in 2 shards" in report, err
    assert read_output(out).embeddings.shape == (10, 128)

    write_text(inp, lines + ["an eleventh line"])  # a row more: shard 1 no longer fits
    rc, _, err = embed([inp], out, "--shard-size", 5)
    assert rc == 2 and "the inputs changed" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    write_text(inp, lines)
    rc, summary, err = embed([inp], out, "--shard-size", 5)
    assert rc == 0 and "nothing to do" in summary, err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_the_lock_is_taken_before_the_manifest_is_read(tmp_path, embed, monkeypatch):
    inp = write_text(tmp_path / "c.txt", make_texts(4, seed=21))
    out = tmp_path / "out"
    assert embed([inp], out, "--shard-size", 2)[0] == 0
    real = Manifest.load.__func__
    lock_state = []

    def load(cls, folder):
        with open(Path(folder) / ".lock") as probe:  # another open file: blocked while a run holds it
            try:
                fcntl.flock(probe.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                lock_state.append("free")
            except OSError:
                lock_state.append("held")
        return real(cls, folder)

    monkeypatch.setattr(Manifest, "load", classmethod(load))
    rc, summary, err = embed([inp], out, "--shard-size", 2)
    assert rc == 0 and "nothing to do" in summary, err
    assert lock_state == ["held"]


def test_a_full_disk_gives_a_clear_error_and_a_folder_that_resumes(tmp_path, embed, monkeypatch):
    inp = write_jsonl(tmp_path / "c.jsonl", make_texts(14, seed=22))
    full_disk_after(monkeypatch, shard_files=4)
    rc, _, err = embed([inp], tmp_path / "out", "--shard-size", 3)
    assert rc == 1
    assert f"cannot write {tmp_path / 'out' / 'shard-00002.npy'}: No space left on device" in err
    assert "run the same command again to resume" in err and "Traceback" not in err
    assert [s["index"] for s in shard_entries(tmp_path / "out")] == [0, 1]
    assert not any(p.name.startswith(".") and "tmp" in p.name for p in (tmp_path / "out").iterdir())

    monkeypatch.undo()
    rc, summary, err = embed([inp], tmp_path / "out", "--shard-size", 3)
    assert rc == 0 and "embedded 8 documents" in summary, err
    assert "warning" not in err  # the same settings: the same bytes
    assert embed([inp], tmp_path / "fresh", "--shard-size", 3)[0] == 0
    same_folder(tmp_path / "out", tmp_path / "fresh")
    runs = read_output(tmp_path / "out").manifest["runs"]
    assert [r["number"] for r in runs] == [1, 2] and "seconds" not in runs[0] and runs[1]["documents"] == 8


def test_a_resume_with_another_token_budget_is_recorded_and_warned(tmp_path, embed, model, monkeypatch):
    texts = make_texts(12, seed=23)
    inp = write_jsonl(tmp_path / "c.jsonl", texts)
    full_disk_after(monkeypatch, shard_files=4)
    assert embed([inp], tmp_path / "out", "--shard-size", 3)[0] == 1
    monkeypatch.undo()
    rc, _, err = embed([inp], tmp_path / "out", "--shard-size", 3, "--max-batch-tokens", "64")
    assert rc == 0, err
    default = model.engine.max_batch_tokens  # the engine's budget for its device
    assert (f"warning: shards 0-1 were embedded with max_batch_tokens {default}; this run uses max_batch_tokens 64"
            in err) and "last bits" in err
    res = read_output(tmp_path / "out")
    assert [r["max_batch_tokens"] for r in res.manifest["runs"]] == [default, 64]
    assert [s["run"] for s in res.manifest["shards"]] == [1, 1, 2, 2]
    np.testing.assert_allclose(res.embeddings, model.encode(texts), atol=1e-5)


def test_each_shard_is_one_journal_line_and_the_manifest_is_written_twice_a_run(tmp_path, model, monkeypatch):
    inp = write_text(tmp_path / "c.txt", make_texts(12, seed=24))
    out = tmp_path / "out"
    saves, seen = [], []
    real_save = Manifest.save
    monkeypatch.setattr(Manifest, "save", lambda self: (saves.append(1), real_save(self))[1])

    def on_shard(entry):  # the journal on disk when each shard is recorded
        lines = (out / "journal.jsonl").read_text().splitlines()
        seen.append((entry["index"], [json.loads(line)["index"] for line in lines], len(saves)))

    opts = EmbedOptions([str(inp)], str(out), shard_size=2, progress=False, meta_format="jsonl")
    CorpusJob(opts, embedder=model, on_shard=on_shard).run()
    assert seen == [(k, list(range(k + 1)), 1) for k in range(6)]  # no manifest write in between
    assert len(saves) == 2 and not (out / "journal.jsonl").exists()  # compacted at the end
    assert [s["index"] for s in json.loads((out / "manifest.json").read_text())["shards"]] == list(range(6))


def test_a_torn_last_journal_line_is_ignored_and_a_damaged_one_refused(tmp_path, embed, monkeypatch):
    inp = write_jsonl(tmp_path / "c.jsonl", make_texts(12, seed=25))
    out = tmp_path / "out"
    full_disk_after(monkeypatch, shard_files=6)
    assert embed([inp], out, "--shard-size", 3)[0] == 1
    monkeypatch.undo()
    journal = out / "journal.jsonl"
    intact = journal.read_bytes()
    journal.write_bytes(intact + b'{"index": 3, "rows": [9, 1')  # a crash in the middle of an append
    assert [s["index"] for s in shard_entries(out)] == [0, 1, 2]

    lines = intact.splitlines(keepends=True)
    journal.write_bytes(lines[0] + b'{"index": 1, "ro\n' + lines[2])
    with pytest.raises(CorpusError, match=r"journal.jsonl: line 2 is damaged"):
        shard_entries(out)

    journal.write_bytes(intact + b'{"index": 3, "rows": [9, 1')
    rc, summary, err = embed([inp], out, "--shard-size", 3)
    assert rc == 0 and "embedded 3 documents" in summary, err
    assert embed([inp], tmp_path / "fresh", "--shard-size", 3)[0] == 0
    same_folder(out, tmp_path / "fresh")


@pytest.mark.parametrize("failing", ["model", "writer"])
def test_the_pipeline_threads_end_with_a_failed_run(tmp_path, model, monkeypatch, failing):
    """The reader runs ahead and fills its queue while the shard in the model fails (or its write
    does): the run ends with the error, and with it both threads, none left blocked on a queue."""
    inp = write_text(tmp_path / "c.txt", make_texts(20, seed=26, max_words=5))
    if failing == "model":
        def embed(ids, **kw):
            time.sleep(0.3)  # long enough for the reader to fill its queue
            raise NonFiniteError([0], torch.float32)

        monkeypatch.setattr(model.engine, "embed", embed)
    else:
        full_disk_after(monkeypatch, shard_files=0)
    opts = EmbedOptions([str(inp)], str(tmp_path / "out"), shard_size=1, progress=False, meta_format="jsonl")
    with pytest.raises(CorpusError, match="non-finite embeddings" if failing == "model" else "No space left"):
        CorpusJob(opts, embedder=model).run()
    assert [t.name for t in threading.enumerate() if t.name.startswith("corpus-")] == []
