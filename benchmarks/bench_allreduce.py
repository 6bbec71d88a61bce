"""What the gradient all-reduce of `train.distributed="allreduce"` costs per step, for the tiny preset's models:
``train.distributed.all_reduce_grads`` as the trainer calls it (a flat copy, one NCCL all-reduce, the copy
back), and the bare all-reduce of the same bytes, so that the copies and the link can be told apart.

    torchrun --nproc-per-node 2 benchmarks/bench_allreduce.py --out OUT/allreduce.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from bench_train import MODELS  # noqa: E402  (the models of the whole-model benchmark, beside this script)
from mosa_attention import MoSAConfig, MoSALM  # noqa: E402
from mosa_attention.train import distributed as D  # noqa: E402


def timed(fn, reps: int) -> float:
    """Median ms of ``fn`` over ``reps`` calls, by CUDA events, after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="dense,mosa17,mosa", help=f"comma-separated, of {sorted(MODELS)}")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    info = D.init("cuda")
    rows = []
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = MoSALM(MoSAConfig.from_preset("tiny", **MODELS[name])).to(info.device)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        grads = [p.grad for p in model.parameters()]
        flat = torch.cat([g.reshape(-1) for g in grads])
        gb = flat.numel() * flat.element_size() / 1e9
        ms_all = timed(lambda: D.all_reduce_grads(model, info), args.reps)
        ms_bare = timed(lambda: dist.all_reduce(flat), args.reps)
        ms_copies = timed(lambda: torch.cat([g.reshape(-1) for g in grads]), args.reps)
        row = {"model": name, "params_M": flat.numel() / 1e6, "GB": gb, "world": info.world_size,
               "all_reduce_grads_ms": ms_all, "bare_all_reduce_ms": ms_bare, "flat_copy_ms": ms_copies,
               # a ring all-reduce moves 2 (n - 1) / n of the bytes through each GPU's link
               "bus_GB_s": gb * 2 * (info.world_size - 1) / info.world_size / (ms_bare / 1e3)}
        rows.append(row)
        if info.is_main:
            print(json.dumps(row))
        del model, grads, flat
        torch.cuda.empty_cache()
    if info.is_main and args.out:
        with open(args.out, "w") as f:
            json.dump({"torch": torch.__version__, "nccl": ".".join(map(str, torch.cuda.nccl.version())),
                       "card": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
    D.shutdown()


if __name__ == "__main__":
    main()
