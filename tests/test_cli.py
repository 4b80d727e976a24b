"""The corpus command through its command line: formats in and out, precisions, chunking,
refusals, bad input, resume after SIGKILL.

Every test runs `main()` in this process with ONE shared Embedder (see corpus_helpers), except
one real process per command (embed, verify) and the SIGKILL resume test (marked slow). The
failure and resume cases of the folder itself are in test_corpus_resume.py.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, fixture_file
from corpus_helpers import (DEVICE_ARGS, MSL, PROMPT, cli, make_texts, shard_entries, shared_checkpoint, shared_embedder,
                            without_run, write_jsonl, write_parquet, write_text)
from helpers import REAL_VOCAB
from modernbert_embed import quantize as Q
from modernbert_embed.cli import main
from modernbert_embed.corpus import read_output


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return shared_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def model(ckpt):
    return shared_embedder(ckpt)


@pytest.fixture
def embed(capsys, ckpt, model):
    """`embed(inputs, out, *flags)` -> (exit status, stdout, stderr), with the shared Embedder
    (load=True: the command loads --model itself)."""

    def run(inputs, out, *extra, model_path=None, load=False):
        return cli(capsys, "embed", *inputs, "-o", out, "--model", model_path or ckpt, *extra,
                   embedder=None if load else model)

    return run


SUMMARY = re.compile(r"^embedded (\d+) documents(?: \((\d+) rows skipped\))?, (\d+) tokens in [\d.]+ s: "
                     r"[\d.]+ documents/s, \d+ tokens/s on \S+.*, float32$", re.M)


# ------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("fmt", ["text", "jsonl", "parquet"])
def test_round_trip_each_input_format(tmp_path, embed, model, fmt, monkeypatch):
    texts = make_texts(30, seed=1)
    if fmt == "text":
        inp = write_text(tmp_path / "c.txt", texts)
        want_ids = [None] * 30
    elif fmt == "jsonl":
        inp = write_jsonl(tmp_path / "c.jsonl", texts)
        want_ids = [f"doc-{i}" for i in range(30)]
        # the GPU path, where the reader thread tokenises the next shard while the model runs
        monkeypatch.setattr(model, "tokenize_beside_model", True)
    else:
        inp = write_parquet(tmp_path / "c.parquet", {"id": list(range(100, 130)), "body": texts})
        want_ids = [str(i) for i in range(100, 130)]
    extra = ["--text-field", "body"] if fmt == "parquet" else []
    rc, out, err = embed([inp], tmp_path / "out", "--shard-size", 8, "--prompt-name",
                         "search_document", *extra)
    assert rc == 0, err
    m = SUMMARY.search(out)
    assert m and m.group(1) == "30", out
    assert "doc/s" in err and "tok/s" in err  # the progress bar, in documents and tokens per second

    res = read_output(tmp_path / "out")
    ref = model.encode(texts, prompt_name="search_document")
    np.testing.assert_allclose(res.embeddings, ref, atol=1e-5)
    ids, truncated = model.tokenize(texts, PROMPT)
    assert res.meta["row"] == list(range(30))
    assert res.meta["id"] == want_ids
    assert res.meta["tokens"] == [len(s) for s in ids]
    assert res.meta["truncated"] == truncated and any(truncated) and not all(truncated)
    man = res.manifest
    assert man["complete"] and [s["rows"] for s in man["shards"]] == [[0, 8], [8, 16], [16, 24], [24, 30]]
    assert man["totals"] == {"rows": 30, "documents": 30, "skipped": 0, "shards": 4,
                             "tokens": sum(len(s) for s in ids), "truncated": sum(truncated)}
    assert int(m.group(3)) == man["totals"]["tokens"]
    assert man["options"]["prompt"] == PROMPT and man["model"]["max_seq_length"] == MSL
    assert man["runs"][0]["max_batch_tokens"] == model.engine.max_batch_tokens
    assert man["runs"][0]["device"] == str(model.device)
    assert [s["run"] for s in man["shards"]] == [1] * 4
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [".lock", "manifest.json"] + [f"shard-{k:05d}.{e}" for k in range(4) for e in ("npy", "meta.parquet")])


def test_multiple_inputs_and_jsonl_metadata(tmp_path, embed, model):
    a, b = make_texts(5, seed=2), make_texts(9, seed=3)
    rc, out, err = embed([write_text(tmp_path / "a.txt", a), write_jsonl(tmp_path / "b.jsonl", b)],
                         tmp_path / "out", "--shard-size", 4, "--meta-format", "jsonl", "--truncate-dim", 32)
    assert rc == 0, err
    res = read_output(tmp_path / "out")
    np.testing.assert_allclose(res.embeddings, model.encode(a + b, truncate_dim=32), atol=1e-5)
    assert res.meta["id"] == [None] * 5 + [f"doc-{i}" for i in range(9)]
    assert (tmp_path / "out" / "shard-00000.meta.jsonl").is_file()
    assert [i["rows"] for i in res.manifest["inputs"]] == [5, 9]


def test_help(capsys):
    for argv, words in [(["embed", "--help"], ["--precision", "--long", "--on-error"]),
                        (["--help"], ["embed", "verify"])]:
        with pytest.raises(SystemExit, match="^0$"):
            main(argv)
        out = capsys.readouterr().out
        assert all(w in out for w in words), out


def _subparser(parser, name):
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def _spelling(action):
    return (action.option_strings, action.dest, action.default, action.choices, action.help, action.metavar)


def test_the_commands_spell_the_model_options_once():
    """embed and serve take --model, --revision, --device and --dtype (and --max-batch-tokens)
    from the one shared module: same names, defaults, choices and help."""
    from modernbert_embed import cli_common
    from modernbert_embed.cli import build_parser

    fresh = argparse.ArgumentParser()
    cli_common.add_model_options(fresh)
    cli_common.add_max_batch_tokens(fresh)
    want = {a.dest: a for a in fresh._actions if a.option_strings and a.dest != "help"}
    assert set(want) == {"model", "revision", "device", "dtype", "max_batch_tokens"}
    repeatable = argparse.ArgumentParser()
    cli_common.add_model_options(repeatable, repeatable=True)  # serve's --model may be given once per model
    parser = build_parser()
    for name in ("embed", "serve"):
        got = {a.dest: a for a in _subparser(parser, name)._actions}
        for dest, action in want.items():
            if name == "serve" and dest == "model":
                action = next(a for a in repeatable._actions if a.dest == "model")
            if dest == "max_batch_tokens":  # the same option; embed adds a note on resuming
                assert got[dest].help.startswith(action.help)
                assert _spelling(got[dest])[:4] == _spelling(action)[:4]
            else:
                assert _spelling(got[dest]) == _spelling(action), (name, dest)
        assert got["max_batch_tokens"].type("7") == 7
        with pytest.raises(argparse.ArgumentTypeError, match="expected a number >= 1, got 0"):
            got["max_batch_tokens"].type("0")


def test_serve_parser_stands_without_the_main_command(tmp_path):
    """server.cli builds its parser from the shared module, not from modernbert_embed.cli (no
    import cycle): in a fresh process, building it leaves modernbert_embed.cli unimported."""
    code = ("import argparse, sys\n"
            "from modernbert_embed.server.cli import add_serve_parser\n"
            "add_serve_parser(argparse.ArgumentParser().add_subparsers())\n"
            "print(sorted(m for m in sys.modules if m == 'modernbert_embed.cli'))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_serve_is_not_a_corpus_command():
    # main runs serve itself; the table of the commands that share main's error handling has no
    # entry that could never run
    from modernbert_embed.cli import COMMANDS

    assert set(COMMANDS) == {"embed", "verify"}


@pytest.mark.slow
def test_real_processes_embed_and_verify(tmp_path, ckpt, model):
    """The one run of each command in a process of its own: `python -m modernbert_embed`."""
    texts = make_texts(9, seed=13)
    inp = write_jsonl(tmp_path / "c.jsonl", texts)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "modernbert_embed", "embed", str(inp), "-o", str(tmp_path / "out"),
                        "--model", str(ckpt), "--shard-size", "4", "--no-progress", *DEVICE_ARGS],
                       capture_output=True, text=True, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr
    assert SUMMARY.search(r.stdout).group(1) == "9", r.stdout
    np.testing.assert_allclose(read_output(tmp_path / "out").embeddings, model.encode(texts), atol=1e-5)
    r = subprocess.run([sys.executable, "-m", "modernbert_embed", "verify", str(tmp_path / "out")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "complete, 9 documents + 0 skipped = 9 rows in 3 shards; embeddings [9, 128] float32" in r.stdout


# ------------------------------------------------------------------------------- precisions
def test_precisions_and_calibration_consistency(tmp_path, embed):
    texts = make_texts(20, seed=4)
    inp = write_jsonl(tmp_path / "c.jsonl", texts)
    rc, _, err = embed([inp], tmp_path / "f32", "--shard-size", 5)
    assert rc == 0, err
    floats = read_output(tmp_path / "f32").embeddings  # the same shards, so the same floats
    for precision, width, dtype in [("float16", 128, np.float16), ("binary", 16, np.int8),
                                    ("ubinary", 16, np.uint8)]:
        rc, _, err = embed([inp], tmp_path / precision, "--shard-size", 5, "--precision", precision)
        assert rc == 0, err
        res = read_output(tmp_path / precision)
        assert res.embeddings.dtype == dtype and res.embeddings.shape == (20, width)
        np.testing.assert_array_equal(res.embeddings, Q.quantize_embeddings(floats, precision))

    # int8: ranges from an evenly spread sample of 8 rows, computed once, used by every shard
    rc, _, err = embed([inp], tmp_path / "i8", "--shard-size", 5, "--precision", "int8",
                       "--calibration-size", 8)
    assert rc == 0, err
    res = read_output(tmp_path / "i8")
    cal = res.manifest["calibration"]
    assert cal["source"] == "sample" and cal["rows"] == 8
    ranges = res.ranges
    sample_rows = [(i * 20) // 8 for i in range(8)]
    np.testing.assert_array_equal(ranges, Q.calibration_ranges(floats[sample_rows]))
    np.testing.assert_array_equal(res.embeddings, Q.quantize_embeddings(floats, "int8", ranges=ranges))
    assert res.embeddings.dtype == np.int8 and res.embeddings.shape == (20, 128)
    # shards calibrated each on their own would differ: the single scale is what keeps them comparable
    per_shard = np.concatenate([Q.quantize_embeddings(floats[i:i + 5], "int8") for i in range(0, 20, 5)])
    assert not np.array_equal(per_shard, res.embeddings)
    file_ranges, _ = Q.load_calibration(tmp_path / "i8" / "calibration.json")
    np.testing.assert_array_equal(file_ranges, ranges)

    # reuse: another corpus quantised on the first one's scale, through the calibration file
    other = write_jsonl(tmp_path / "o.jsonl", make_texts(12, seed=5))
    rc, _, err = embed([other], tmp_path / "u8", "--precision", "uint8", "--calibration",
                       tmp_path / "i8" / "calibration.json")
    assert rc == 0, err
    rc, _, err = embed([other], tmp_path / "o32")
    res = read_output(tmp_path / "u8")
    assert res.manifest["calibration"]["source"] == "file"
    np.testing.assert_array_equal(res.ranges, ranges)
    np.testing.assert_array_equal(
        res.embeddings, Q.quantize_embeddings(read_output(tmp_path / "o32").embeddings, "uint8", ranges=ranges))
    # a different calibration for an existing folder is refused
    np.save(tmp_path / "x.npy", floats[:3])
    rc, _, err = embed([inp], tmp_path / "i8", "--shard-size", 5, "--precision", "int8",
                       "--calibration-size", 8, "--calibration", tmp_path / "x.npy")
    assert rc == 2 and "calibration" in err


def test_chunk_mode(tmp_path, embed, model):
    texts = make_texts(12, seed=6, max_words=150)
    inp = write_jsonl(tmp_path / "c.jsonl", texts)
    rc, out, err = embed([inp], tmp_path / "out", "--long", "chunk", "--overlap", 6,
                         "--shard-size", 5, "--prompt-name", "search_document")
    assert rc == 0, err
    res = read_output(tmp_path / "out")
    ref = model.encode(texts, prompt_name="search_document", long="chunk", overlap=6)
    np.testing.assert_allclose(res.embeddings, ref, atol=1e-5)
    from modernbert_embed.chunking import split_long

    w = split_long(model.tokenizer, texts, PROMPT, MSL, 6)
    assert res.meta["windows"] == w.doc_windows and max(w.doc_windows) > 2
    assert res.meta["tokens"] == w.doc_tokens and not any(res.meta["truncated"])
    assert sum(s["windows"] for s in res.manifest["shards"]) == len(w.ids)
    assert int(SUMMARY.search(out).group(3)) == w.num_tokens  # tokens through the model


# ------------------------------------------------------------------------------- resume
def _launch(args, **kw):
    # One thread each: the reference run goes alongside, and spinning thread pools would fight
    # over the cores. Every run gets the same setting, so the arithmetic is the same.
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "modernbert_embed", "embed", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env, **kw)


def _shards_recorded(folder: Path) -> int:
    from modernbert_embed.corpus import CorpusError

    try:
        return len(shard_entries(folder))
    except CorpusError:  # no manifest yet
        return 0


@pytest.mark.slow
def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path, ckpt):
    texts = make_texts(240, seed=7, max_words=40)
    inp = write_jsonl(tmp_path / "c.jsonl", texts)
    common = [inp, "--model", ckpt, *DEVICE_ARGS, "--shard-size", 6, "--precision", "int8", "--calibration-size", 50,
              "--prompt-name", "search_document", "--no-progress"]

    ref = _launch([*common, "-o", tmp_path / "ref"])  # the uninterrupted run, alongside
    killed = tmp_path / "killed"
    p = _launch([*common, "-o", killed])
    deadline = time.monotonic() + 120
    while _shards_recorded(killed) < 1 and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert p.poll() is None, "the run ended before it could be killed; the test corpus is too small"
    os.kill(p.pid, signal.SIGKILL)
    p.communicate(timeout=30)
    assert p.returncode == -signal.SIGKILL
    man = json.loads((killed / "manifest.json").read_text())
    done = _shards_recorded(killed)
    assert not man["complete"] and 1 <= done < 40
    # debris of the interrupted shard: a half-written temporary and a stray file under the next name
    (killed / f".shard-{done:05d}.npy.tmp-999").write_bytes(b"partial")
    (killed / f"shard-{done:05d}.npy").write_bytes(b"not a finished shard")

    out, err = ref.communicate(timeout=240)
    assert ref.returncode == 0, err
    again = _launch([*common, "-o", killed])
    out, err = again.communicate(timeout=240)
    assert again.returncode == 0, err
    assert re.search(rf"embedded {240 - 6 * done} documents", out), out
    assert "warning" not in err  # the same settings as the killed run

    a, b = read_output(tmp_path / "ref"), read_output(killed)
    np.testing.assert_array_equal(a.embeddings, b.embeddings)
    assert a.meta == b.meta
    assert [s["files"] for s in a.manifest["shards"]] == [s["files"] for s in b.manifest["shards"]]
    assert a.manifest["calibration"] == b.manifest["calibration"]
    assert a.manifest["totals"] == b.manifest["totals"]
    assert sorted(os.listdir(tmp_path / "ref")) == sorted(os.listdir(killed))  # no debris left
    # the killed run is on record (it wrote shards) without numbers; the second one with its own
    killed_run, resumed = b.manifest["runs"]
    assert "seconds" not in killed_run and resumed["documents"] == 240 - 6 * done
    assert [s["run"] for s in b.manifest["shards"]] == [1] * done + [2] * (40 - done)


def test_stop_on_bad_row_then_resume_with_skip(tmp_path, embed):
    texts = make_texts(20, seed=8)
    lines = [json.dumps({"id": i, "text": t}) for i, t in enumerate(texts)]
    lines[12] = '{"id": 12, "text": '  # truncated JSON in shard 2
    inp = tmp_path / "c.jsonl"
    inp.write_text("\n".join(lines) + "\n")
    rc, _, err = embed([inp], tmp_path / "out", "--shard-size", 5)
    assert rc == 1 and f"{inp}, line 13: not valid JSON" in err
    assert [s["index"] for s in shard_entries(tmp_path / "out")] == [0, 1]
    assert not json.loads((tmp_path / "out" / "manifest.json").read_text())["complete"]
    # on_error may change between runs: it only decides what happens to bad rows not yet reached
    rc, out, err = embed([inp], tmp_path / "out", "--shard-size", 5, "--on-error", "skip")
    assert rc == 0, err
    assert "embedded 9 documents (1 rows skipped)" in out
    rc, _, err = embed([inp], tmp_path / "fresh", "--shard-size", 5, "--on-error", "skip")
    a, b = read_output(tmp_path / "out"), read_output(tmp_path / "fresh")
    np.testing.assert_array_equal(a.embeddings, b.embeddings)
    assert a.meta == b.meta and a.meta["row"] == [i for i in range(20) if i != 12]


def test_rerun_of_complete_output_and_damaged_shard(tmp_path, capsys, embed):
    inp = write_jsonl(tmp_path / "c.jsonl", make_texts(15, seed=9))
    args = [[inp], tmp_path / "out", "--shard-size", 4]
    assert embed(*args)[0] == 0
    before = read_output(tmp_path / "out")
    rc, out, _ = embed(*args)
    assert rc == 0 and "nothing to do" in out
    rc, out, _ = cli(capsys, "verify", tmp_path / "out")
    assert rc == 0 and "15 documents + 0 skipped = 15 rows in 4 shards" in out

    shard = tmp_path / "out" / "shard-00002.npy"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    rc, _, err = cli(capsys, "verify", tmp_path / "out")
    assert rc == 1 and "shard-00002.npy" in err and "checksum" in err
    rc, out, err = embed(*args)
    assert rc == 0 and "shard-00002.npy is missing or damaged" in err and "embedded 4 documents" in out
    after = read_output(tmp_path / "out")
    np.testing.assert_array_equal(before.embeddings, after.embeddings)
    assert without_run(before.manifest["shards"]) == without_run(after.manifest["shards"])
    assert [s["run"] for s in after.manifest["shards"]] == [1, 1, 2, 1]


def test_changed_inputs_are_refused(tmp_path, embed):
    texts = make_texts(10, seed=10)
    inp = write_jsonl(tmp_path / "c.jsonl", texts)
    assert embed([inp], tmp_path / "out", "--shard-size", 4)[0] == 0
    write_jsonl(inp, ["changed"] + texts[1:])
    rc, _, err = embed([inp], tmp_path / "out", "--shard-size", 4)
    assert rc == 2 and "rows 0..3 of shard 0 differ" in err
    write_jsonl(inp, texts + ["one more", "and another", "and a third"])
    rc, _, err = embed([inp], tmp_path / "out", "--shard-size", 4)
    assert rc == 2 and "inputs changed" in err


def test_changed_model_or_options_are_refused(tmp_path, embed, ckpt):
    from modernbert_embed.weights import write_random_checkpoint

    inp = write_jsonl(tmp_path / "c.jsonl", make_texts(6, seed=11))
    assert embed([inp], tmp_path / "out", "--shard-size", 4)[0] == 0
    rc, _, err = embed([inp], tmp_path / "out", "--shard-size", 4, "--precision", "binary")
    assert rc == 2 and 'options.precision: "float32" in the folder, "binary" now' in err
    assert "Use another output folder" in err
    rc, _, err = embed([inp], tmp_path / "out", "--shard-size", 4, "--prompt-name", "clustering")
    assert rc == 2 and "options.prompt" in err
    other = write_random_checkpoint(tmp_path / "other", REAL_VOCAB, seed=12,
                                    tokenizer_json=fixture_file("tokenizer.json"), max_seq_length=MSL)
    shutil.copytree(tmp_path / "out", tmp_path / "copy")
    rc, _, err = embed([inp], tmp_path / "copy", "--shard-size", 4, model_path=other, load=True)
    assert rc == 2 and "model.fingerprint" in err and "model.name" not in err
    # the same weights by another path are the same model
    rc, out, err = embed([inp], tmp_path / "out", "--shard-size", 4, model_path=os.path.relpath(ckpt), load=True)
    assert rc == 0 and "nothing to do" in out, err
    rc, _, err = embed([inp], tmp_path / "out", "--shard-size", 4, "--dtype", "bfloat16", load=True)
    assert rc == 2 and "model.dtype" in err
    # a model handed to the command must be what the options ask for
    rc, _, err = embed([inp], tmp_path / "out", "--shard-size", 4, "--dtype", "bfloat16")
    assert rc == 2 and "the model given runs float32, but the options ask for --dtype bfloat16" in err
    import fcntl

    with open(tmp_path / "out" / ".lock") as held:  # another run writing there
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        rc, _, err = embed([inp], tmp_path / "out", "--shard-size", 4)
        assert rc == 2 and "another modernbert-embed is writing into" in err
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    rc, _, err = embed([inp], tmp_path / "foreign")
    assert rc == 2 and "not empty and has no manifest.json" in err


# ------------------------------------------------------------------------------- bad input
def _bad_cases(tmp_path):
    j = tmp_path / "c.jsonl"
    yield "missing", [tmp_path / "nope.jsonl"], [], 2, f"input not found: {tmp_path / 'nope.jsonl'}"
    j.write_text('{"text": "ok"}\n{"text": "fine"}\n{"text": oops}\n')
    yield "json", [j], [], 1, f"{j}, line 3: not valid JSON"
    k = tmp_path / "k.jsonl"
    k.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    yield "field", [k], [], 1, f"{k}, line 2: no field 'text' (fields: body)"
    n = tmp_path / "n.jsonl"
    n.write_text('{"text": "ok"}\n{"text": 42}\n')
    yield "number", [n], [], 1, f"{n}, line 2: field 'text' is a number, not a string"
    z = tmp_path / "z.jsonl"
    z.write_text('{"text": null}\n')
    yield "null", [z], [], 1, f"{z}, line 1: field 'text' is null, not a string"
    a = tmp_path / "a.jsonl"
    a.write_text('["x"]\n')
    yield "array-line", [a], [], 1, f"{a}, line 1: a list where a JSON object was expected"
    arr = tmp_path / "arr.json"
    arr.write_text('[\n  {"text": "x"},\n  {"text": "y"}\n]\n')
    yield "json-array", [arr], [], 1, "a JSON array, not JSON Lines"
    t = tmp_path / "t.txt"
    t.write_bytes(b"fine\nbad \xff byte\n")
    yield "utf8", [t], [], 1, f"{t}, line 2: not valid UTF-8 (byte 0xff at byte 5 of the line)"
    e = tmp_path / "e.txt"
    e.write_text("")
    yield "empty", [e], [], 1, f"no documents to embed: {e} is empty"
    ok = tmp_path / "ok.txt"
    ok.write_text("one\n")
    yield "one-empty", [ok, e], [], 1, f"{e}: empty input"
    i = tmp_path / "i.jsonl"
    i.write_text('{"text": "a", "key": 1}\n{"text": "b"}\n')
    yield "id-required", [i], ["--id-field", "key"], 1, f"{i}, line 2: no id field 'key'"
    b = tmp_path / "b.jsonl"
    b.write_text('{"text": "a", "id": [1]}\n')
    yield "id-type", [b], [], 1, f"{b}, line 1: field 'id' is a list; ids must be strings or integers"
    u = tmp_path / "u.csv"
    u.write_text("text\nx\n")
    yield "suffix", [u], [], 1, "--input-format"
    d = tmp_path / "dir"
    d.mkdir()
    yield "folder", [d], [], 2, "is a folder"


def test_bad_input_is_named_by_file_and_line(tmp_path, embed):
    for name, inputs, extra, code, message in _bad_cases(tmp_path):
        rc, _, err = embed(inputs, tmp_path / f"out-{name}", *extra)
        assert rc == code, (name, err)
        assert message in err, (name, err)


def test_bad_parquet_is_named_by_file_and_row(tmp_path, embed):
    p = write_parquet(tmp_path / "p.parquet", {"text": ["a", "b", None, "d"]})
    rc, _, err = embed([p], tmp_path / "o1")
    assert rc == 1 and f"{p}, row 2: 'text' is null" in err
    q = write_parquet(tmp_path / "q.parquet", {"body": ["a"]})
    rc, _, err = embed([q], tmp_path / "o2")
    assert rc == 1 and f"{q}: no column 'text' (columns: body)" in err
    r = write_parquet(tmp_path / "r.parquet", {"text": [1, 2]})
    rc, _, err = embed([r], tmp_path / "o3")
    assert rc == 1 and "column 'text' holds int64, not strings" in err
    s = tmp_path / "s.parquet"
    s.write_bytes(b"PAR1 not really")
    rc, _, err = embed([s], tmp_path / "o4")
    assert rc == 1 and f"{s}: not a readable Parquet file" in err


def test_on_error_skip_records_every_skipped_row(tmp_path, embed, model):
    texts = make_texts(25, seed=12)
    lines = [json.dumps({"id": f"d{i}", "text": t}) for i, t in enumerate(texts)]
    bad = {3: '{"text": 7}', 9: "not json", 10: "", 22: '{"title": "x"}'}
    for i, line in bad.items():
        lines[i] = line
    j = tmp_path / "c.jsonl"
    j.write_text("\n".join(lines) + "\n")
    t = tmp_path / "t.txt"
    t.write_bytes(b"plain one\n\xc3\x28 broken\nplain three\n")
    e = tmp_path / "empty.txt"
    e.write_text("")
    rc, out, err = embed([j, e, t], tmp_path / "out", "--shard-size", 6, "--on-error", "skip")
    assert rc == 0, err
    assert "embedded 23 documents (5 rows skipped)" in out
    res = read_output(tmp_path / "out")
    man = res.manifest
    skipped = [s for sh in man["shards"] for s in sh["skipped"]]
    assert [s["row"] for s in skipped] == [3, 9, 10, 22, 26]
    assert [s["where"] for s in skipped] == [f"{j}, line 4", f"{j}, line 10", f"{j}, line 11", f"{j}, line 23",
                                             f"{t}, line 2"]
    assert "is a number" in skipped[0]["error"] and "blank line" in skipped[2]["error"]
    assert man["totals"]["rows"] == 28 and man["totals"]["documents"] + man["totals"]["skipped"] == 28
    assert all(s["documents"] + len(s["skipped"]) == s["rows"][1] - s["rows"][0] for s in man["shards"])
    assert man["empty_inputs"] == [str(e)]
    good = [i for i in range(25) if i not in bad]
    assert res.meta["row"] == good + [25, 27]
    assert res.meta["id"] == [f"d{i}" for i in good] + [None, None]
    want = [texts[i] for i in good] + ["plain one", "plain three"]
    np.testing.assert_allclose(res.embeddings, model.encode(want), atol=1e-5)


def test_refused_options(tmp_path, embed, capsys):
    inp = write_text(tmp_path / "c.txt", ["x"])
    for extra, message in [(["--overlap", "3"], "--overlap applies to --long='chunk' only"),
                           (["--calibration", "c.json"], "--calibration applies to --precision int8"),
                           (["--truncate-dim", "999"], "--truncate-dim must be in 1..128, got 999"),
                           # an empty name is refused, not taken for the default field
                           (["--id-field", ""], "--id-field must name a field, got ''"),
                           (["--text-field", ""], "--text-field must name a field, got ''")]:
        rc, _, err = embed([inp], tmp_path / "out", *extra)
        assert rc == 2 and message in err, err
    assert not (tmp_path / "out").exists()  # refused before anything is written
    for extra, message in [(["--precision", "int4"], "invalid choice: 'int4'"),
                           (["--prompt", "x", "--prompt-name", "clustering"], "not allowed with argument")]:
        with pytest.raises(SystemExit, match="^2$"):
            main(["embed", str(inp), "-o", str(tmp_path / "o"), *extra])
        assert message in capsys.readouterr().err
