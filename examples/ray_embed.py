"""Embed a corpus with Ray Data: Parquet or JSON Lines in, Parquet out.

    python examples/ray_embed.py corpus/*.parquet -o embeddings/ --prompt-name search_document
    python examples/ray_embed.py docs.jsonl -o out/ --model ./my-checkpoint --num-actors 2
    python examples/ray_embed.py pairs.jsonl -o scored/ --model Alibaba-NLP/gte-reranker-modernbert-base \
        --text-field query --text-pair-field document

Every input column is kept; `embedding` is added as a fixed-size list of float32 (or of int8 /
uint8 codes with --precision). With a classifier or cross-encoder folder, `scores` (float32, or a
fixed-size list for several labels) and `label` (int32) are added instead. On a cluster, start Ray
first and pass --address auto; the model must be reachable from every node (a Hub id, or a path
on shared storage). Where the cluster has GPUs, each actor takes one.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("inputs", nargs="+", help="Parquet (.parquet) or JSON Lines (.jsonl) files or folders")
    p.add_argument("-o", "--output", required=True, help="folder for the Parquet output")
    p.add_argument("--model", default="nomic-ai/modernbert-embed-base")
    p.add_argument("--text-field", default="text")
    p.add_argument("--output-column", default="embedding")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--prompt-name", default=None)
    g.add_argument("--prompt", default=None)
    p.add_argument("--truncate-dim", type=int, default=None)
    n = p.add_mutually_exclusive_group()
    n.add_argument("--normalize", dest="normalize", action="store_const", const=True, default=None,
                   help="default: as the model's folder says (a Normalize module listed)")
    n.add_argument("--no-normalize", dest="normalize", action="store_const", const=False)
    p.add_argument("--text-pair-field", default=None, help="classifiers: the second text of each pair")
    p.add_argument("--scores", default="activated", choices=["activated", "logits", "softmax"],
                   help="classifiers: what to write (default: the folder's activation, as CrossEncoder.predict)")
    p.add_argument("--precision", default="float32",
                   choices=["float32", "float16", "int8", "uint8", "binary", "ubinary"])
    p.add_argument("--calibration", default=None,
                   help="int8/uint8: ranges file (calibration.json or manifest.json of the embed command)")
    p.add_argument("--long", default="truncate", choices=["truncate", "chunk"])
    p.add_argument("--max-batch-tokens", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=512, help="rows per map_batches call")
    p.add_argument("--num-actors", type=int, default=None, help="default: one per GPU, or 1 without GPUs")
    p.add_argument("--num-gpus", type=float, default=None, help="per actor (default: 1 where GPUs exist)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: start a local one)")
    return p.parse_args(argv)


def read_dataset(inputs: list[str]):
    rd = importlib.import_module("ray.data")
    kinds = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "json", ".ndjson": "json", ".json": "json"}
    found = set()
    for path in inputs:
        p = Path(path)
        if p.is_dir():
            found |= {kinds[f.suffix] for f in p.iterdir() if f.suffix in kinds}
        elif p.suffix in kinds:
            found.add(kinds[p.suffix])
        else:
            raise SystemExit(f"{path}: expected .parquet or .jsonl files (or a folder of them)")
    if len(found) != 1:
        raise SystemExit(f"give inputs of one kind (Parquet or JSON Lines), got {sorted(found) or 'none'}")
    if found == {"parquet"}:
        return rd.read_parquet(inputs)
    return rd.read_json(inputs, lines=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    ray = importlib.import_module("ray")
    from modernbert_embed.ray import embed_dataset, score_dataset
    from modernbert_embed.weights import CLASSIFIER, Checkpoint

    if not ray.is_initialized():
        ray.init(address=args.address)
    classifier = Checkpoint.open(args.model).kind == CLASSIFIER  # what the folder is decides the output
    if classifier:
        run = score_dataset
        options = dict(text_column=args.text_field, text_pair_column=args.text_pair_field, scores=args.scores,
                       max_batch_tokens=args.max_batch_tokens)
    else:
        run = embed_dataset
        options = dict(text_column=args.text_field, output_column=args.output_column, prompt_name=args.prompt_name,
                       prompt=args.prompt, truncate_dim=args.truncate_dim, normalize_embeddings=args.normalize,
                       precision=args.precision, long=args.long, max_batch_tokens=args.max_batch_tokens)
        if args.calibration:
            from modernbert_embed.quantize import load_calibration

            options["ranges"] = load_calibration(args.calibration)[0].tolist()
    t0 = time.perf_counter()
    ds = read_dataset(args.inputs)
    ds = run(ds, args.model, num_actors=args.num_actors, num_gpus=args.num_gpus, batch_size=args.batch_size,
             **options)
    ds.write_parquet(args.output)
    seconds = time.perf_counter() - t0
    rows = importlib.import_module("ray.data").read_parquet(args.output).count()
    print(f"wrote {rows} rows to {args.output} in {seconds:.1f} s ({rows / seconds:.1f} rows/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
