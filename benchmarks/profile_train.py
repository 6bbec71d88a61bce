"""Where a whole model's training step spends the GPU's time: the step ``bench_train.py`` times (bf16 autocast
over float32 parameters, AdamW, clipping; the tiny preset by default), compiled with CUDA graphs
(``torch.compile(mode="reduce-overhead")``, the trainer's default on a GPU), profiled over a few steps. Prints per
step the time of each kind of kernel (our Triton kernels, inductor's, GEMMs, attention libraries, the
optimizer's, the rest), the GPU's span and its idle time inside it, and the longest kernels; ``--variants`` times
switches of the layers against each other (each model and variant in a process of its own); ``--compile-mode
default`` profiles inductor without CUDA graphs, ``--host`` the host's operators too.

    python benchmarks/profile_train.py --models dense,mosa17 --out $OUT/profile
    python benchmarks/profile_train.py --models mosa17,pure17 --variants default,wide_input
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_train import MODELS, build  # noqa: E402
from mosa_attention.train.config import OptimConfig  # noqa: E402
from mosa_attention.train.optim import build_optimizer  # noqa: E402

# name -> (module, attribute, value) set before the model is built
VARIANTS = {
    "default": None,
    # the fused op takes the norm's float32 x under torch.compile (before COMPILED_NARROW_INPUT)
    "wide_input": ("mosa_attention.layers.mosa", "COMPILED_NARROW_INPUT", False),
    # the dense heads' split + RoPE as torch ops for inductor to fuse (before the custom ops of v29)
    "torch_rope": ("mosa_attention.ops.attention", "COMPILED_SPLIT_ROPE", False),
    # a hybrid's MoSA and dense heads as separate ops of the compiled graph, one after the other (before v30)
    "parts": ("mosa_attention.layers.mosa", "HYBRID_OP", False),
    # the hybrid op with both parts on the current stream (its masked sums without the second stream)
    "one_stream": ("mosa_attention.ops.triton_hybrid", "PARALLEL", False),
    # the hybrid op's MoSA heads with a y of their own and the masked sum (before v32's projection after)
    "masked_sum": ("mosa_attention.ops.triton_hybrid", "PROJECT_AFTER_DENSE", False),
    # the hybrid op's MoSA scatter buffers converted first, then added to the dense heads' results (before v32.4)
    "convert_sums": ("mosa_attention.ops.triton_hybrid", "SUM_UNFINISHED", False),
}
# the variants that change nothing in a model without MoSA heads, or without dense heads beside them
NOT_FOR = {"dense": ("wide_input", "parts", "one_stream", "masked_sum", "convert_sums"),
           "pure17": ("parts", "one_stream", "masked_sum", "convert_sums")}


def kind(name: str) -> str:
    """The kind of a kernel, by its name."""
    low = name.lower()
    if low.startswith("triton_"):
        return "inductor"
    if any(s in low for s in ("nvjet", "gemm", "cutlass", "splitkreduce", "xmma", "cublas")):
        return "gemm"
    if any(s in low for s in ("sdpa", "cudnn", "flash", "fmha")):
        return "attention lib"
    if any(s in low for s in ("adam", "multi_tensor", "foreach")):
        return "optimizer"
    if low.startswith("memset") or low.startswith("memcpy"):
        return "memset/copy"
    if name.startswith("_") and not name.startswith("__"):
        return "ours (Triton)"
    return "other"


def run_one(model_name: str, variant: str, args) -> dict:
    spec = VARIANTS[variant]
    if spec is not None:
        import importlib
        setattr(importlib.import_module(spec[0]), spec[1], spec[2])
    dev = torch.device("cuda")
    model = build(model_name, args)
    T, vocab = model.config.seq_len, model.config.vocab_size
    opt = build_optimizer(model, OptimConfig(lr=1e-4))
    fwd = torch.compile(model, mode=None if args.compile_mode == "default" else args.compile_mode)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, vocab, (args.batch, T + 1), generator=g).to(dev) for _ in range(4)]

    def step(i: int):
        ids = batches[i % len(batches)]
        torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = fwd(ids[:, :-1], targets=ids[:, 1:], return_logits=False)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    first = step(0).item()
    for i in range(1, args.warmup):
        step(i)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(args.steps):
        step(args.warmup + i)
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) / args.steps * 1e3

    from torch.profiler import ProfilerActivity, profile
    n = args.profiled
    with profile(activities=[ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if args.host else [])) as p:
        for i in range(n):
            step(i)
            torch.cuda.synchronize()
            time.sleep(0.01)  # steps > 10 ms apart on the GPU's clock: the gaps below split them
    path = os.path.join(args.out, f"trace_{model_name}_{variant}.json") if args.out else None
    if path is None:
        import tempfile
        path = os.path.join(tempfile.mkdtemp(), "trace.json")
    p.export_chrome_trace(path)
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    kernels = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memset", "gpu_memcpy")),
                     key=lambda e: e["ts"])
    by_kind: dict = {}
    by_name: dict = {}
    for e in kernels:
        by_kind[kind(e["name"])] = by_kind.get(kind(e["name"]), 0.0) + e["dur"] / n
        c = by_name.setdefault(e["name"][:80], [0.0, 0])
        c[0] += e["dur"] / n
        c[1] += 1
    # the GPU's span per step and the time inside it when no kernel runs (steps are synchronised apart,
    # so the gaps between steps are cut at each step's first kernel)
    busy_union, span, last_end, start = 0.0, 0.0, None, None
    for e in kernels:
        s, t = e["ts"], e["ts"] + e["dur"]
        if last_end is None or s > last_end + 5000.0:  # a new step (steps are 10 ms apart, above)
            if last_end is not None:
                span += last_end - start
            start, last_end = s, t
            busy_union += t - s
            continue
        busy_union += max(0.0, t - max(s, last_end))
        last_end = max(last_end, t)
    if last_end is not None:
        span += last_end - start
    host = [] if not args.host else [  # the host's operators by their own time (not their callees')
        (e.key[:80], e.self_cpu_time_total / n / 1e3, e.count // n)
        for e in sorted(p.key_averages(), key=lambda e: -e.self_cpu_time_total)[:25]]
    return {"model": model_name, "variant": variant, "compile_mode": args.compile_mode, "host_top": host,
            "ms_per_step": ms, "first_loss": first,
            "heads": model.config.head_counts(), "gpu_span_ms": span / n / 1e3,
            "gpu_idle_ms": (span - busy_union) / n / 1e3, "kernels_per_step": len(kernels) / n,
            "ms_by_kind": {k: v / 1e3 for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "top": [(name, t / 1e3, c // n) for name, (t, c) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:30]]}


def show(r: dict) -> None:
    print(f"== {r['model']} {r['variant']} {r['heads']}: {r['ms_per_step']:.3f} ms per step (timed), first loss "
          f"{r['first_loss']:.4f}; profiled: GPU span {r['gpu_span_ms']:.3f} ms, idle {r['gpu_idle_ms']:.3f}, "
          f"{r['kernels_per_step']:.0f} kernels")
    for k, v in r["ms_by_kind"].items():
        print(f"   {k:<16} {v:7.3f} ms")
    for name, t, c in r["top"]:
        print(f"   {t:7.3f} ms  x{c:<4} {name}")
    if r.get("host_top"):
        print("   host, own time per step:")
        for name, t, c in r["host_top"]:
            print(f"   {t:7.3f} ms  x{c:<4} {name}")
    sys.stdout.flush()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="dense,mosa17,pure17,mosa", help=f"comma-separated, of {sorted(MODELS)}")
    ap.add_argument("--variants", default="default", help=f"comma-separated, of {sorted(VARIANTS)}")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=6)
    ap.add_argument("--steps", type=int, default=20, help="timed steps (wall clock, no profiler)")
    ap.add_argument("--profiled", type=int, default=3, help="profiled steps, synchronised apart")
    ap.add_argument("--timeout", type=float, default=200)
    ap.add_argument("--compile-mode", dest="compile_mode", default="reduce-overhead",
                    choices=["reduce-overhead", "default"], help="torch.compile's mode (default: inductor, no graphs)")
    ap.add_argument("--host", action="store_true", help="profile the host too: its operators' own time per step")
    ap.add_argument("--out", default=None, help="folder for profile_train.json and the traces")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    for key in ("n_layer", "d_model", "seq_len", "vocab_size"):
        ap.add_argument("--" + key.replace("_", "-"), dest=key, type=int, default=None)
    args = ap.parse_args()
    args.device = "cuda"  # (bench_train.build reads it)
    for name in args.models.split(","):
        if name not in MODELS:
            ap.error(f"--models: unknown model {name!r}; choose from {sorted(MODELS)}")
    for name in args.variants.split(","):
        if name not in VARIANTS:
            ap.error(f"--variants: unknown variant {name!r}; choose from {sorted(VARIANTS)}")
    if not torch.cuda.is_available():
        ap.error("profiles a CUDA training step: no CUDA device here")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    if args.one:
        model_name, variant = args.one.split(":")
        print("RESULT " + json.dumps(run_one(model_name, variant, args)))
        return
    rows = []
    for model_name in args.models.split(","):
        for variant in args.variants.split(","):
            if variant in NOT_FOR.get(model_name, ()):
                continue
            cmd = [sys.executable, __file__, "--one", f"{model_name}:{variant}"] + sys.argv[1:]
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            except subprocess.TimeoutExpired:
                print(f"== {model_name} {variant}: timed out after {args.timeout:.0f} s", flush=True)
                continue
            lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            if not lines:
                print(f"== {model_name} {variant}: failed\n{out.stderr[-3000:]}", flush=True)
                continue
            r = json.loads(lines[-1][len("RESULT "):])
            rows.append(r)
            show(r)
    meta = {"card": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": __import__("triton").__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": " ".join(sys.argv)}
    if args.out:
        with open(os.path.join(args.out, "profile_train.json"), "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
