"""Measure generation: KV-cache bytes per token from the cache's real tensors, prefill time and decode
tokens/s, for a dense model and MoSA models of equal FLOPs (the paper's presets, FLOP-matched heads). Decoding
is timed twice: through the paged cache's steps (``extend``) and with fixed shapes (``inference.static``, each
step a CUDA graph on a GPU), with the largest difference of the two paths' last logits.

    python benchmarks/bench_generation.py                                  # CPU, tiny preset, a few lengths
    python benchmarks/bench_generation.py --device cuda --prompt-lens 128 1024 4032 --out results/gen.json

Weights are random; what a MoSA head caches depends only on how many tokens pass its threshold, so every
threshold is first calibrated (``calibrate_thresholds``) on random tokens to keep k = T/sparsity of T, as a
calibrated or aux-trained model does. Decoding is teacher-forced on random tokens (a random model's greedy
output repeats itself, which would make every head keep all or nothing); a step costs the same either way.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from mosa_attention import MoSAConfig, MoSALM  # noqa: E402
from mosa_attention.inference import calibrate_thresholds, extend, new_cache  # noqa: E402
from mosa_attention.inference.static import StaticDecoder  # noqa: E402

MODELS = {  # name -> MoSAConfig overrides on the preset
    "dense": dict(attention="dense"),
    "mosa-hybrid": dict(attention="mosa", dense_kind="dense"),
    "mosa-local-hybrid": dict(attention="mosa", dense_kind="local"),
    "pure-mosa": dict(attention="pure_mosa"),
}


def bench_model(name: str, device, dtype=torch.float32, preset: str = "tiny", sparsity: float = 32.0):
    """The benchmark's model ``name`` (of ``MODELS``) on ``device`` in ``dtype``, in eval mode: random weights
    (seed 0), the MoSA heads' thresholds calibrated on random tokens (k = T/sparsity kept)."""
    cfg = MoSAConfig.from_preset(preset, sparsity=sparsity, **MODELS[name])
    torch.manual_seed(0)
    model = MoSALM(cfg).to(device).eval()
    for m in model.modules():  # the full forward passes of calibration: the reference op is enough
        if hasattr(m, "backend"):
            m.backend = "torch"
    if cfg.sparse_heads and cfg.attention != "local":
        calib = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len), device=device)
        with torch.no_grad():
            calibrate_thresholds(model, [calib])
    return model.to(dtype)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(model, prompt_len: int, new_tokens: int, batch: int, device, repeats: int,
            static_backend: str = "auto", compile_step: bool = False) -> dict:
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (batch, prompt_len + new_tokens), generator=g).to(device)
    prefill, decode, fixed = [], [], []
    pad = torch.zeros(batch, dtype=torch.long, device=device)
    for _ in range(repeats):
        cache = new_cache(model, pad)
        sync(device)
        t0 = time.perf_counter()
        extend(model, ids[:, :prompt_len], cache)
        sync(device)
        t1 = time.perf_counter()
        for t in range(prompt_len, prompt_len + new_tokens):
            last = extend(model, ids[:, t:t + 1], cache)[:, -1]
        sync(device)
        t2 = time.perf_counter()
        prefill.append(t1 - t0)
        decode.append(t2 - t1)
        # the same steps with fixed shapes (inference.static; CUDA graphs on a GPU): the first step records the
        # graph and is left out of the time
        other = new_cache(model, pad)
        extend(model, ids[:, :prompt_len], other)
        decoder = StaticDecoder(model, other, max_len=prompt_len + new_tokens, backend=static_backend,
                                compile=compile_step)
        decoder.step(ids[:, prompt_len])
        sync(device)
        t3 = time.perf_counter()
        for t in range(prompt_len + 1, prompt_len + new_tokens):
            last_fixed = decoder.step(ids[:, t])
        sync(device)
        fixed.append(time.perf_counter() - t3)
    tokens = batch * (prompt_len + new_tokens)
    return {
        "prompt_len": prompt_len, "new_tokens": new_tokens, "batch": batch,
        "prefill_s": statistics.median(prefill),
        "decode_tokens_per_s": batch * new_tokens / statistics.median(decode),
        "decode_ms_per_step": 1e3 * statistics.median(decode) / new_tokens,
        "fixed_decode_tokens_per_s": batch * (new_tokens - 1) / statistics.median(fixed),
        "fixed_decode_ms_per_step": 1e3 * statistics.median(fixed) / (new_tokens - 1),
        "fixed_graphs": decoder.graphs,
        # the last step's logits, paged cache against fixed shapes
        "fixed_max_abs_diff": float((last.float() - last_fixed.float()).abs().max()),
        "kv_bytes_allocated": cache.nbytes(), "kv_bytes_held": cache.held_bytes(),
        "cache_bytes_with_bookkeeping": cache.nbytes(kv_only=False),
        "kv_bytes_per_token_allocated": cache.nbytes() / tokens, "kv_bytes_per_token_held": cache.held_bytes() / tokens,
        "entries": cache.entries(),
        # of the (MoSA head, token) pairs, the share a head kept: 1/sparsity when calibrated
        "sparse_kept_fraction": cache.entries()["sparse"] / max(1, tokens * sum(
            layer["sparse"].count.shape[1] for layer in cache.layers if layer["sparse"] is not None)),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--sparsity", type=float, default=32.0)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--prompt-lens", nargs="+", type=int, default=[128, 512, 1024])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--batch", nargs="+", type=int, default=[1])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=2, help="timed repeats per case after one warm-up; median")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--static-backend", default="auto", choices=["auto", "torch", "triton"],
                   help="the fixed-shape steps' MoSA heads (inference.static's backend)")
    p.add_argument("--compile-step", action="store_true",
                   help="the fixed-shape step's torch ops through torch.compile (StaticDecoder(compile=True))")
    p.add_argument("--out", default=None, help="JSON file for the rows")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"# {where}, torch {torch.__version__}, {args.dtype}, threads {torch.get_num_threads()}", flush=True)
    rows = []
    for name in args.models:
        model = bench_model(name, device, dtype, args.preset, args.sparsity)
        cfg = model.config
        print(f"## {name}: heads per layer {cfg.head_counts()}, {cfg.forward_flops() / 1e9:.1f} GFLOPs forward "
              f"at T={cfg.seq_len}", flush=True)
        for batch in args.batch:
            measure(model, min(args.prompt_lens), 3, batch, device, 1, args.static_backend, args.compile_step)  # warm-up
            for L in args.prompt_lens:
                if L + args.new_tokens > cfg.longest_input:
                    continue
                row = {"model": name, "heads": cfg.head_counts(), "preset": args.preset, "sparsity": args.sparsity,
                       "device": where, "dtype": args.dtype,
                       "static_backend": args.static_backend, "compile_step": args.compile_step,
                       **measure(model, L, args.new_tokens, batch, device, args.repeats, args.static_backend,
                                 args.compile_step)}
                rows.append(row)
                if args.out:  # after every row, so that a run cut short keeps what it measured
                    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
                    with open(args.out, "w") as f:
                        json.dump(rows, f, indent=1)
                print(f"{name:18s} B={batch:<3d} L={L:<5d} prefill {row['prefill_s'] * 1e3:8.1f} ms  decode "
                      f"{row['decode_tokens_per_s']:8.1f} tok/s, fixed shapes {row['fixed_decode_tokens_per_s']:8.1f} "
                      f"tok/s (logits within {row['fixed_max_abs_diff']:.1e})  KV/token {row['kv_bytes_per_token_held'] / 1024:7.1f} KiB "
                      f"held, {row['kv_bytes_per_token_allocated'] / 1024:7.1f} KiB allocated, MoSA heads keep "
                      f"{row['sparse_kept_fraction']:.4f}", flush=True)
        del model
    return 0


if __name__ == "__main__":
    sys.exit(main())
