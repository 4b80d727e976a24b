"""What the subcommands of `modernbert-embed` share: one help style, one whole-number parser (one
set of messages), and the options that choose and load the model.

`cli` (embed, verify) and `server.cli` (serve) both build on this module and on nothing of each
other's, so that either can be imported alone.
"""

from __future__ import annotations

import argparse

from .batching import CPU_MAX_BATCH_TOKENS, GPU_MAX_BATCH_TOKENS
from .weights.resolve import DEFAULT_MODEL

DTYPE_CHOICES = ("float32", "bfloat16", "float16")


class Formatter(argparse.HelpFormatter):
    """Shows an option's default where it has a meaningful one."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, False, True, argparse.SUPPRESS) and "%(default)" not in text \
                and action.option_strings:
            text += " (default: %(default)s)"
        return text


def int_at_least(minimum: int):
    """An argparse `type`: a whole number >= `minimum`, or a message saying what was wrong."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a number >= {minimum}, got {value}")
        return value

    return parse


def add_model_options(group, repeatable: bool = False) -> None:
    """The options that choose and load the model, spelled once for every subcommand: --model
    (`repeatable`: a list, default [DEFAULT_MODEL]), --revision, --device, --dtype."""
    if repeatable:
        group.add_argument("--model", action="append", default=None, metavar="ID_OR_PATH",
                           help=f"Hub id or local folder; repeat it to serve several models (default: {DEFAULT_MODEL})")
    else:
        group.add_argument("--model", default=DEFAULT_MODEL, metavar="ID_OR_PATH", help="Hub id or local folder")
    group.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    group.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when present)")
    group.add_argument("--dtype", default=None, choices=DTYPE_CHOICES,
                       help="weights and activations (default: float32 on CPU, bfloat16 on CUDA GPUs with "
                            "native bf16, else float16)")


def add_max_batch_tokens(group, note: str = "") -> None:
    """--max-batch-tokens, tokens per forward (None: the engine's default for its device);
    `note` adds what it means to the subcommand."""
    group.add_argument("--max-batch-tokens", type=int_at_least(1), default=None, metavar="N",
                       help=f"tokens per forward (default {CPU_MAX_BATCH_TOKENS} on the CPU, "
                            f"{GPU_MAX_BATCH_TOKENS} on a GPU){note}")


__all__ = ["Formatter", "int_at_least", "add_model_options", "add_max_batch_tokens", "DTYPE_CHOICES"]
