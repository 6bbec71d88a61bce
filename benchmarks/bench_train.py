"""Training throughput of whole language models: dense against MoSA hybrids, eager against torch.compile against
torch.compile with CUDA graphs (``mode="reduce-overhead"``). The paper's tiny preset by default (6 layers,
d_model 512, T = 1024, vocabulary 8192), bf16 autocast over float32 parameters, AdamW, gradient clipping: the
step ``mosa train`` takes, on random tokens (throughput does not depend on the text, so no data is needed).

    python benchmarks/bench_train.py --out $OUT                       # every model and mode, one process each
    python benchmarks/bench_train.py --models mosa --modes eager       # one configuration, in this process
    python benchmarks/bench_train.py --models mosa17 --modes graphs,capture  # capture: eager attention layers
                                      # (a hybrid's two streams) inside CUDA graphs, inductor for the rest (v29.2)

Models: ``dense`` (9 dense heads), ``mosa`` (the FLOP-matched hybrid of ``configs/tiny-mosa.toml``: 4 dense heads
and as many MoSA heads of sparsity 32 as the dense model's FLOPs allow), ``mosa17`` (the perplexity-matched
hybrid of the paper: 4 dense + 17 MoSA heads, sparsity 32); ``local17`` (its dense heads as sliding-window
heads, on FlexAttention on a GPU; not run by default). Each line reports tokens/s over the timed steps
(after warm-up steps that include compiling), the peak memory allocated in the timed steps and the memory
reserved after them (CUDA graphs replay out of a pool reserved while they were recorded, so their steps
allocate almost nothing: compare modes by what is reserved), and the first step's loss (from the same initial
weights and tokens in every mode, so the modes must agree on it).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from mosa_attention import MoSAConfig, MoSALM  # noqa: E402
from mosa_attention.train.config import OptimConfig  # noqa: E402
from mosa_attention.train.optim import build_optimizer  # noqa: E402

MODELS = {
    "dense": dict(attention="dense"),
    "mosa": dict(attention="mosa", sparsity=32, num_dense_heads=4),
    "mosa17": dict(attention="mosa", sparsity=32, num_dense_heads=4, num_sparse_heads=17),
    # (not in the default list) the same with sliding-window heads on FlexAttention beside the MoSA heads
    "local17": dict(attention="mosa", sparsity=32, num_dense_heads=4, num_sparse_heads=17, dense_kind="local"),
    # (not in the default list) 17 MoSA heads alone per layer: the op's backward forks its weight gradients onto
    # a stream of their own (triton_mosa.WGRAD_SIDE_STREAM), which the compiled modes must capture
    "pure17": dict(attention="pure_mosa", sparsity=32, num_sparse_heads=17),
}
DEFAULT_MODELS = ("dense", "mosa", "mosa17")
MODES = ("eager", "compile", "graphs")
# (not in the default list) "capture": eager attention layers, inductor elsewhere, the step as CUDA graphs
ALL_MODES = MODES + ("capture",)


def build(name: str, args) -> MoSALM:
    over = dict(MODELS[name])
    for key in ("n_layer", "d_model", "seq_len", "vocab_size"):
        if getattr(args, key) is not None:
            over[key] = getattr(args, key)
    cfg = MoSAConfig.from_preset(args.preset, **over)
    torch.manual_seed(0)
    return MoSALM(cfg).to(args.device)


def run_one(name: str, mode: str, args) -> dict:
    """Warm-up steps, then timed steps of one model in one mode."""
    dev = torch.device(args.device)
    if args.no_narrow:
        from mosa_attention.ops import triton_mosa
        triton_mosa.NARROW_X = triton_mosa.NARROW_WEIGHTS = False
    # as `mosa train --compile true` does (train.loop), no hybrid op under torch.compile without CUDA graphs
    hybrid_op = mode == "graphs" and not args.hybrid_parts
    if not hybrid_op:
        from mosa_attention.layers import mosa as mosa_layer
        mosa_layer.HYBRID_OP = False
    model = build(name, args)
    cfg = model.config
    T, vocab = cfg.seq_len, cfg.vocab_size
    opt = build_optimizer(model, OptimConfig(lr=1e-4))  # the trainer's: AdamW, fused on a GPU
    fwd = model
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, vocab, (args.batch, T + 1), generator=g).to(dev) for _ in range(4)]
    amp = dev.type == "cuda"
    if mode == "compile":
        fwd = torch.compile(model)
    elif mode == "graphs":
        fwd = torch.compile(model, mode="reduce-overhead")
    elif mode == "capture":
        # the attention layers eagerly (a hybrid's two streams, masked sums), inductor for the rest (norms, MLPs,
        # residual adds, the loss), the whole forward and backward recorded as two CUDA graphs
        for blk in model.blocks:
            blk.attn.forward = torch.compiler.disable(blk.attn.forward)

        class LossOf(torch.nn.Module):  # (a module, so that the graphs' backward makes the weights' gradients)
            def __init__(self):
                super().__init__()
                self.inner = torch.compile(model)

            def forward(self, ids, targets):
                return self.inner(ids, targets=targets)[1]

        ids0 = batches[0]
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp, cache_enabled=False):
            fwd_graphed = torch.cuda.make_graphed_callables(LossOf(), (ids0[:, :-1].contiguous(),
                                                                       ids0[:, 1:].contiguous()))

        def fwd(ids, targets, return_logits=False):
            return None, fwd_graphed(ids.contiguous(), targets.contiguous())

    def step(i: int) -> torch.Tensor:
        ids = batches[i % len(batches)]
        if mode == "graphs":
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp, cache_enabled=mode != "capture"):
            _, loss = fwd(ids[:, :-1], targets=ids[:, 1:], return_logits=False)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach().clone()

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    t0 = time.perf_counter()
    first = step(0).item()
    for i in range(1, args.warmup):
        step(i)
    sync()
    warm_s = time.perf_counter() - t0
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    for i in range(args.steps):
        last = step(args.warmup + i)
    sync()
    dt = time.perf_counter() - t0
    row = {"model": name, "mode": mode, "narrow": not args.no_narrow, "hybrid_op": hybrid_op,
           "heads": cfg.head_counts(),
           "params_M": model.num_params() / 1e6, "forward_GFLOPs_per_seq": cfg.forward_flops() / 1e9,
           "batch": args.batch, "T": T, "steps": args.steps, "warmup_steps": args.warmup,
           "warmup_s": warm_s, "ms_per_step": dt / args.steps * 1e3,
           "tokens_per_s": args.batch * T * args.steps / dt, "first_loss": first, "last_loss": last.item(),
           "peak_MiB": torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None,
           "reserved_MiB": torch.cuda.memory_reserved(dev) / 2**20 if dev.type == "cuda" else None}
    return row


# a C/C++ compiler's chatter (torch.compile builds helpers on the host): warnings, their source excerpts, includes
_COMPILER_NOISE = re.compile(r"warning:|note:|In file included|^\s+from /|^\s*\d*\s*\|")


def failure(text: str, keep: int = 3000) -> str:
    """The end of a failed run's output without compiler warnings, so that the exception stays in view."""
    return "\n".join(ln for ln in text.splitlines() if not _COMPILER_NOISE.search(ln))[-keep:]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS), help=f"comma-separated, of {sorted(MODELS)}")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {list(ALL_MODES)}")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--n-layer", dest="n_layer", type=int, default=None)
    ap.add_argument("--d-model", dest="d_model", type=int, default=None)
    ap.add_argument("--seq-len", dest="seq_len", type=int, default=None)
    ap.add_argument("--vocab-size", dest="vocab_size", type=int, default=None)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (compiling happens here)")
    ap.add_argument("--steps", type=int, default=30, help="timed steps")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--timeout", type=float, default=240, help="seconds per configuration when several run")
    ap.add_argument("--no-narrow", dest="no_narrow", action="store_true",
                    help="the MoSA op without its compute-dtype copies of x and the weights under autocast "
                         "(triton_mosa.NARROW_X, NARROW_WEIGHTS off; for comparison)")
    ap.add_argument("--hybrid-parts", dest="hybrid_parts", action="store_true",
                    help="with CUDA graphs (mode graphs) a hybrid's MoSA and dense heads as separate ops of the compiled "
                         "graph, one after the other (layers.mosa.HYBRID_OP off; for comparison)")
    ap.add_argument("--out", default=None, help="folder for train.json")
    args = ap.parse_args()
    models, modes = args.models.split(","), args.modes.split(",")
    for m in models:
        if m not in MODELS:
            ap.error(f"--models: unknown model {m!r}; choose from {sorted(MODELS)}")
    for m in modes:
        if m not in ALL_MODES:
            ap.error(f"--modes: unknown mode {m!r}; choose from {list(ALL_MODES)}")
    if args.warmup < 1 or args.steps < 1:
        ap.error(f"--warmup and --steps must be >= 1, got {args.warmup} and {args.steps}")
    rows = []
    if len(models) * len(modes) == 1:
        rows.append(run_one(models[0], modes[0], args))
        print(json.dumps(rows[0]), flush=True)
    else:  # one process per configuration: compile caches, CUDA graph pools and failures stay apart
        for name in models:
            for mode in modes:
                cmd = [sys.executable, __file__, "--models", name, "--modes", mode] + [
                    a for key in ("preset", "n_layer", "d_model", "seq_len", "vocab_size", "batch", "warmup",
                                  "steps", "device") if getattr(args, key) is not None
                    for a in (f"--{key.replace('_', '-')}", str(getattr(args, key)))] + (
                    ["--no-narrow"] if args.no_narrow else []) + (["--hybrid-parts"] if args.hybrid_parts else [])
                try:
                    p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                    line = next((ln for ln in reversed(p.stdout.splitlines()) if ln.startswith("{")), None)
                    row = json.loads(line) if p.returncode == 0 and line else {
                        "model": name, "mode": mode, "error": failure(p.stderr or p.stdout)}
                except subprocess.TimeoutExpired:
                    row = {"model": name, "mode": mode, "error": f"timed out after {args.timeout:.0f} s"}
                rows.append(row)
                print(json.dumps(row) if "error" not in row else json.dumps(row)[:400], flush=True)
                save(args, rows)  # after each one: a run cut short keeps what it measured
    print(f"\n{'model':8} {'mode':8} {'ms/step':>9} {'tokens/s':>10} {'peak MiB':>9} {'reserved':>9} {'first loss':>10} "
          f"{'warm-up s':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['model']:8} {r['mode']:8} failed: {r['error'].strip().splitlines()[-1][:100]}")
        else:
            peak, res = ("-" if r.get(k) is None else f"{r[k]:.0f}" for k in ("peak_MiB", "reserved_MiB"))
            # (nn: --no-narrow; parts: --hybrid-parts)
            parts = r["mode"] == "graphs" and not r.get("hybrid_op", True)
            mode = r["mode"] + ("" if r.get("narrow", True) else ",nn") + (",parts" if parts else "")
            print(f"{r['model']:8} {mode:8} {r['ms_per_step']:9.2f} {r['tokens_per_s']:10,.0f} {peak:>9} {res:>9} "
                  f"{r['first_loss']:10.4f} {r['warmup_s']:9.1f}")
    save(args, rows)


def save(args, rows) -> None:
    """``train.json`` in ``--out`` (written to a temporary file, then renamed)."""
    if not args.out:
        return
    os.makedirs(args.out, exist_ok=True)
    meta = {"torch": torch.__version__, "python": platform.python_version(),
            "card": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv)}
    tmp = os.path.join(args.out, "train.json.tmp")
    with open(tmp, "w") as f:
        json.dump({**meta, "rows": rows}, f, indent=1)
    os.replace(tmp, os.path.join(args.out, "train.json"))


if __name__ == "__main__":
    main()
