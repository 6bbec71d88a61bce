"""``mosa generate``: sample text from a trained run, streaming tokens to the terminal as they come.

    mosa generate runs/mosa-... --prompt "The history of" --max-new-tokens 200

MoSA heads route causally (by threshold) and cache only the tokens they keep. A model trained with top-k
routing and no auxiliary router loss should be calibrated first: ``--calibrate 32`` sets every head's
threshold on 32 windows of the run's training data (in memory; the checkpoint is not changed), and
``--save-calibrated DIR`` also writes the calibrated model as a new run folder, so that later runs need no
calibration.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings

from ..argtypes import add_run_argument, int_at_least, run_path


def configure_parser(p: argparse.ArgumentParser) -> None:
    add_run_argument(p, "a run folder (its latest checkpoint) or a checkpoint folder")
    p.add_argument("--prompt", action="append", required=True,
                   help="the text to continue; repeat for a batch of prompts (printed when all are done)")
    p.add_argument("--max-new-tokens", type=int_at_least(0), default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--capacity", type=int_at_least(1), default=None,
                   help="at most this many cached tokens per MoSA head (the lowest-score one is dropped)")
    p.add_argument("--calibrate", type=int_at_least(0), default=0, metavar="WINDOWS",
                   help="calibrate the routing thresholds on this many training windows first")
    p.add_argument("--save-calibrated", metavar="DIR",
                   help="with --calibrate: also save the calibrated model as a new run folder DIR (its checkpoint "
                        "keeps the step, tokenizer and configs; the original run is not changed)")
    p.add_argument("--stop-at-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="stop a sequence at the end-of-document token")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--stats", action="store_true", help="print tokens/s and the KV cache's size at the end")
    p.add_argument("--fixed-shapes", action=argparse.BooleanOptionalAction, default=None,
                   help="decode with fixed shapes, each step a CUDA graph (default: on a GPU); --no-fixed-shapes "
                        "takes the paged cache's steps, as a CPU does")
    p.add_argument("--compile", action="store_true",
                   help="fuse the fixed-shape step's torch ops with torch.compile (1.3-1.7x the tokens/s of the "
                        "tiny models on an H200, after a compile of ~10-20 s; implies --fixed-shapes)")


def load_run(path, device: str = "auto"):
    """(model, tokenizer, checkpoint) of a run or checkpoint folder, on ``device``."""
    import torch  # noqa: PLC0415

    from ..train.checkpoint import load_model  # noqa: PLC0415
    from ..train.distributed import pick_device  # noqa: PLC0415

    return load_model(path, device=pick_device(device))


def save_calibrated(model, ckpt, out_dir):
    """Write ``model`` (thresholds calibrated) as a new run folder ``out_dir``: one checkpoint of the same step
    with the original's tokenizer and configs, ``model_config`` now marked calibrated. Written atomically;
    refuses a folder that already holds checkpoints."""
    from ..train.checkpoint import CheckpointError, list_checkpoints, save  # noqa: PLC0415

    if list_checkpoints(out_dir):
        raise CheckpointError(f"{out_dir} already holds checkpoints; give --save-calibrated a new folder")
    skip = {"format_version", "step", "files", "optimizer_param_groups"}
    state = {k: v for k, v in ckpt.state.items() if k not in skip}
    state["model_config"] = model.config.to_dict()
    state["calibrated_from"] = str(ckpt.path)
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return save(out_dir, ckpt.step, weights, None, state, ckpt.tokenizer_json, keep_last=0)


def training_windows(ckpt, count: int, split: str = "train"):
    """Up to ``count`` (ids, targets) windows of the run's data split, at the model's training length."""
    from ..data import prepare  # noqa: PLC0415
    from ..data.batches import eval_batches  # noqa: PLC0415
    from ..train.config import TrainConfig  # noqa: PLC0415

    cfg = TrainConfig.from_dict(ckpt.state["train_config"])
    data = prepare(cfg.data, log=lambda *a: None)
    T = ckpt.state["model_config"]["seq_len"]
    return list(eval_batches(data.tokens(split), T, batch_size=8, max_windows=count))


class _Printer:
    """Prints the newly decoded text of one sequence; holds back a partly decoded character (byte-level
    tokens may split one)."""

    def __init__(self, tokenizer, out=None, eos_id: int | None = None):
        # sys.stdout as it is now, not as it was at import (a caller may have replaced it since)
        self.tokenizer, self.out = tokenizer, out if out is not None else sys.stdout
        self.eos_id = eos_id  # the end-of-text token that stops generation: not printed
        self.ids: list[int] = []
        self.shown = ""

    def __call__(self, token) -> None:
        if self.eos_id is not None and int(token[0]) == self.eos_id:
            return
        self.ids.append(int(token[0]))
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return
        self.show(text)

    def show(self, text: str) -> None:
        self.out.write(text[len(self.shown):] if text.startswith(self.shown) else text)
        self.out.flush()
        self.shown = text

    def finish(self) -> None:
        """Print what was held back, a partial character included."""
        self.show(self.tokenizer.decode(self.ids))


def run(args) -> int:
    from .routing import calibrate_thresholds  # noqa: PLC0415
    from .generate import RoutingWarning, generate, not_causal_note  # noqa: PLC0415
    from .sampling import check_sampling  # noqa: PLC0415

    try:
        check_sampling(args.temperature, args.top_k, args.top_p)
    except ValueError as e:
        print(f"mosa generate: error: {e}", file=sys.stderr)
        return 2
    if args.save_calibrated and not args.calibrate:
        print("mosa generate: error: --save-calibrated needs --calibrate WINDOWS (the thresholds to save)", file=sys.stderr)
        return 2
    model, tokenizer, ckpt = load_run(run_path(args), args.device)
    if args.calibrate:
        batches = [x for x, _ in training_windows(ckpt, args.calibrate)]
        calibrate_thresholds(model, batches)
        print(f"[calibrated routing thresholds on {sum(len(b) for b in batches)} training windows]", file=sys.stderr)
        if args.save_calibrated:
            from ..train.checkpoint import CheckpointError  # noqa: PLC0415
            try:
                where = save_calibrated(model, ckpt, args.save_calibrated)
            except CheckpointError as e:
                print(f"mosa generate: error: {e}", file=sys.stderr)
                return 2
            print(f"[saved the calibrated model: {where}]", file=sys.stderr)
    note = not_causal_note(model)
    if note:
        print(f"warning: {note}", file=sys.stderr)
    prompts = [tokenizer.encode(p) or [tokenizer.eos_id] for p in args.prompt]
    single = len(prompts) == 1
    eos_id = tokenizer.eos_id if args.stop_at_eos else None
    printer = _Printer(tokenizer, eos_id=eos_id) if single else None
    if single:
        sys.stdout.write(args.prompt[0])
        sys.stdout.flush()
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RoutingWarning)  # said above, before the text starts
            out = generate(model, prompts, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, seed=args.seed, capacity=args.capacity, stream=printer, eos_id=eos_id,
                           return_cache=args.stats,  # (the cache: --stats)
                           fixed_shapes=args.fixed_shapes, compile=args.compile)
            out, cache = out if args.stats else (out, None)
    except ValueError as e:
        print(f"\nmosa generate: error: {e}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - t0
    if single:
        printer.finish()
        print()
    else:
        for p, text, ids in zip(prompts, args.prompt, out):
            new = [i for i in ids[len(p):] if i != eos_id]  # (the end-of-text token that stopped it: not printed)
            print(f"--- {text!r}\n{text}{tokenizer.decode(new)}")
    if args.stats:
        new = sum(len(o) - len(p) for o, p in zip(out, prompts))
        print(f"[{new} tokens in {seconds:.2f} s ({new / seconds:.1f} tokens/s, prefill"
              f"{' and the compile' if args.compile else ''} included) on "
              f"{next(model.parameters()).device}; KV cache {cache.nbytes() / 1024:.1f} KiB allocated, "
              f"{cache.held_bytes() / 1024:.1f} KiB held, entries {cache.entries()}]", file=sys.stderr)
    return 0


if __name__ == "__main__":  # python -m, also where the `mosa` command does not list this one
    _parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}")
    configure_parser(_parser)
    sys.exit(run(_parser.parse_args()))
