"""Device check (not committed): is strict mode needed for bit-repeatable GPU runs, and what does it cost?"""
import json, sys, time
from pathlib import Path
import numpy as np
import torch
import mosa_attention.train.loop as loop
from mosa_attention.train.config import build_config

root = Path(sys.argv[1])
corpus = root / "corpus"
corpus.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)
words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "the", "of", "and"]
for i in range(400):
    (corpus / f"doc{i:03d}.txt").write_text(" ".join(rng.choice(words, size=300)) + ".")

def run(name, mode, extra=()):
    out = root / name
    ov = [f"data.source={str(corpus)!r}", f"data.cache_dir={str(root / 'cache')!r}", "data.vocab_size=300",
          "train.steps=12", "train.batch_size=16", "train.log_every=1", "train.eval_windows=4", "train.save_every=0",
          "train.device=cuda", f"train.out_dir={str(out)!r}", *extra]
    if mode == "strict":
        ov.append("train.deterministic=true")
    elif mode == "warn":
        ov.append("train.deterministic=true")
    real = loop._deterministic
    if mode == "warn":
        loop._deterministic = lambda dev: torch.use_deterministic_algorithms(True, warn_only=True)
    torch.cuda.synchronize(); t0 = time.time()
    loop.train(build_config(None, ov), log=lambda *a: None)
    torch.cuda.synchronize(); dt = time.time() - t0
    loop._deterministic = real
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r], dt

for label, extra in (("toy preset (T=256, 4 layers, mosa hybrid)", ()),
                     ("tiny preset layer sizes, 2 layers, T=1024", ("model.preset='tiny'", "model.n_layer=2", "train.batch_size=4"))):
    print("==", label)
    for mode in ("default", "warn", "strict"):
        a, ta = run(f"{mode}_a_{len(extra)}", mode, extra)
        b, tb = run(f"{mode}_b_{len(extra)}", mode, extra)
        diff = max(abs(x - y) / abs(y) for x, y in zip(a, b))
        print(f"{mode:8s} repeat bit for bit: {a == b}; max rel diff {diff:.2e}; wall {ta:.1f} / {tb:.1f} s; "
              f"last loss {a[-1]:.6f}", flush=True)
