"""PyLate's own encoding of texts with ColBERT folders, for the parity tests: run by the python of
PyLate's virtual environment (`make pylate-venv`), never imported by the tests' own interpreter.

    python tests/pylate_reference.py IN.json

IN.json: {"queries": [...], "documents": [...], "batch_size": 32, "runs": [{"folder": F, "out":
OUT.npz}, ...]}. Each OUT.npz holds q<i> and d<i>, the float32 token vectors
`pylate.models.ColBERT(F).encode(..., is_query=...)` returns (fp32 on the CPU, transformers' SDPA
attention), the MaxSim scores `pylate.scores.colbert_scores` of every query with every document
(`scores`, each pair scored on its own), and the ids PyLate gives the prefix tokens (`prefix_ids`)
and the [MASK] padding (`pad_id`).
"""

import json
import sys

import numpy as np
import torch


def run(folder: str, out: str, spec: dict) -> None:
    from pylate import models, scores

    model = models.ColBERT(folder, device="cpu", model_kwargs={"attn_implementation": "sdpa"})
    bs = spec.get("batch_size", 32)
    q = model.encode(spec["queries"], is_query=True, batch_size=bs, convert_to_numpy=True)
    d = model.encode(spec["documents"], is_query=False, batch_size=bs, convert_to_numpy=True)
    arrays = {f"q{i}": np.asarray(a, dtype=np.float32) for i, a in enumerate(q)}
    arrays.update({f"d{i}": np.asarray(a, dtype=np.float32) for i, a in enumerate(d)})
    t = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float32))[None]  # noqa: E731
    arrays["scores"] = np.array([[float(scores.colbert_scores(t(a), t(b))[0, 0]) for b in d] for a in q],
                                dtype=np.float32).reshape(len(q), len(d))
    arrays["prefix_ids"] = np.array([model.query_prefix_id, model.document_prefix_id], dtype=np.int64)
    arrays["pad_id"] = np.array(model.tokenizer.pad_token_id, dtype=np.int64)
    np.savez(out, **arrays)


def main(inp: str) -> None:
    spec = json.loads(open(inp, encoding="utf-8").read())
    for r in spec["runs"]:
        run(r["folder"], r["out"], spec)


if __name__ == "__main__":
    main(sys.argv[1])
