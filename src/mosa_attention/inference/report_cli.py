"""``mosa routing-report``: how causal (threshold) routing compares with the paper's top-k on a trained run.

    mosa routing-report runs/mosa-... --windows 64 [--calibrate 64]

Prints, per layer, the precision and recall of the threshold decisions against top-k on the same inputs,
and the validation perplexity under each rule (``--json`` for a machine-readable line).
"""
from __future__ import annotations

import argparse
import json
import sys

from ..argtypes import add_run_argument, int_at_least, run_path


def configure_parser(p: argparse.ArgumentParser) -> None:
    add_run_argument(p, "a run folder or a checkpoint folder")
    p.add_argument("--windows", type=int_at_least(1), default=64, help="validation windows to score")
    p.add_argument("--calibrate", type=int_at_least(0), default=0, metavar="WINDOWS",
                   help="calibrate the thresholds on this many training windows first")
    p.add_argument("--split", default="val", help="the split to report on")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true")


def run(args) -> int:
    from .cli import load_run, training_windows  # noqa: PLC0415
    from .routing import calibrate_thresholds, routing_report  # noqa: PLC0415

    model, _, ckpt = load_run(run_path(args), args.device)
    if model.config.attention not in ("mosa", "pure_mosa"):
        print(f"mosa routing-report: error: the run has no MoSA heads (attention={model.config.attention!r}): "
              f"there is no routing to compare", file=sys.stderr)
        return 2
    if args.calibrate:
        calibrate_thresholds(model, [x for x, _ in training_windows(ckpt, args.calibrate)])
    report = routing_report(model, training_windows(ckpt, args.windows, args.split))
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"trained with routing={report['trained_routing']!r}, router_aux_loss={report['router_aux_loss']}, "
          f"thresholds calibrated: {report['calibrated']}")
    print("layer  precision  recall  kept(threshold/topk)")
    for row in report["layers"]:
        print(f"{row['layer']:>5}  {row['precision']:>9.3f}  {row['recall']:>6.3f}  {row['kept_ratio']:>8.3f}")
    print(f"{args.split} perplexity: topk {report['ppl_topk']:.3f}, threshold {report['ppl_threshold']:.3f}")
    return 0


if __name__ == "__main__":  # python -m, also where the `mosa` command does not list this one
    _parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}")
    configure_parser(_parser)
    sys.exit(run(_parser.parse_args()))
