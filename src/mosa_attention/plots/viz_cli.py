"""``mosa viz``: which tokens each MoSA head of a trained model keeps over a text, as a PNG."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..argtypes import int_at_least

DEFAULT_TEXT = ("The Moon is Earth's only natural satellite. It orbits at an average distance of 384,400 km, "
                "about 30 times the diameter of Earth, and always faces Earth with the same side.")


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run folder of `mosa train` or a checkpoint folder")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--text", help="text to show (default: a sentence about the Moon)")
    src.add_argument("--file", help="read the text from this file")
    p.add_argument("--max-tokens", type=int_at_least(1), default=96, help="show at most this many tokens (default 96)")
    p.add_argument("--layers", type=int, nargs="+", help="only these layers (default: every MoSA layer)")
    p.add_argument("--max-heads", type=int_at_least(1), default=32, help="show at most this many heads per layer (default 32)")
    p.add_argument("-o", "--out", default="selections.png", help="PNG to write (default selections.png in the current folder)")
    p.add_argument("--device", default="cpu")


def run(args) -> int:
    from ..ops import num_selected  # noqa: PLC0415
    from ..train.checkpoint import CheckpointError, load_model  # noqa: PLC0415
    from .selections import draw_selections, selections_for_text  # noqa: PLC0415

    try:
        text = Path(args.file).read_text(encoding="utf-8") if args.file else (args.text or DEFAULT_TEXT)
        model, tokenizer, ckpt = load_model(args.run, args.device)
        ids = tokenizer.encode(text)[: args.max_tokens]
        tokens, panels = selections_for_text(model, tokenizer, tokenizer.decode(ids), args.device)
        if args.layers:
            n = model.config.n_layer
            bad = [i for i in args.layers if not 0 <= i < n]
            if bad:
                raise ValueError(f"--layers: the model has layers 0 to {n - 1}, got {bad}")
            panels = [p for p in panels if p[0] in set(args.layers)]
        panels = [(layer, grid[: args.max_heads]) for layer, grid in panels]
        c = model.config
        title = (f"{Path(ckpt.path).parent.parent.name} step {ckpt.step}: tokens kept by each MoSA head "
                 f"(sparsity {c.sparsity:g}, k = {num_selected(len(tokens), c.sparsity)} of {len(tokens)}; grey: not kept)")
        out = draw_selections(tokens, panels, args.out, title)
    except (OSError, ValueError, CheckpointError) as e:
        print(f"mosa viz: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0
