"""`make demo`: the model card's example, end to end.

With the real weights (Hub, HF cache, or a folder given as the first argument) it prints the
card's similarity matrix at 768 and 256 dims (expected 0.7214 / 0.3260 and 0.7759 / 0.3419).
When no copy can be had, it says so in one sentence and runs the same pipeline on a random-weight
checkpoint written to a temporary folder: the numbers then mean nothing; it shows the engine runs.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

from modernbert_embed.weights.resolve import DEFAULT_MODEL

QUERIES = ["What is TSNE?", "Who is Laurens van der Maaten?"]
DOCUMENTS = ["TSNE is a dimensionality reduction algorithm created by Laurens van Der Maaten"]


def _tokenizer_for_random_model(folder: Path) -> Path:
    """The real tokenizer if any copy is at hand, else a small byte-level BPE trained here."""
    given = os.environ.get("MODERNBERT_EMBED_TOKENIZER")
    if given and Path(given).is_file():
        return Path(given)
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(DEFAULT_MODEL, "tokenizer.json", local_files_only=True))
    except Exception:
        pass
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, show_progress=False, special_tokens=["[UNK]", "[CLS]", "[SEP]", "[PAD]"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(QUERIES + DOCUMENTS + [__doc__], trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 1), ("[SEP]", 2)]
    )
    path = folder / "demo-tokenizer.json"
    tok.save(str(path))
    return path


def _show(model, truncate_dim=None):
    q = model.encode_query(QUERIES, truncate_dim=truncate_dim)
    d = model.encode_document(DOCUMENTS, truncate_dim=truncate_dim)
    sim = model.similarity(q, d)
    dims = truncate_dim or model.embedding_dim
    print(f"similarity at {dims} dims (queries x document):")
    for text, row in zip(QUERIES, sim.tolist()):
        print(f"  {row[0]:.4f}  {text}")


def main(argv=None) -> int:
    from modernbert_embed import CheckpointError, Embedder

    argv = sys.argv[1:] if argv is None else argv
    source = argv[0] if argv else DEFAULT_MODEL
    t0 = time.perf_counter()
    try:
        model = Embedder.from_pretrained(source)
        random_weights = False
    except CheckpointError as e:
        print(f"The real weights could not be loaded ({e}), so this demo runs on random weights instead.")
        from modernbert_embed.weights import write_random_checkpoint

        with tempfile.TemporaryDirectory(prefix="modernbert-embed-demo-") as tmp:  # 600 MB, removed after loading
            tmp = Path(tmp)
            write_random_checkpoint(tmp, None, seed=0, tokenizer_json=_tokenizer_for_random_model(tmp))
            model = Embedder.from_pretrained(tmp)
            model.name = "random weights (base shape)"
        random_weights = True
    print(f"loaded {model.name} on {model.device} ({model.dtype}) in {time.perf_counter() - t0:.1f} s")
    if random_weights:
        print("*" * 78)
        print("* RANDOM WEIGHTS: the similarities below mean nothing; they show the engine  *")
        print("* runs end to end (tokenise, pack, encode unpadded, pool, Matryoshka).       *")
        print("*" * 78)
    _show(model)
    _show(model, truncate_dim=256)
    if not random_weights:
        print("model card: 0.7214 / 0.3260 at 768 dims, 0.7759 / 0.3419 at 256 dims")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
