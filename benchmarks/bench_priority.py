"""Stream priorities inside a CUDA graph: do they shorten a hybrid layer's step?

A hybrid runs its MoSA heads on a second stream beside the dense heads. Priorities given to those streams
(v7.2, v9.0) changed nothing, but those runs timed CUDA graphs, and a graph runs every kernel at the priority
of the stream it is launched into unless it is instantiated with ``cudaGraphInstantiateFlagUseNodePriority``;
torch's ``CUDAGraph`` does not set that flag. Here each step is captured with ``keep_graph=True`` and, for the
variants that ask for it, instantiated through the driver with the flag, then launched on the current stream.

Variants (the capture stream runs the dense heads, the "mosa heads" stream the MoSA heads):
  torch:      torch's own instantiation, every stream at priority 0 (the benchmarks' graphs);
  flag:       the node-priority flag, every stream at 0 (must time as torch);
  dense_hi:   the flag, the dense heads' stream at the highest priority;
  dense_hi_noflag: the same priorities without the flag (must time as torch: priorities ignored);
  mosa_hi:    the flag, the MoSA heads' stream at the highest priority.
Rounds alternate the variants; each round times every variant (median of ``--iters`` replays); the table gives
the median over rounds, and the ratio to the dense 9-head layer timed in the same rounds.

    python benchmarks/bench_priority.py --cases t2,t3 --rounds 5 --out OUT
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from mosa_attention.bench.layer import alternating_rounds, make_step  # noqa: E402
from mosa_attention.layers import DenseAttention, MoSAAttention  # noqa: E402
from mosa_attention.ops import _host  # noqa: E402

USE_NODE_PRIORITY = 8  # CUDA_GRAPH_INSTANTIATE_FLAG_USE_NODE_PRIORITY
CASES = {"t2": (512, 17, 32, 4, 1024, 16), "t3": (512, 505, 64, 4, 1024, 16)}  # h, E, rho, dense, T, B
VARIANTS = {  # name: (node-priority flag, capture stream priority, MoSA stream priority)
    "torch": (False, 0, 0), "flag": (True, 0, 0), "dense_hi": (True, -5, 0), "dense_hi_noflag": (False, -5, 0),
    "mosa_hi": (True, 0, -5),
}


class DriverGraph:
    """A captured graph instantiated through the CUDA driver with the node-priority flag."""

    def __init__(self, graph: torch.cuda.CUDAGraph):
        self.lib = ctypes.CDLL("libcuda.so.1")
        self.lib.cuGraphInstantiateWithFlags.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p,
                                                         ctypes.c_ulonglong]
        self.lib.cuGraphLaunch.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        self.graph = graph  # keeps the captured graph and its memory pool alive
        self.exec = ctypes.c_void_p()
        rc = self.lib.cuGraphInstantiateWithFlags(ctypes.byref(self.exec), ctypes.c_void_p(graph.raw_cuda_graph()),
                                                  USE_NODE_PRIORITY)
        if rc != 0:
            raise RuntimeError(f"cuGraphInstantiateWithFlags returned CUresult {rc}")

    def replay(self):
        rc = self.lib.cuGraphLaunch(self.exec, ctypes.c_void_p(torch.cuda.current_stream().cuda_stream))
        if rc != 0:
            raise RuntimeError(f"cuGraphLaunch returned CUresult {rc}")


def capture(step, flag: bool, cap_priority: int, mosa_priority: int):
    dev = torch.device("cuda", torch.cuda.current_device())
    _host._STREAMS[dev, "mosa heads"] = torch.cuda.Stream(dev, priority=mosa_priority)
    _host._STREAMS[dev, "beside"] = torch.cuda.Stream(dev, priority=cap_priority)  # the masked x-gradient sum
    cap = torch.cuda.Stream(dev, priority=cap_priority)
    cap.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(cap):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(cap)
    graph = torch.cuda.CUDAGraph(keep_graph=True)
    with torch.cuda.graph(graph, stream=cap):
        step()
    if flag:
        return DriverGraph(graph).replay, graph
    graph.instantiate()
    return graph.replay, graph


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="t2")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    lo, hi = torch.cuda.Stream.priority_range()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; stream priorities {lo} (least) .. {hi}")
    results = {}
    for case in args.cases.split(","):
        h, E, rho, nd, T, B = CASES[case]
        torch.manual_seed(0)
        x = torch.randn(B, T, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn_like(x)
        hybrid = MoSAAttention(h, E, rho, num_dense_heads=nd, backend="triton").cuda().to(torch.bfloat16)
        dense = DenseAttention(h, 9).cuda().to(torch.bfloat16)
        ref = make_step(hybrid, x, dy)().detach().float()
        ref_dx = x.grad.detach().float()
        replays = {"dense 9": capture(make_step(dense, x, dy), False, 0, 0)}
        for name in args.variants.split(","):
            replays[name] = capture(make_step(hybrid, x, dy), *VARIANTS[name])
            replays[name][0]()
            torch.cuda.synchronize()
            err = ((x.grad.float() - ref_dx).norm() / ref_dx.norm()).item()
            print(f"{case} {name}: replay's x.grad against the eager step's, relative {err:.1e}", flush=True)
            if not err < 2e-2:
                raise SystemExit(f"{case} {name}: the replay's gradient is off ({err:.2e})")
        results[case] = alternating_rounds({n: replay for n, (replay, _) in replays.items()}, args.rounds,
                                           args.iters, cuda=True, base="dense 9", label=f"{case} ")
        print(f"== {case}: median over {args.rounds} rounds of {args.iters} replays (ratio to dense 9 heads)")
        for n, v in results[case].items():
            print(f"  {n:16s} {v['ms']:.4f} ms  {v['ratio']:.3f}x")
        del replays, hybrid, dense
        for key in ("mosa heads", "beside"):
            _host._STREAMS.pop((torch.device("cuda", torch.cuda.current_device()), key), None)
        torch.cuda.empty_cache()
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "priority.json")
        with open(path + ".tmp", "w") as f:  # written whole, then renamed
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": results}, f,
                      indent=1)
        os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
