"""``mosa plot``: loss curves of several runs in one PNG."""
from __future__ import annotations

import argparse
import sys

from ..argtypes import int_at_least


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", help="run folders of `mosa train`")
    p.add_argument("-o", "--out", default="loss.png", help="PNG to write (default loss.png)")
    p.add_argument("--x", choices=("step", "tokens"), default="step", help="horizontal axis")
    p.add_argument("--smooth", type=int_at_least(1), default=1, help="moving average over this many logged points")
    p.add_argument("--labels", nargs="+", help="one label per run (default: folder name and attention kind)")
    p.add_argument("--title")


def run(args) -> int:
    from .curves import PlotError, plot_runs  # noqa: PLC0415

    if args.labels and len(args.labels) != len(args.runs):
        print(f"mosa plot: error: {len(args.labels)} labels for {len(args.runs)} runs", file=sys.stderr)
        return 2
    try:
        out = plot_runs(args.runs, args.out, x=args.x, smooth=args.smooth, labels=args.labels, title=args.title)
    except PlotError as e:
        print(f"mosa plot: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0
