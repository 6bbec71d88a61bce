"""Kernel settings timed in the layer they serve: each variant as its own CUDA graph, replayed in alternating rounds.

`bench_layer.py --tune` picks each MoSA kernel's tiles by that kernel's own GPU time with the MoSA heads alone.
In a hybrid the MoSA kernels run beside the dense heads' kernels, and a tile that makes a kernel faster alone can
hold SMs the dense products wait for (v21: the attention backward inside ``_out_bwd`` made t1 2.5 us faster and
t2 7 us slower). Here each variant (module switches of ``triton_mosa`` and of the layer, and launch
overrides, ``TILE_OVERRIDES``) is set, the layer's step is captured as a CUDA graph (the graph keeps the kernels it was
captured with), and the settings are restored; then the rounds replay every graph in turn, so that all variants
see the same drift of the card. Each variant's gradients (x's and every weight's) are checked against the eager
default step's before it is timed. ``--eager`` times eager steps instead, each run under its variant's
settings (what a step costs with the host's launches: a change can help the GPU and cost the host). ``--autocast``
runs every step under bf16 autocast over float32 x and parameters (how models train) instead of all in bf16.

    python benchmarks/bench_variants.py --cases t2 --variants default,attn_outside --rounds 9 --out OUT
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from mosa_attention.bench.layer import alternating_rounds, capture_graph, make_step  # noqa: E402
from mosa_attention.layers import DenseAttention, MoSAAttention  # noqa: E402
from mosa_attention.layers import mosa as layer_mosa  # noqa: E402
from mosa_attention.ops import triton_hybrid, triton_mosa  # noqa: E402

# h, MoSA heads, sparsity, dense heads in the layer, T, B, dense heads of the comparison layer (0: none)
# (t3m: t3's MoSA heads alone; rho4, rho8: t1's heads at sparsities 4 and 8, k = 256 and 128)
CASES = {"t1": (512, 17, 32, 0, 1024, 16, 9), "t2": (512, 17, 32, 4, 1024, 16, 9),
         "t3": (512, 505, 64, 4, 1024, 16, 9), "t3m": (512, 505, 64, 0, 1024, 16, 9),
         "t4": (1024, 60, 1024, 0, 65536, 1, 0), "T16384": (1024, 60, 256, 0, 16384, 1, 0),
         "rho4": (512, 17, 4, 0, 1024, 16, 9), "rho8": (512, 17, 8, 0, 1024, 16, 9)}
# where a variant's switches live: "flags" the kernels' (ops.triton_mosa), "layer_flags" the layer's (layers.mosa),
# "hybrid_flags" the one-op hybrid's (ops.triton_hybrid)
SWITCHES = {"flags": triton_mosa, "layer_flags": layer_mosa, "hybrid_flags": triton_hybrid}
VARIANTS = {  # name: {"flags": {switch: value}, "layer_flags": {switch: value}, "tiles": {kernel: launch overrides}}
    # (call 2 of v21 ran these with the attention backward inside _out_bwd as the default everywhere; since then
    # the default puts it there only where the op runs alone, and takes 32-row _out_bwd blocks there)
    "default": {},
    "attn_inside": {"flags": {"ATTN_IN_OUT_BWD": True}},
    "attn_outside": {"flags": {"ATTN_IN_OUT_BWD": False}},
    "attn_inside_bm32": {"flags": {"ATTN_IN_OUT_BWD": True}, "tiles": {"_out_bwd": {"BM": 32}}},
    "attn_inside_w8": {"flags": {"ATTN_IN_OUT_BWD": True}, "tiles": {"_out_bwd": {"num_warps": 8}}},
    "out_bm32": {"flags": {"ATTN_IN_OUT_BWD": False}, "tiles": {"_out_bwd": {"BM": 32}}},
    "out_bh128_w8": {"flags": {"ATTN_IN_OUT_BWD": False}, "tiles": {"_out_bwd": {"BH": 128, "num_warps": 8}}},
    "seqs_blk32": {"flags": {"ATTN_IN_OUT_BWD": False}, "tiles": {"_attn_bwd_seqs": {"BLK": 32}}},
    "dwo_bh64": {"tiles": {"_dwo": {"BH": 64}}},
    "dx_bh64_w4": {"tiles": {"_qkv_bwd_dx": {"BH": 64, "num_warps": 4}}},
    "qkv_fwd_bm64_w4": {"tiles": {"_qkv_fwd": {"BM": 64, "num_warps": 4}}},
    "attn_fwd_bm32": {"tiles": {"_attn_fwd": {"BM": 32, "BN": 32}}},
    "dwqkv_w4": {"tiles": {"_dwqkv": {"num_warps": 4}}},
    # (v22) the hybrid's dense heads launched before its MoSA heads (the router product and top-k then wait
    # for the dense QKV product's SMs)
    "dense_first": {"layer_flags": {"MOSA_HEADS_FIRST": False}},
    # (v22) the weight gradients' reduction in row slices (default: where a head has at least 32 row blocks
    # and the grid is small, not beside a hybrid's dense heads); one slice everywhere, or two / four forced
    # (beside the dense heads too)
    "wgrad_one_slice": {"flags": {"WGRAD_SPLIT": 1}},
    "wgrad_split2": {"flags": {"WGRAD_SPLIT": 2}},
    "wgrad_split4": {"flags": {"WGRAD_SPLIT": 4}},
    # (v22) the router's d-logit tile made in registers inside _dwqkv (the old form, whose products then wait
    # for each other: benchmarks/wgmma_waits.py); and the router's weight gradient in a kernel of its own
    # (_dwr) instead of inside _dwqkv; each with the rows in one slice too
    "dl16_off": {"flags": {"DL16_TILE": False}},
    "dl16_off_one_slice": {"flags": {"DL16_TILE": False, "WGRAD_SPLIT": 1}},
    "dwr_apart": {"flags": {"DWR_IN_DWQKV": False}},
    "dwr_apart_one_slice": {"flags": {"DWR_IN_DWQKV": False, "WGRAD_SPLIT": 1}},
    # (v23) the weight gradients on a stream of their own (default where the op runs alone in a CUDA graph):
    # never; always (beside a hybrid's dense heads, and in eager steps: --eager times its host cost). With the
    # rows in slices as well: wgrad_split4 (a forced split holds on the stream too)
    "wgrad_fork_off": {"flags": {"WGRAD_SIDE_STREAM": False}},
    "wgrad_fork_beside": {"flags": {"WGRAD_SIDE_STREAM": True}},
    # (v24) under autocast over float32 (--autocast): the kernels read x's and the weights' tiles as they are
    # and cast them, instead of the compute-dtype copies the op makes (default: x's where the router product
    # makes it, the weights' where a head has at least 256 rows); copies of the weights forced everywhere
    "narrow_off": {"flags": {"NARROW_X": False, "NARROW_WEIGHTS": False}},
    "narrow_x_only": {"flags": {"NARROW_WEIGHTS": False}},
    "narrow_weights_only": {"flags": {"NARROW_X": False}},
    "narrow_weights_all": {"flags": {"NARROW_WEIGHTS": True}},
    # (v32) the hybrid as one op (ops.triton_hybrid, as under torch.compile) in the captured step; and with both
    # parts on one stream. (v32 also timed launch orders inside the op: the dense QKV product before the MoSA heads,
    # the dense heads' backward stages launched before the MoSA heads' x and w_qkv gradients: all within 1 us.)
    "op": {"layer_flags": {"HYBRID_OP": True}},
    "op_one_stream": {"layer_flags": {"HYBRID_OP": True}, "hybrid_flags": {"PARALLEL": False}},
    # (v32) the op with the MoSA heads' y of their own and the masked sum (PROJECT_AFTER_DENSE off); the layer's
    # separate parts (HYBRID_OP off: before v32 the default in captured steps); project_into's launch: 32 rows per
    # program, or all h columns per program
    "op_sum": {"layer_flags": {"HYBRID_OP": True}, "hybrid_flags": {"PROJECT_AFTER_DENSE": False}},
    "parts": {"layer_flags": {"HYBRID_OP": False}},
    # (v32.4) the op converting the MoSA heads' scatter buffers (t3: y's scaled float16, x gradient's float32)
    # before summing them, instead of adding them in one pass (SUM_UNFINISHED off)
    "op_convert": {"hybrid_flags": {"SUM_UNFINISHED": False}},
    # (v33, with --autocast) the op taking x and the dense weights cast by the caller (WIDE_INPUT off; gradients
    # widened after it), and the layer's parts in captures under autocast (CAPTURED_WIDE off: before v33)
    "op_cast_input": {"layer_flags": {"HYBRID_OP": True}, "hybrid_flags": {"WIDE_INPUT": False}},
    "captured_parts": {"layer_flags": {"CAPTURED_WIDE": False}},
    # (v33, with --autocast) the eager routed op's copies (x, w_qkv, w_o, the router weight), and the wide hybrid
    # op's, one cast each
    "cast_apart": {"flags": {"CAST_TOGETHER": False}},
    "proj_bm32": {"flags": {"PROJECT_BM": 32}},
    "proj_whole_rows": {"flags": {"PROJECT_SPLIT_H": False}},
    "blk32_dwqkv_w4_fwd_bm32": {"tiles": {"_attn_bwd_seqs": {"BLK": 32}, "_dwqkv": {"num_warps": 4},
                                          "_attn_fwd": {"BM": 32, "BN": 32}}},
}


@contextlib.contextmanager
def settings(variant: dict):
    """``variant``'s switches and launch overrides, set for the duration of the block, then restored."""
    switched = [(SWITCHES[key], name, value) for key in SWITCHES for name, value in variant.get(key, {}).items()]
    saved = [(module, name, getattr(module, name)) for module, name, _ in switched]
    saved_tiles = dict(triton_mosa.TILE_OVERRIDES)
    try:
        for module, name, value in switched:
            setattr(module, name, value)
        triton_mosa.TILE_OVERRIDES.update(variant.get("tiles", {}))
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)
        triton_mosa.TILE_OVERRIDES.clear()
        triton_mosa.TILE_OVERRIDES.update(saved_tiles)


def capture(step, variant: dict):
    """The replay of a CUDA graph of ``step`` captured under ``variant``'s settings (restored afterwards)."""
    with settings(variant):
        replay, why = capture_graph(step)
    if replay is None:
        raise SystemExit(f"the step could not be captured under {variant}: {why}")
    return replay


def eager(step, variant: dict):
    """``step`` run eagerly under ``variant``'s settings at every call (``--eager``: host time included)."""
    def run():
        with settings(variant):
            return step()
    return run


def under_autocast(step):
    """``step`` under bf16 autocast (``--autocast``: float32 x and parameters, as a model trains)."""
    def run():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return step()
    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="t2", help=f"comma-separated, among {', '.join(CASES)}")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names of VARIANTS (all)")
    ap.add_argument("--rounds", type=int, default=7, help="rounds, each timing every variant in turn")
    ap.add_argument("--iters", type=int, default=100, help="replays per variant and round (their median)")
    ap.add_argument("--eager", action="store_true",
                    help="time eager steps (the host's launches included) instead of CUDA-graph replays")
    ap.add_argument("--autocast", action="store_true",
                    help="float32 x and parameters, each step under bf16 autocast (default: all bf16)")
    ap.add_argument("--timeline", default="", metavar="VARIANTS",
                    help="comma-separated variants whose replay's kernel timeline to print (and trace into --out)")
    ap.add_argument("--out", default=None, help="folder for variants.json")
    args = ap.parse_args()
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        ap.error(f"--variants: unknown {unknown}; known: {', '.join(VARIANTS)}")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    results = {}
    for case in args.cases.split(","):
        if case not in CASES:
            ap.error(f"--cases: unknown {case!r}; known: {', '.join(CASES)}")
        h, E, rho, nd, T, B, nd_cmp = CASES[case]
        torch.manual_seed(0)
        dt = torch.float32 if args.autocast else torch.bfloat16
        x = torch.randn(B, T, h, device="cuda", dtype=dt, requires_grad=True)
        dy = torch.randn(B, T, h, device="cuda", dtype=torch.bfloat16)

        def step_of(mod):
            return under_autocast(make_step(mod, x, dy)) if args.autocast else make_step(mod, x, dy)
        layer = MoSAAttention(h, E, rho, num_dense_heads=nd, backend="triton").cuda().to(dt)
        step_of(layer)()
        leaves = {"x": x, **dict(layer.named_parameters())}
        ref = {n: t.grad.detach().float().clone() for n, t in leaves.items()}
        replays = {}
        if nd_cmp:
            dense = DenseAttention(h, nd_cmp).cuda().to(dt)
            replays[f"dense {nd_cmp}"] = (eager if args.eager else capture)(step_of(dense), {})
        for name in names:
            replays[name] = (eager if args.eager else capture)(step_of(layer), VARIANTS[name])
            replays[name]()
            torch.cuda.synchronize()
            # the replay's gradients (x's and every weight's) against the eager default step's
            errs = {n: ((t.grad.float() - ref[n]).norm() / ref[n].norm()).item() for n, t in leaves.items()}
            worst = max(errs, key=errs.get)
            print(f"{case} {name}: replay's gradients against the eager default step's, relative: x "
                  f"{errs['x']:.1e}, worst {worst} {errs[worst]:.1e}", flush=True)
            if not errs[worst] < 2e-2:
                raise SystemExit(f"{case} {name}: the replay's gradient of {worst} is off ({errs[worst]:.2e})")
        for name in filter(None, args.timeline.split(",")):
            from bench_layer import replay_timeline  # (this folder: the same listing as bench_layer.py --timeline)
            if name not in replays:
                ap.error(f"--timeline: {name!r} is not among the variants timed")
            os.makedirs(args.out or ".", exist_ok=True)
            replay_timeline(replays[name], f"{case} {name}",
                            os.path.join(args.out or ".", f"trace_{case}_{name.replace(' ', '_')}.json"))
        base = f"dense {nd_cmp}" if nd_cmp else None
        results[case] = alternating_rounds(replays, args.rounds, args.iters, cuda=True, base=base, label=f"{case} ")
        print(f"== {case}: median over {args.rounds} rounds of {args.iters} {'eager steps' if args.eager else 'replays'}"
              + (f" (ratio to the dense {nd_cmp}-head layer)" if base else ""))
        for n, v in sorted(results[case].items(), key=lambda kv: kv[1]["ms"]):
            print(f"  {n:18s} {v['ms']:.4f} ms" + (f"  {v['ratio']:.3f}x" if base else ""), flush=True)
        del replays, layer
        torch.cuda.empty_cache()
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "variants.json")
        with open(path + ".tmp", "w") as f:  # written whole, then renamed
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "eager": args.eager,
                       "autocast": args.autocast,
                       "variants": {n: VARIANTS[n] for n in names}, "results": results}, f, indent=1)
        os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
