"""PyLate's `ColBERT.encode` as a long-lived worker for the late-interaction benchmark: run by the
python of PyLate's own virtual environment (`make pylate-venv`), never imported by the benchmark.

    python -P benchmarks/harness/pylate_worker.py

PyLate pins sentence-transformers 5.3 and transformers <= 5.3 and cannot share the benchmark's
process, so it runs here and takes its turn in the rounds on command. The protocol is one JSON
object per line: on stdin the set-up first, {"folder", "threads", "batch_size", "workloads":
{name: {"texts": [...], "is_query": bool}}} (the texts are sent once, so that no round pays for
their transfer), answered {"ready": true, "label": ...}; then commands

- {"cmd": "run", "workload": name, "n": k}: encode the first k texts of the workload, answered
  {"seconds": s} (the worker's own perf_counter around `encode` alone), or {"error": ...};
- {"cmd": "vectors", "workload": name, "n": k, "out": path}: the same, the token vectors written to
  path (.npz, v<i> float32) for the parity check, answered {"seconds": s};
- {"cmd": "quit"}.

Replies go to the stdout the worker was started with; anything PyLate or its libraries print goes
to stderr, so that no stray line can break the protocol.
"""

import json
import os
import sys
import time
import traceback


def main() -> int:
    reply_fd = os.dup(1)
    os.dup2(2, 1)  # print() of any library lands on stderr
    replies = os.fdopen(reply_fd, "w", buffering=1)

    def send(obj):
        replies.write(json.dumps(obj) + "\n")
        replies.flush()

    setup = json.loads(sys.stdin.readline())
    import numpy as np
    import torch

    if setup.get("threads"):
        torch.set_num_threads(int(setup["threads"]))
    try:
        import pylate
        from pylate import models

        model = models.ColBERT(setup["folder"], device="cpu", model_kwargs={"attn_implementation": "sdpa"})
    except Exception as e:
        send({"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]})
        return 1
    workloads = setup["workloads"]
    batch_size = int(setup.get("batch_size", 32))
    send({"ready": True, "label": f"PyLate {pylate.__version__} ColBERT.encode (sdpa, batch {batch_size}, "
                                  f"{torch.get_num_threads()} threads)"})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("cmd") == "quit":
            break
        try:
            work = workloads[cmd["workload"]]
            texts = work["texts"][:int(cmd.get("n", len(work["texts"])))]
            t0 = time.perf_counter()
            out = model.encode(texts, is_query=bool(work["is_query"]), batch_size=batch_size,
                               convert_to_numpy=True, show_progress_bar=False)
            seconds = time.perf_counter() - t0
            if cmd.get("cmd") == "vectors":
                np.savez(cmd["out"], **{f"v{i}": np.asarray(a, dtype=np.float32) for i, a in enumerate(out)})
            elif cmd.get("cmd") != "run":
                raise ValueError(f"unknown command {cmd.get('cmd')!r}")
            send({"seconds": seconds, "count": len(out)})
        except Exception as e:
            send({"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
