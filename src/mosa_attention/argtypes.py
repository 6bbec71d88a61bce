"""argparse ``type`` helpers shared by the subcommands' parsers (no dependencies: parsers load it cheaply)."""
from __future__ import annotations

import argparse


def int_at_least(minimum: int):
    """An argparse ``type``: an integer >= ``minimum``, else argparse's one-line error naming the option."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value
    parse.__name__ = f"integer >= {minimum}"
    return parse


def add_run_argument(p: argparse.ArgumentParser, what: str) -> None:
    """The run a command reads: positional ``RUN``, as in ``mosa eval`` and ``mosa viz``, or ``--checkpoint RUN``
    (kept for older command lines); ``run_path`` picks the one given."""
    p.add_argument("run", nargs="?", metavar="RUN", help=what)
    p.add_argument("--checkpoint", metavar="RUN", help="the same as RUN")


def run_path(args: argparse.Namespace) -> str:
    """The run folder of ``add_run_argument``'s arguments; a ValueError naming them if none or two differ."""
    if args.run and args.checkpoint and args.run != args.checkpoint:
        raise ValueError(f"give the run once, got RUN={args.run!r} and --checkpoint={args.checkpoint!r}")
    path = args.run or args.checkpoint
    if not path:
        raise ValueError("no run given: name a run folder or a checkpoint folder as RUN (or --checkpoint RUN)")
    return path
