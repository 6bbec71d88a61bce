"""``mosa eval``: perplexity of a trained model on a split, at one or more lengths, and what its MoSA heads
select."""
from __future__ import annotations

import argparse
import json
import sys

from ..argtypes import int_at_least


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run folder of `mosa train` (its latest checkpoint) or a checkpoint folder")
    p.add_argument("--split", default="val", choices=("train", "val", "test"), help="split to score (default val)")
    p.add_argument("--seq-len", type=int, nargs="+", help="lengths to score at (default: the training length)")
    p.add_argument("--data", help="data source (default: the run's own); its tokenizer must be the run's")
    p.add_argument("--max-windows", type=int_at_least(0), default=0, help="score at most this many windows (default: all)")
    p.add_argument("--batch-size", type=int_at_least(1), default=8)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    p.add_argument("--no-selection", action="store_true", help="skip the MoSA selection statistics")
    p.add_argument("--selection-windows", type=int_at_least(1), default=64, help="windows for the selection statistics")
    p.add_argument("--routing", choices=("topk", "threshold"),
                   help="how MoSA heads choose tokens: topk (the paper, sees the whole window) or threshold "
                        "(causal, as when generating); default: as the model was trained")
    p.add_argument("--calibrate", type=int_at_least(0), default=0, metavar="WINDOWS",
                   help="first set the causal thresholds on this many training windows (see docs/generation.md)")
    p.add_argument("--json", metavar="FILE", help="also write every number (per-position rates too) as JSON")


def run(args) -> int:
    from ..data.corpus import DataError  # noqa: PLC0415
    from ..train.checkpoint import CheckpointError  # noqa: PLC0415

    try:
        return _run(args)
    except (DataError, CheckpointError, EvalError) as e:
        print(f"mosa eval: error: {e}", file=sys.stderr)
        return 2


class EvalError(ValueError):
    pass


def _run(args) -> int:
    import torch  # noqa: PLC0415

    from ..data.corpus import DataError  # noqa: PLC0415
    from ..data.prepare import DataConfig, prepare  # noqa: PLC0415
    from ..train.checkpoint import load_model  # noqa: PLC0415
    from ..train.distributed import pick_device  # noqa: PLC0415
    from .perplexity import evaluate  # noqa: PLC0415
    from .selection import format_stats, selection_stats  # noqa: PLC0415

    device = pick_device(args.device)
    model, tokenizer, ckpt = load_model(args.run, device)
    cfg = model.config
    data_cfg = DataConfig(**ckpt.state["train_config"]["data"])
    if args.data:
        data_cfg.source = args.data
    data = prepare(data_cfg, log=lambda m: print(m, file=sys.stderr))
    if data.tokenizer.to_str() != tokenizer.to_str():
        raise DataError(f"the data's tokenizer ({data.root}) is not the one the model was trained with")
    tokens = data.tokens(args.split)
    lengths = args.seq_len or [cfg.seq_len]
    for L in lengths:
        if L < 1 or L > cfg.longest_input:
            raise EvalError(f"--seq-len {L} is outside what this model accepts (1..{cfg.longest_input}; "
                            f"trained at {cfg.seq_len})")
    amp = torch.bfloat16 if device.type == "cuda" else None
    print(f"model: {ckpt.path} (step {ckpt.step}, {cfg.attention}, sparsity {cfg.sparsity:g}, trained at T={cfg.seq_len})")
    routing = _set_routing(model, data, args)
    report = {"checkpoint": str(ckpt.path), "step": ckpt.step, "split": args.split, "routing": routing,
              "perplexity": [], "selection": {}}
    for L in lengths:
        res = evaluate(model, tokens, L, batch_size=args.batch_size, max_windows=args.max_windows or None,
                       device=device, amp_dtype=amp)
        report["perplexity"].append(res)
        print(f"{args.split} at seq_len {L}: loss {res['loss']:.4f}, perplexity {res['ppl']:.2f} ({res['tokens']:,} tokens)")
    if not args.no_selection:
        for L in lengths:
            stats = selection_stats(model, tokens, L, batch_size=args.batch_size, max_windows=args.selection_windows,
                                    device=device, amp_dtype=amp)
            report["selection"][str(L)] = stats
            print(format_stats(stats))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f)
        print(f"wrote {args.json}")
    return 0


def _set_routing(model, data, args) -> str:
    """Apply --calibrate and --routing; returns the rule the MoSA heads now use."""
    from ..data.batches import eval_batches  # noqa: PLC0415
    from ..inference.routing import calibrate_thresholds, set_routing  # noqa: PLC0415

    cfg = model.config
    if args.calibrate:
        calibrate_thresholds(model, list(eval_batches(data.tokens("train"), cfg.seq_len, args.batch_size,
                                                      args.calibrate)))
        print(f"thresholds calibrated on {args.calibrate} training windows of {cfg.seq_len} tokens")
    routing = args.routing or cfg.routing
    if args.calibrate and routing != "threshold":
        print(f"warning: --calibrate sets the thresholds of threshold routing, but this evaluation routes by "
              f"{routing}; add --routing threshold to use them", file=sys.stderr)
    set_routing(model, routing)
    if routing == "threshold" and not cfg.causal_routing_ready:
        print("warning: threshold routing on a model trained with top-k, no router auxiliary loss and no "
              "calibration: the default thresholds keep an arbitrary share of tokens; add --calibrate 32",
              file=sys.stderr)
    if cfg.attention in ("mosa", "pure_mosa"):
        print(f"routing: {routing}")
    return routing
