"""torch.compile on a GPU: a MoSA hybrid layer (dense, and local heads on FlexAttention) and a small MoSALM, compiled (inductor, fullgraph) against
eager, outputs and gradients compared, steps timed. One device call:

    python benchmarks/check_compile.py --out $OUT
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from mosa_attention import MoSAAttention, MoSAConfig, MoSALM  # noqa: E402
from mosa_attention.ops import attention as attention_ops  # noqa: E402


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def timed(fn, n=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    res = {"torch": torch.__version__, "card": torch.cuda.get_device_name()}
    torch.manual_seed(0)
    x = torch.randn(16, 1024, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)

    def step(layer, fn):
        def run():
            x.grad = None
            for p in layer.parameters():
                p.grad = None
            y = fn(x)
            y.backward(dy)
            return [y.detach(), x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
        return run

    # 1. the t2 hybrid layer, bf16 parameters; 1b. a local hybrid (4 sliding-window heads beside 17 MoSA
    # heads): FlexAttention inside the compiled graph, its block mask first made there (the cache cleared, the
    # compiled layer run first)
    for key, kind in (("layer", "dense"), ("local_layer", "local")):
        layer = MoSAAttention(512, 17, 32, num_dense_heads=4, dense_kind=kind, local_window=64 if kind == "local" else None,
                              backend="triton").cuda().bfloat16()
        compiled = torch.compile(layer, fullgraph=True)
        attention_ops._FLEX_MASKS.clear()
        compiled_out = step(layer, compiled)()
        eager_out = step(layer, layer)()
        res[key] = {"max_rel_err_vs_eager": max(rel(a, b) for a, b in zip(compiled_out, eager_out)),
                    "eager_ms": timed(step(layer, layer)), "compiled_ms": timed(step(layer, compiled))}
        print(key, res[key], flush=True)
    # 2. a training step of the tiny preset's perplexity-matched hybrid (4 dense + 17 MoSA heads, rho 32)
    cfg = MoSAConfig.from_preset("tiny", attention="mosa", sparsity=32, seq_len=1024, num_sparse_heads=17)
    if cfg is not None:
        model = MoSALM(cfg).cuda()
        ids = torch.randint(0, cfg.vocab_size, (8, cfg.seq_len + 1), device="cuda")
        cm = torch.compile(model)
        losses = []
        for fn in (model, cm):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = fn(ids[:, :-1], targets=ids[:, 1:])
            losses.append(out[1].item())

        def lm_step(fn):
            def run():
                model.zero_grad(set_to_none=True)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    out = fn(ids[:, :-1], targets=ids[:, 1:])
                out[1].backward()
            return run
        res["lm"] = {"loss_eager": losses[0], "loss_compiled": losses[1], "eager_ms": timed(lm_step(model), 10),
                     "compiled_ms": timed(lm_step(cm), 10)}
        print("lm", res["lm"], flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "compile.json"), "w") as f:
        json.dump(res, f, indent=1)
    ok = res["layer"]["max_rel_err_vs_eager"] < 2e-2 and res["local_layer"]["max_rel_err_vs_eager"] < 2e-2 and (
        "lm" not in res or abs(res["lm"]["loss_eager"] - res["lm"]["loss_compiled"]) < 2e-2 * abs(res["lm"]["loss_eager"]))
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
