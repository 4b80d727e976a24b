"""The CPU's heap (`devices.keep_cpu_heap`): glibc keeps freed memory between ops, so a warm
forward does not fault its activations in again page by page. Each case runs in its own process
(the allocator's settings are per process and set once)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest


SCRIPT = textwrap.dedent("""
    import json, resource, sys, threading
    import torch
    from modernbert_embed import Embedder, devices
    from modernbert_embed.weights import small_config, write_random_checkpoint

    folder = write_random_checkpoint(sys.argv[1], small_config(hidden_size=256, intermediate_size=512,
                                                               num_attention_heads=4), seed=0)
    model = Embedder.from_pretrained(folder, device="cpu")
    ids = [[1] + [5 + (i * 7 + j) % 1000 for j in range(n)] + [2] for i, n in enumerate([300, 180, 250] * 8)]
    out = {}

    def run(where):
        with torch.inference_mode():
            model.encode_tokens(ids)  # warm: the shapes, the heap
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(3):
                model.encode_tokens(ids)
            out[where] = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3

    run("main thread")
    worker = threading.Thread(target=run, args=("another thread",))  # a server's worker
    worker.start(); worker.join()
    out["state"] = devices.keep_cpu_heap()
    print(json.dumps(out))
""")


def _faults(tmp_path, **env_extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith("MALLOC_") or k in ("GLIBC_TUNABLES", "LD_PRELOAD"))}
    env.update(env_extra)
    r = subprocess.run([sys.executable, "-P", "-c", SCRIPT, str(tmp_path / "ckpt")], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


LINUX_ONLY = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc: Linux only")


@LINUX_ONLY
def test_a_warm_forward_does_not_fault_its_memory_in_again(tmp_path):
    kept = _faults(tmp_path)
    if not kept["state"].startswith("glibc keeps"):
        pytest.skip(f"the allocator was {kept['state']}")
    left = _faults(tmp_path, MODERNBERT_EMBED_KEEP_HEAP="0")
    assert left["state"].startswith("left as it is"), left
    # glibc's own behaviour: the same forwards fault thousands of pages in, every time (unless the
    # kernel backs fresh memory with huge pages, which leaves little to compare)
    if left["main thread"] < 500:
        pytest.skip(f"left alone, glibc's forwards faulted only {left['main thread']:.0f} pages in here")
    for where in ("main thread", "another thread"):
        assert kept[where] < left["main thread"] / 5, (kept, left)


@LINUX_ONLY
def test_thresholds_set_in_the_environment_are_left_alone(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MODERNBERT_EMBED_KEEP_HEAP"}
    got = subprocess.run([sys.executable, "-P", "-c", "from modernbert_embed import devices; print(devices.keep_cpu_heap())"],
                         cwd=tmp_path, env={**env, "MALLOC_TRIM_THRESHOLD_": "1000000"},
                         capture_output=True, text=True, timeout=120)
    assert got.returncode == 0, got.stderr
    assert got.stdout.strip() == "left as it is (MALLOC_TRIM_THRESHOLD_ set)"
