"""The ``mosa`` command. Thin: each subcommand lives in its application module, which exposes
``configure_parser(parser)`` and ``run(args) -> int``; modules load only when their subcommand runs."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# subcommand -> (module, one-line help)
COMMANDS = {
    "flops": ("mosa_attention.flops_cli", "FLOPs of a dense model and the FLOP-matched MoSA hybrid"),
    "train": ("mosa_attention.train.cli", "train a language model (no arguments: a toy MoSA hybrid on the CPU)"),
    "eval": ("mosa_attention.eval.cli", "perplexity of a trained model and what its MoSA heads select"),
    "plot": ("mosa_attention.plots.plot_cli", "loss curves of several runs in one PNG"),
    "viz": ("mosa_attention.plots.viz_cli", "which tokens each MoSA head keeps over a text, as a PNG"),
    "generate": ("mosa_attention.inference.cli", "sample text from a trained run with the sparse KV cache, streaming"),
    "routing-report": ("mosa_attention.inference.report_cli", "causal (threshold) routing against top-k on a trained run"),
    "bench": ("mosa_attention.bench.cli", "time a MoSA attention layer against a dense one on this machine"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mosa", description="Mixture of Sparse Attention: train, evaluate, generate, measure.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        # argument definitions live beside the application; import only its light parser hook
        importlib.import_module(module).configure_parser(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except _user_errors() as err:
        # what the library raises for bad input or a missing file names the argument and the value: one line,
        # not a traceback (MOSA_DEBUG=1 shows the traceback)
        if os.environ.get("MOSA_DEBUG"):
            raise
        print(f"mosa {args.command}: error: {err}", file=sys.stderr)
        return 2


def _user_errors() -> tuple:
    """Exceptions that report a user's mistake rather than a bug: bad values (ValueError and the library's
    errors derived from it), missing or broken checkpoints, a model kind a command does not support."""
    from .train.checkpoint import CheckpointError  # noqa: PLC0415
    return (ValueError, CheckpointError, FileNotFoundError, NotImplementedError)


if __name__ == "__main__":
    sys.exit(main())
