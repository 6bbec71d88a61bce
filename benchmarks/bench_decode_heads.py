"""Time one decoding step of a layer's MoSA heads (``ops.decode_heads``) alone, as CUDA-graph replays, for the
Triton kernels' launch settings (``ops.triton_decode_heads``: COMPACT, PROGRAMS, SLICE) and the plain-torch
reference, at the tiny preset's FLOP-matched shapes (h = 512, head dim 64, 276 or 498 heads).

    python benchmarks/bench_decode_heads.py --out results/decode_heads.json      # a CUDA GPU

Each head keeps the token with probability 1/32 (the heads picked at random, each keeping every sequence's
token), and holds 32 cached tokens in 128 slots; a graph holds 20 steps, each after the counts are reset.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from mosa_attention.ops import triton_decode_heads as tdh  # noqa: E402
from mosa_attention.ops.decode_heads import decode_heads  # noqa: E402
from mosa_attention.ops.rope import rope_cos_sin  # noqa: E402


def inputs(B, E, h, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    dev = "cuda"

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dev, dtype)

    keeps = torch.rand(E, generator=g) < 1 / 32
    threshold = torch.where(keeps, -1.0, 2.0).to(dev)
    room, cached = 128, 32
    pos = torch.full((B,), 1000, device=dev)
    cos, sin = rope_cos_sin(pos, D // 2, 10000.0, dtype)
    return dict(x=r(B, h), w_router=r(E, h, scale=h ** -0.5), threshold=threshold, pos=pos,
                count=torch.full((B, E), cached, device=dev), w_qkv=r(E, h, 3 * D, scale=h ** -0.5),
                w_o=r(E, D, h, scale=D ** -0.5), cos=cos.contiguous(), sin=sin.contiguous(),
                k_cache=r(B, E, room, D), v_cache=r(B, E, room, D),
                pos_cache=torch.zeros(B, E, room, dtype=torch.long, device=dev),
                score_cache=torch.zeros(B, E, room, device=dev)), int(keeps.sum())


def time_steps(args, backend, steps=20, replays=30):
    count0 = args["count"].clone()

    def run():
        for _ in range(steps):
            args["count"].copy_(count0)
            decode_heads(*args.values(), backend=backend)

    run()  # compile, warm
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / steps)
    return sorted(times)[len(times) // 2]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None)
    p.add_argument("--heads", nargs="+", type=int, default=[276, 498])
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--settings", nargs="+", default=["grid:64:64", "list:64:64", "list:32:64", "list:132:64",
                                                      "list:64:32"],
                   help="the Triton kernels' settings as ways:PROGRAMS:SLICE (ways: grid or list)")
    a = p.parse_args(argv)
    rows = []
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    for E, B, dt in itertools.product(a.heads, a.batch, a.dtypes):
        args, keeping = inputs(B, E, 512, 64, getattr(torch, dt))
        row = {"heads": E, "batch": B, "dtype": dt, "keeping_heads": keeping,
               "torch_us": time_steps(args, "torch")}
        for setting in a.settings:
            ways, programs, rows_per_slice = setting.split(":")
            tdh.COMPACT, tdh.PROGRAMS, tdh.SLICE = ways == "list", int(programs), int(rows_per_slice)
            row[setting + "_us"] = time_steps(args, "triton")
        rows.append(row)
        print(json.dumps(row), flush=True)
        if a.out:
            with open(a.out, "w") as f:
                json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
