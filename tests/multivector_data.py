"""What the multi-vector (ColBERT) tests share: random folders in PyLate's layout and the texts.

The folders have the real widths (hidden 768, 12 heads, intermediate 1152, the window of +-64),
ModernBERT's tokenizer with `[Q] ` / `[D] ` added as PyLate adds them (ids 50368 / 50369, vocab
50370) and a `1_Dense` 768 -> 128; four layers (global, local, local, global) keep them quick.
One set of weights, one folder per set of ColBERT fields: the others link to its files and carry
their own config_sentence_transformers.json.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from modernbert_embed.weights import colbert_st_config, small_config, write_random_checkpoint

from conftest import fixture_file

COLBERT_CONFIG = small_config(
    vocab_size=50370, hidden_size=768, intermediate_size=1152, num_attention_heads=12, num_hidden_layers=4,
    pad_token_id=50283, cls_token_id=50281, sep_token_id=50282, bos_token_id=50281, eos_token_id=50282)

# The ColBERT fields of each variant: (do_query_expansion, attend_to_expansion_tokens).
VARIANTS = {
    "expand": dict(do_query_expansion=True, attend_to_expansion_tokens=False),  # GTE-ModernColBERT-v1's
    "expand-attend": dict(do_query_expansion=True, attend_to_expansion_tokens=True),
    "no-expansion": dict(do_query_expansion=False, attend_to_expansion_tokens=False),
    # expansion tokens more than a window past the last real token: rows with no key at all
    "expand-long": dict(do_query_expansion=True, attend_to_expansion_tokens=False, query_length=200),
}

_SENTENCE = ("Late interaction keeps one vector per token, and MaxSim lets every query token find "
             "its best match in the document; punctuation (commas, periods!) is skipped. ")
QUERIES = [
    "what is late interaction?",
    "short",
    "ColBERT, MaxSim; and [MASK] tokens: do they attend?",
    "  a query with surrounding white space  ",
    " ".join(["a query longer than the query length of thirty-two tokens"] * 6),  # truncated
]
DOCUMENTS = [
    "Paris is the capital of France.",
    _SENTENCE * 3,  # past the 128-token window
    _SENTENCE * 9,  # past document_length (300): truncated
    "x",
    "!!! ... ,,, ???",  # almost all skiplist
    "ModernBERT alternates global attention with a local window of 128 tokens.",
]


def write_variants(root: Path) -> dict[str, Path]:
    """One folder per entry of VARIANTS under `root` (the weights written once)."""
    base = write_random_checkpoint(root / "expand", COLBERT_CONFIG, seed=7,
                                   tokenizer_json=fixture_file("tokenizer.json"),
                                   colbert=colbert_st_config(**VARIANTS["expand"]), dense_dim=128)
    folders = {"expand": base}
    for name, fields in VARIANTS.items():
        if name == "expand":
            continue
        folder = root / name
        folder.mkdir()
        for f in base.iterdir():
            if f.name != "config_sentence_transformers.json":
                os.symlink(f, folder / f.name)
        (folder / "config_sentence_transformers.json").write_text(json.dumps(colbert_st_config(**fields), indent=2))
        folders[name] = folder
    return folders
