"""The `modernbert-embed` command (also `python -m modernbert_embed`).

    modernbert-embed embed INPUT... -o OUTDIR [options]   embed a corpus into a folder of shards (or,
                                                           with a classifier, score it: scores and labels;
                                                           with a ColBERT model: token vectors + offsets)
    modernbert-embed verify OUTDIR                         check a finished folder (files, checksums, counts)
    modernbert-embed serve [--model ...] [--port 8080]     an HTTP server: OpenAI and TEI embedding APIs

Exit status: 0 done (or nothing left to do), 1 bad input or a failure while embedding, 2 a refused
invocation (bad options, missing inputs, an output folder of a different job), 130 interrupted.
A killed or interrupted `embed` resumes where it stopped when the same command is run again.
"""

from __future__ import annotations

import argparse
import sys

from . import __version__, quantize as Q
from .cli_common import Formatter, add_max_batch_tokens, add_model_options, int_at_least
from .corpus.options import MULTIVECTOR_MODES, SCORE_VALUES
from .server.cli import add_serve_parser, run_serve
from .tokenizer import PROMPTS


_positive = int_at_least(1)
_non_negative = int_at_least(0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modernbert-embed",
        description="Text embeddings with ModernBERT (nomic-ai/modernbert-embed-base and its family).",
        epilog="Exit status: 0 done, 1 bad input or failure, 2 refused invocation, 130 interrupted.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    e = sub.add_parser(
        "embed", help="embed a corpus into a folder of shards (resumable); a classifier scores it",
        description="Embed every document of the inputs into OUTDIR: shard-NNNNN.npy embeddings, a "
                    "row-aligned shard-NNNNN.meta.parquet (or .jsonl) of row, id, tokens and truncated, "
                    "and manifest.json. With a classifier or cross-encoder (a "
                    "ModernBertForSequenceClassification folder), each shard holds float32 scores "
                    "(shard-NNNNN.scores.npy, [n] for one label, else [n, labels]) and the int32 label id "
                    "of each document (shard-NNNNN.labels.npy) instead. With a multi-vector (ColBERT) "
                    "model, each shard holds every document's token vectors in one flat array "
                    "(shard-NNNNN.tokens.npy, [total_tokens, dim], float16 unless --precision float32) and "
                    "int64 offsets (shard-NNNNN.offsets.npy, document i is tokens[offsets[i]:offsets[i+1]]). "
                    "Run the same command again after a crash or kill to resume.",
        formatter_class=Formatter)
    e.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="text (.txt: one document a line, blank lines included), JSON Lines (.jsonl) or "
                        "Parquet (.parquet) files")
    e.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output folder (new, empty, or "
                   "the folder of an unfinished run of the same command)")
    g = e.add_argument_group("model")
    add_model_options(g)
    add_max_batch_tokens(g, "; may change on a resume, which is recorded and warned about (other batches "
                            "can change the last bits of the floats)")
    g = e.add_argument_group("input")
    g.add_argument("--input-format", default="auto", choices=["auto", "text", "jsonl", "parquet"],
                   help="auto: from the file name")
    g.add_argument("--text-field", default="text", help="JSONL field / Parquet column holding the text (with "
                   "--text-pair-field: the first text of each pair)")
    g.add_argument("--text-pair-field", default=None, metavar="FIELD",
                   help="classifiers (cross-encoders): the JSONL field / Parquet column holding the second "
                        "text of each pair, scored as [CLS] text [SEP] text_pair [SEP] (e.g. --text-field "
                        "query --text-pair-field document); without it each row is one text")
    g.add_argument("--id-field", default=None, metavar="FIELD",
                   help="field / column holding each document's id; given, every row must have it "
                        "(default: 'id' where present)")
    g.add_argument("--on-error", default="stop", choices=["stop", "skip"],
                   help="a row that cannot be embedded (invalid UTF-8 or JSON, missing or non-string text, "
                        "an embedding that stays NaN or infinite when embedded alone): stop with its file and "
                        "line, or skip it and list it in the manifest")
    g = e.add_argument_group("embedding (embedders only)")
    p = g.add_mutually_exclusive_group()
    p.add_argument("--prompt-name", default=None, metavar="NAME",
                   help="a prompt of the model's folder (config_sentence_transformers.json) or one the model "
                        f"was trained with ({', '.join(sorted(PROMPTS))}); use search_document for a retrieval "
                        "corpus (default: the folder's default_prompt_name, if any)")
    p.add_argument("--prompt", default=None, metavar="STR", help="a prefix of your own, prepended as given")
    g.add_argument("--truncate-dim", type=_positive, default=None, metavar="N",
                   help="keep the first N dimensions (Matryoshka), then normalise")
    n = g.add_mutually_exclusive_group()
    n.add_argument("--normalize", dest="normalize", action="store_const", const=True, default=None,
                   help="store unit-length embeddings (default: as the model's folder says: normalised when it "
                        "lists a Normalize module)")
    n.add_argument("--no-normalize", dest="normalize", action="store_const", const=False,
                   help="store unnormalised embeddings")
    g.add_argument("--long", default="truncate", choices=["truncate", "chunk"],
                   help="documents over max_seq_length: truncate (counted and flagged) or chunk "
                        "(overlapping windows, token-weighted mean, normalised)")
    g.add_argument("--overlap", type=_non_negative, default=None, metavar="TOKENS",
                   help="tokens shared by consecutive windows with --long chunk (default: 128, or a "
                        "quarter of a window when smaller)")
    g = e.add_argument_group("scores (classifiers and cross-encoders only)")
    g.add_argument("--scores", default=None, choices=list(SCORE_VALUES),
                   help="activated: the folder's score activation on the logits, as CrossEncoder.predict "
                        "(sigmoid for one label, identity for more, unless the folder names another); logits: "
                        "the raw logits; softmax: the activation, then a softmax over the labels (default: "
                        "activated). The label id is decided on the logits either way")
    g = e.add_argument_group("token vectors (multi-vector / ColBERT models only)")
    g.add_argument("--multivector-mode", default=None, choices=list(MULTIVECTOR_MODES),
                   help="document: the documents' token vectors, as MultiVectorEncoder.encode_document (the "
                        "document prefix, document_length, the skiplist's tokens left out); query: as "
                        "encode_query (the query prefix, query_length, [MASK] expansion), to precompute a "
                        "query set (default: document). --truncate-dim keeps the first N features of each "
                        "vector, normalised again")
    g = e.add_argument_group("output")
    g.add_argument("--precision", default=None, choices=list(Q.PRECISIONS),
                   help="int8/uint8: per-dimension ranges from a calibration sample, stored in the manifest; "
                        "binary/ubinary: packed sign bits (768 dims -> 96 bytes). Default float32; float16 "
                        "for a multi-vector model's token vectors (float16 or float32 only)")
    g.add_argument("--calibration", default=None, metavar="FILE",
                   help="int8/uint8 ranges to reuse: a calibration.json or manifest.json of an earlier "
                        "run, or a .npy of float embeddings")
    g.add_argument("--calibration-size", type=_positive, default=1000, metavar="N",
                   help="documents, spread evenly over the input, to calibrate int8/uint8 on")
    g.add_argument("--shard-size", type=_positive, default=10000, metavar="N", help="input rows per shard")
    g.add_argument("--meta-format", default=None, choices=["parquet", "jsonl"],
                   help="row metadata files (default: parquet when pyarrow is installed, else jsonl)")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no summary line")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")

    v = sub.add_parser("verify", help="check a finished output folder: files, checksums and counts")
    v.add_argument("output", metavar="OUTDIR")
    add_serve_parser(sub)
    return parser


def _options(args):
    from .corpus import EmbedOptions

    return EmbedOptions(
        inputs=list(args.inputs), output=args.output, model=args.model, revision=args.revision,
        input_format=args.input_format, text_field=args.text_field, text_pair_field=args.text_pair_field,
        id_field="id" if args.id_field is None else args.id_field, id_required=args.id_field is not None,
        scores=args.scores, multivector_mode=args.multivector_mode,
        prompt=args.prompt, prompt_name=args.prompt_name, truncate_dim=args.truncate_dim, normalize=args.normalize,
        precision=args.precision, calibration=args.calibration, calibration_size=args.calibration_size,
        long=args.long, overlap=args.overlap, shard_size=args.shard_size, meta_format=args.meta_format,
        on_error=args.on_error, max_batch_tokens=args.max_batch_tokens, device=args.device, dtype=args.dtype,
        progress=args.progress, quiet=args.quiet,
    )


def _embed(args, model=None) -> int:
    from .corpus import CorpusJob

    result = CorpusJob(_options(args), model=model).run()
    if not args.quiet:
        print(result.summary(), flush=True)
    return 0


def _verify(args, model=None) -> int:
    from .corpus import verify_output

    print(verify_output(args.output), flush=True)
    return 0


# The function that runs each subcommand but serve: (parsed arguments, a loaded model or None) ->
# exit status. `serve` loads its own model and reports its own errors (`server.cli.run_serve`).
COMMANDS = {"embed": _embed, "verify": _verify}


def main(argv=None, embedder=None, model=None) -> int:
    """Run the command line `argv` (default: sys.argv[1:]); returns the exit status. `model`: an
    already loaded model (a `LoadedModel`, an `Embedder`, a `CrossEncoder` or a
    `MultiVectorEncoder`) for the commands that embed, instead of loading `--model` (tests, and
    callers that hold a model already); `embedder`: the same, by its former name."""
    model = model if model is not None else embedder
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return run_serve(args)
    from .config import ConfigError
    from .corpus import CorpusError
    from .weights import CheckpointError

    try:
        return COMMANDS[args.command](args, model)
    except CorpusError as e:
        print(f"modernbert-embed: error: {e}", file=sys.stderr)
        return e.exit_code
    except (CheckpointError, ConfigError) as e:
        print(f"modernbert-embed: error: cannot load the model: {e}", file=sys.stderr)
        return 2
    except (ValueError, TypeError) as e:  # option values the library refuses (a dtype the GPU lacks, ...)
        print(f"modernbert-embed: error: {e}", file=sys.stderr)
        return 2
    except (RuntimeError, OSError) as e:  # a failure while running: out of memory, a file that vanished
        print(f"modernbert-embed: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("modernbert-embed: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
