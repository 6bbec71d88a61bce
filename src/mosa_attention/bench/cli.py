"""``mosa bench``: time a MoSA attention layer against a dense layer on this machine.

Forward + backward (a training step from empty gradients) and forward only, eagerly and, on CUDA, as a
replayed CUDA graph; peak memory on CUDA. The default is the paper's perplexity-matched tiny layer
(h = 512, 17 MoSA heads at sparsity 32, T = 1024, batch 16) against 9 dense heads; ``--official PATH`` adds
the official release's layer (eager only: it reads values back to the host, so it cannot be captured).
``--seq-len``, ``--sparsity``, ``--batch`` and ``--head-dim`` take comma-separated lists: every combination
is timed (a sweep: one table row each, one JSON, and with one swept setting ``--plot`` draws time against
it). The GPU measurements of issue 3 (all targets) are ``benchmarks/bench_layer.py``.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import time

SWEEPABLE = ("seq_len", "sparsity", "batch", "head_dim")


def _list_of(kind):
    """An argparse type: one value, or a comma-separated list of them (a sweep)."""
    def parse(text: str):
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__} or a comma-separated list, got {text!r}")
        if not values:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__} or a comma-separated list, got {text!r}")
        return values
    parse.__name__ = f"{kind.__name__} list"
    return parse


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--d-model", type=int, default=512, help="model width h (default 512)")
    p.add_argument("--mosa-heads", type=int, default=17, help="MoSA heads (default 17)")
    p.add_argument("--sparsity", type=_list_of(float), default=[32.0],
                   help="sparsity ρ: each MoSA head keeps T/ρ tokens (default 32; a comma-separated list sweeps)")
    p.add_argument("--hybrid-dense-heads", type=int, default=0, help="dense heads beside the MoSA heads (default 0)")
    p.add_argument("--hybrid-kind", default="dense", choices=("dense", "local"),
                   help="what the hybrid's other heads are: dense (default) or local, sliding-window heads")
    p.add_argument("--local-window", type=int, default=None,
                   help="with --hybrid-kind local: the window in tokens (default k at each T, as in the paper)")
    p.add_argument("--dense-heads", type=int, default=9, help="heads of the dense layer compared with (default 9)")
    p.add_argument("--head-dim", type=_list_of(int), default=[64], help="head width (default 64; a list sweeps)")
    p.add_argument("--seq-len", type=_list_of(int), default=[1024],
                   help="sequence length T (default 1024; a list such as 1024,4096,16384 sweeps)")
    p.add_argument("--batch", type=_list_of(int), default=[16], help="batch size (default 16; a list sweeps)")
    p.add_argument("--dtype", default="auto", choices=("auto", "bf16-autocast", "bfloat16", "float32"),
                   help="auto: bf16 autocast over float32 parameters on CUDA, float32 on CPU")
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "triton"), help="MoSA kernels (default auto)")
    p.add_argument("--deterministic", action="store_true", help="bit-repeatable scatter-adds (MoSAAttention(deterministic=True))")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--iters", type=int, default=20, help="timed repetitions, median reported (default 20)")
    p.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph timings")
    p.add_argument("--official", metavar="PATH",
                   help="also time the official release's layer: PATH holds its mosa/ package (github piotrpiekos/MoSA)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--plot", metavar="PNG", help="with one swept setting: draw each layer's time against it")


class BenchError(ValueError):
    pass


def _check(args) -> None:
    for name in ("d_model", "mosa_heads", "dense_heads", "iters"):
        value = getattr(args, name)
        if value < 1:
            raise BenchError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    for name in ("head_dim", "seq_len", "batch"):
        for value in _values(args, name):
            if value < 1:
                raise BenchError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.hybrid_dense_heads < 0:
        raise BenchError(f"--hybrid-dense-heads must be at least 0, got {args.hybrid_dense_heads}")
    kind, window = getattr(args, "hybrid_kind", "dense"), getattr(args, "local_window", None)
    if window is not None and (kind != "local" or window < 1):
        raise BenchError(f"--local-window needs --hybrid-kind local and a positive window, got --local-window "
                         f"{window} with --hybrid-kind {kind}")
    if kind == "local" and getattr(args, "official", None):
        raise BenchError("--official compares the official release's dense hybrid; it has no local heads "
                         "(drop --official or --hybrid-kind local)")
    for value in _values(args, "sparsity"):
        if not value >= 1:
            raise BenchError(f"--sparsity must be at least 1, got {value}")


def _values(args, name) -> list:
    """The values of a sweepable setting (a list from the command line, or one value set in code)."""
    value = getattr(args, name)
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _setup(args):
    import torch  # noqa: PLC0415

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"--device {args.device}: CUDA is not available here")
    dtype = args.dtype
    if dtype == "auto":
        dtype = "bf16-autocast" if device.type == "cuda" else "float32"
    param_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    autocast = torch.bfloat16 if dtype == "bf16-autocast" else None
    return torch, device, dtype, param_dtype, autocast


def measure(args) -> dict:
    """One configuration (every sweepable setting a single value): the layers' timings and the ratios."""
    _check(args)
    swept = [name for name in SWEEPABLE if len(_values(args, name)) > 1]
    if swept:
        raise BenchError(f"measure() times one configuration; {swept} hold several values (use sweep())")
    args = argparse.Namespace(**{**vars(args), **{name: _values(args, name)[0] for name in SWEEPABLE}})
    torch, device, dtype, param_dtype, autocast = _setup(args)
    from ..layers import DenseAttention, MoSAAttention  # noqa: PLC0415
    from ..ops.routing import num_selected  # noqa: PLC0415
    from .layer import time_layer  # noqa: PLC0415
    from .official import official_layer  # noqa: PLC0415

    h, T, B = args.d_model, args.seq_len, args.batch
    kind = getattr(args, "hybrid_kind", "dense")
    torch.manual_seed(0)
    layers = {
        "mosa": MoSAAttention(h, args.mosa_heads, args.sparsity, head_dim=args.head_dim,
                              num_dense_heads=args.hybrid_dense_heads, dense_kind=kind,
                              local_window=getattr(args, "local_window", None), backend=args.backend,
                              deterministic=True if args.deterministic else None),
        "dense": DenseAttention(h, args.dense_heads, head_dim=args.head_dim),
    }
    if args.official:
        try:
            layers["official"] = official_layer(args.official, h, args.mosa_heads, args.sparsity,
                                                args.hybrid_dense_heads, T, args.head_dim)
        except ValueError as err:
            raise BenchError(f"--official: {err}") from None
    x = torch.randn(B, T, h, device=device, dtype=param_dtype)
    rows = []
    for name, layer in layers.items():
        layer = layer.to(device=device, dtype=param_dtype)
        for backward in (True, False):
            t = time_layer(layer, x, backward, autocast_dtype=autocast, iters=args.iters,
                           graphs=not args.no_graphs and name != "official")
            rows.append({"layer": name, "step": "f+b" if backward else "fwd", **t.to_dict(), "best_ms": t.best_ms()})
        del layer
    params = {name: sum(p.numel() for p in layer.parameters()) for name, layer in layers.items()}
    best = {(r["layer"], r["step"]): r["best_ms"] for r in rows}
    return {
        "config": {"d_model": h, "mosa_heads": args.mosa_heads, "sparsity": args.sparsity,
                   "k": num_selected(T, args.sparsity), "hybrid_dense_heads": args.hybrid_dense_heads,
                   "hybrid_kind": kind, "local_window": getattr(args, "local_window", None),
                   "dense_heads": args.dense_heads, "head_dim": args.head_dim, "seq_len": T, "batch": B,
                   "dtype": dtype, "backend": args.backend, "deterministic": args.deterministic,
                   "mosa_params": params["mosa"], "dense_params": params["dense"]},
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "results": rows,
        "mosa_over_dense": {step: best[("mosa", step)] / best[("dense", step)] for step in ("f+b", "fwd")},
        **({"mosa_over_official": {step: best[("mosa", step)] / best[("official", step)] for step in ("f+b", "fwd")}}
           if "official" in layers else {}),
    }


def _fmt(v, pattern):
    return "-" if v is None else pattern % v


def sweep(args) -> dict:
    """Every combination of the sweepable settings' values, each measured as by ``measure``."""
    _check(args)
    from tqdm.auto import tqdm  # noqa: PLC0415

    combos = list(itertools.product(*(_values(args, name) for name in SWEEPABLE)))
    runs = []
    for combo in tqdm(combos, desc="mosa bench", unit="config", disable=len(combos) == 1, file=sys.stderr):
        runs.append(measure(argparse.Namespace(**{**vars(args), **dict(zip(SWEEPABLE, combo))})))
    return {"sweep": {name: _values(args, name) for name in SWEEPABLE if len(_values(args, name)) > 1},
            "device": runs[0]["device"], "torch": runs[0]["torch"], "python": runs[0]["python"],
            "date": runs[0]["date"], "runs": runs}


def _write_json(res: dict, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(res, f, indent=1)
    os.replace(tmp, path)  # never a half-written file


def _kind(c: dict) -> str:
    """The hybrid's other heads, as printed: "dense", or "local" with their window (k unless one was set)."""
    if c.get("hybrid_kind", "dense") != "local":
        return "dense"
    return f"local (window {c.get('local_window') or 'k'})"


def _print_one(res: dict) -> None:
    c = res["config"]
    print(f"{res['device']}, torch {res['torch']}, {c['dtype']}: h={c['d_model']}, {c['mosa_heads']} MoSA heads "
          f"(k={c['k']} of T={c['seq_len']}) + {c['hybrid_dense_heads']} {_kind(c)} vs {c['dense_heads']} dense heads, "
          f"head dim {c['head_dim']}, batch {c['batch']}")
    print(f"{'layer':<8} {'step':<4} {'eager ms':>9} {'graph ms':>9} {'peak MiB':>9}")
    for r in res["results"]:
        print(f"{r['layer']:<8} {r['step']:<4} {r['eager_ms']:>9.3f} {_fmt(r['graph_ms'], '%9.3f'):>9} "
              f"{_fmt(r['peak_mib'], '%9.1f'):>9}")
    print("MoSA / dense (best of eager and graph): " + ", ".join(f"{k} {v:.2f}x" for k, v in res["mosa_over_dense"].items()))
    if "mosa_over_official" in res:
        print("MoSA / official: " + ", ".join(f"{k} {v:.2f}x" for k, v in res["mosa_over_official"].items()))


def _print_sweep(res: dict) -> None:
    c = res["runs"][0]["config"]
    print(f"{res['device']}, torch {res['torch']}, {c['dtype']}: h={c['d_model']}, {c['mosa_heads']} MoSA heads "
          f"+ {c['hybrid_dense_heads']} {_kind(c)} vs {c['dense_heads']} dense heads; best of eager and graph, ms")
    official = "mosa_over_official" in res["runs"][0]
    head = (f"{'T':>6} {'rho':>6} {'k':>6} {'B':>4} {'D':>4} | {'MoSA f+b':>9} {'dense f+b':>9} {'ratio':>6} | "
            f"{'MoSA fwd':>9} {'dense fwd':>9} {'ratio':>6}" + (f" | {'vs official f+b':>15}" if official else ""))
    print(head)
    for run in res["runs"]:
        c = run["config"]
        best = {(r["layer"], r["step"]): r["best_ms"] for r in run["results"]}
        line = (f"{c['seq_len']:>6} {c['sparsity']:>6g} {c['k']:>6} {c['batch']:>4} {c['head_dim']:>4} | "
                f"{best['mosa', 'f+b']:>9.3f} {best['dense', 'f+b']:>9.3f} {run['mosa_over_dense']['f+b']:>5.2f}x | "
                f"{best['mosa', 'fwd']:>9.3f} {best['dense', 'fwd']:>9.3f} {run['mosa_over_dense']['fwd']:>5.2f}x")
        if official:
            line += f" | {run['mosa_over_official']['f+b']:>14.2f}x"
        print(line)


def run(args) -> int:
    try:
        _check(args)
        swept = [name for name in SWEEPABLE if len(_values(args, name)) > 1]
        if args.plot and len(swept) != 1:
            raise BenchError(f"--plot draws time against one swept setting (a comma-separated list in one of "
                             f"--seq-len, --sparsity, --batch, --head-dim), got {len(swept)} swept: {swept}")
        if all(len(_values(args, name)) == 1 for name in SWEEPABLE):
            res = measure(args)
            _print_one(res)
        else:
            res = sweep(args)
            _print_sweep(res)
    except BenchError as err:
        print(f"mosa bench: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        _write_json(res, args.json)
        print(f"json: {args.json}")
    if args.plot:
        from ..plots.bench import plot_sweep  # noqa: PLC0415
        print(f"plot: {plot_sweep(res['runs'], next(iter(res['sweep'])), args.plot)}")
    return 0
