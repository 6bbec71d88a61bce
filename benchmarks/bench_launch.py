"""Host time of eager MoSA steps: how much of an eager forward + backward is spent launching Triton kernels, and
how much of each launch is Triton's own argument handling (binding, specialisation, cache key) rather than the
launch itself. A GPU measurement (needs CUDA); it reads Triton internals (``JITFunction.device_caches``,
``CompiledKernel.run``), so it may need changes for other Triton versions.

    python benchmarks/bench_launch.py --out $OUT

For every Triton launch of one eager step of the t1 layer (17 MoSA heads, h 512, B 16, T 1024, bf16) and of the
t2 hybrid, it times, over many repeats on the host: the whole ``JITFunction.run``; its binder alone
(arguments to specialisation); and the compiled kernel's launcher called directly with the bound arguments
(what a launch costs without Triton's per-call Python). It also times whole eager steps (the GPU synchronised
once at the end; bench_layer.py times their GPU side).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from mosa_attention.layers import MoSAAttention  # noqa: E402


def host_us(fn, reps: int) -> float:
    """Median over 5 rounds of the host time per call of ``fn`` (µs); the GPU synchronised after each round."""
    rounds = []
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        rounds.append((time.perf_counter() - t0) / reps * 1e6)
        torch.cuda.synchronize()
    return sorted(rounds)[2]


def record_launches(step):
    """Every ``JITFunction.run`` call of one ``step()``: (function, args, kwargs)."""
    from triton.runtime.jit import JITFunction
    seen, original = [], JITFunction.run

    def recording(self, *args, **kwargs):
        seen.append((self, args, dict(kwargs)))
        return original(self, *args, **kwargs)
    JITFunction.run = recording
    try:
        step()
        torch.cuda.synchronize()
    finally:
        JITFunction.run = original
    return seen


def launch_parts(fn, args, kwargs, reps: int) -> dict:
    """Host µs per call of the whole run, the binder, and a direct call of the compiled kernel's launcher."""
    from triton.runtime import driver
    grid = kwargs.pop("grid")
    kwargs.pop("warmup", None)
    whole = host_us(lambda: fn.run(*args, grid=grid, warmup=False, **kwargs), reps)
    row = {"kernel": fn.__name__, "run_us": whole}
    try:
        device = driver.active.get_current_device()
        caches = fn.device_caches[device]
        binder = caches[-1]
        row["binder_us"] = host_us(lambda: binder(*args, **kwargs), reps)
        bound, _, _ = binder(*args, **kwargs)
        kernel = fn.run(*args, grid=grid, warmup=False, **kwargs)
        values = list(bound.values())
        g = grid(bound) if callable(grid) else grid
        g0, g1, g2 = (tuple(g) + (1, 1))[:3]
        stream = driver.active.get_current_stream(device)

        def direct():
            meta = kernel.launch_metadata(g, stream, *values)
            kernel.run(g0, g1, g2, stream, kernel.function, kernel.packed_metadata, meta, None, None, *values)
        row["direct_us"] = host_us(direct, reps)
    except Exception as err:  # noqa: BLE001 (Triton internals differ between versions)
        row["error"] = f"{type(err).__name__}: {err}"[:200]
    return row


def make_step(layer, x, dy):
    def step():
        x.grad = None
        for p in layer.parameters():
            p.grad = None
        layer(x).backward(dy)
    return step


def run_case(name, layer, reps):
    x = torch.randn(16, 1024, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)
    step = make_step(layer, x, dy)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    launches = record_launches(step)
    out = {"case": name, "launches": len(launches), "eager_step_us": host_us(step, 20)}
    rows = [launch_parts(fn, args, kwargs, reps) for fn, args, kwargs in launches]
    out["rows"] = rows
    for key in ("run_us", "binder_us", "direct_us"):
        out[f"sum_{key}"] = sum(r.get(key, 0.0) for r in rows)
    print(f"== {name}: eager step {out['eager_step_us']:.0f} us host, "
          f"{len(launches)} Triton launches: run {out['sum_run_us']:.0f} us, of which binder "
          f"{out['sum_binder_us']:.0f}; direct launcher calls {out['sum_direct_us']:.0f} us", flush=True)
    for r in rows:
        print("   %-18s run %6.1f  binder %6.1f  direct %6.1f  %s" % (
            r["kernel"], r["run_us"], r.get("binder_us", float("nan")), r.get("direct_us", float("nan")),
            r.get("error", "")), flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=200, help="calls per timing round")
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for launch.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU (it times Triton launches on the host while the GPU runs them)")
    import triton
    torch.manual_seed(0)
    os.makedirs(args.out, exist_ok=True)
    result = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "command": " ".join(sys.argv), "cases": []}
    t1 = MoSAAttention(512, 17, 32, backend="triton").cuda().bfloat16()
    result["cases"].append(run_case("t1 17 MoSA heads", t1, args.reps))
    t2 = MoSAAttention(512, 17, 32, num_dense_heads=4, backend="triton").cuda().bfloat16()
    result["cases"].append(run_case("t2 hybrid 4 dense + 17 MoSA", t2, args.reps))
    with open(os.path.join(args.out, "launch.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
