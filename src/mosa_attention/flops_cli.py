"""``mosa flops``: the dense model's forward FLOPs and the FLOP-matched sparse model beside it."""
from __future__ import annotations

import argparse
import json

from .models.config import ATTENTION_KINDS, PRESETS, MoSAConfig


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), help="start from one of the paper's sizes")
    p.add_argument("--d-model", type=int, help="model width h (tiny: 512)")
    p.add_argument("--layers", type=int, help="number of layers l (tiny: 6)")
    p.add_argument("--heads", type=int, help="heads of the dense model (tiny: 9)")
    p.add_argument("--head-dim", type=int, default=64, help="head width h' (default 64)")
    p.add_argument("--seq-len", type=int, default=1024, help="sequence length T (default 1024)")
    p.add_argument("--sparsity", type=float, default=32.0, help="sparsity ρ (default 32)")
    p.add_argument("--dense-heads", type=int, default=4, help="dense heads kept beside MoSA heads (default 4)")
    p.add_argument("--attention", choices=[a for a in ATTENTION_KINDS if a != "dense"], default="mosa",
                   help="sparse attention kind to match (default: mosa hybrid)")
    p.add_argument("--vocab-size", type=int, default=8192, help="vocabulary, for the parameter count (default 8192)")
    p.add_argument("--json", action="store_true", help="print JSON")


def _params(cfg: MoSAConfig) -> int:
    import torch

    from .models.lm import MoSALM

    with torch.device("meta"):
        return MoSALM(cfg).num_params()


def compute(args) -> dict:
    base = dict(PRESETS[args.preset]) if args.preset else {}
    for key, arg in (("d_model", "d_model"), ("n_layer", "layers"), ("n_head", "heads")):
        if getattr(args, arg) is not None:
            base[key] = getattr(args, arg)
    missing = [f"--{a.replace('_', '-')}" for k, a in (("d_model", "d_model"), ("n_layer", "layers"), ("n_head", "heads"))
               if k not in base]
    if missing:
        raise ValueError(f"give --preset or {', '.join(missing)}")
    common = dict(base, head_dim=args.head_dim, seq_len=args.seq_len, vocab_size=args.vocab_size)
    dense = MoSAConfig(attention="dense", **common)
    sparse = MoSAConfig(attention=args.attention, sparsity=args.sparsity,
                        num_dense_heads=args.dense_heads if args.attention == "mosa" else 0, **common)
    return {
        "attention": args.attention,
        "d_model": dense.d_model, "layers": dense.n_layer, "heads": dense.n_head, "head_dim": dense.head_dim,
        "seq_len": dense.seq_len, "sparsity": sparse.sparsity, "k": sparse.k,
        "dense_heads": sparse.dense_heads,
        "num_mosa_heads": sparse.sparse_heads,
        "gflops_forward": sparse.forward_flops() / 1e9,
        "dense_gflops_forward": dense.forward_flops() / 1e9,
        "params": _params(sparse),
        "dense_params": _params(dense),
        # (routing attention has no KV-cache generation: no count)
        "kv_cache_entries_per_layer": None if args.attention == "routing" else sparse.kv_cache_entries_per_layer(),
        "dense_kv_cache_entries_per_layer": dense.kv_cache_entries_per_layer(),
    }


def run(args) -> int:
    r = compute(args)  # (a bad value is a ValueError: `mosa` prints it as one line, "mosa flops: error: ...")
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"dense model: {r['layers']} layers, d_model {r['d_model']}, {r['heads']} heads of {r['head_dim']}, T={r['seq_len']}")
    print(f"  forward: {r['dense_gflops_forward']:.3f} GFLOPs per sequence, {r['dense_params']:,} parameters, "
          f"KV cache {r['dense_kv_cache_entries_per_layer']:,} entries per layer")
    print(f"{r['attention']} at sparsity {r['sparsity']:g} (k={r['k']}), keeping {r['dense_heads']} dense heads: "
          f"{r['num_mosa_heads']} sparse heads")
    kv = r["kv_cache_entries_per_layer"]
    print(f"  forward: {r['gflops_forward']:.3f} GFLOPs per sequence, {r['params']:,} parameters, "
          + ("no KV-cache generation for this kind" if kv is None else f"KV cache {kv:,} entries per layer"))
    return 0
