"""Summary of `benchmarks/gpu_train_dist.sh`'s runs: steady throughput and the loss curves against a reference.

    python benchmarks/train_dist_summary.py OUT      # reads OUT/*.metrics.jsonl, OUT/rc.txt; writes OUT/summary.json

For each run: the median of the logged tokens/s after the first ``--skip`` steps (the first steps compile and
record the graphs), the milliseconds per step that gives, the last logged training loss and the final
validation loss, and the largest difference of its logged training losses from its model's reference run
(same data, same global batch): ``<model>_graphs_1p`` where there is one, else ``<model>_ddp``.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def read_run(path: Path) -> dict:
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if r.get("split") == "val"]
    return {"train": train, "val_loss": val[-1]["val_loss"] if val else None}


def summarise(out: Path, skip: int) -> list[dict]:
    procs = {}
    rc_file = out / "rc.txt"
    if rc_file.is_file():
        for ln in rc_file.read_text().splitlines():
            name, nproc, rc = ln.split()
            procs[name] = (int(nproc), int(rc.split("=")[1]))
    runs = {p.name[:-len(".metrics.jsonl")]: read_run(p) for p in sorted(out.glob("*.metrics.jsonl"))}
    table = []
    for name, run in runs.items():
        model = name.split("_")[0]
        ref_name = next((r for r in (f"{model}_graphs_1p", f"{model}_ddp") if r in runs and r != name), None)
        steady = [r["tokens_per_s"] for r in run["train"] if r["step"] > skip]
        tps = statistics.median(steady) if steady else None
        tokens_per_step = run["train"][0]["tokens"] / run["train"][0]["step"] if run["train"] else None
        diff = None
        if ref_name:
            ref = {r["step"]: r["loss"] for r in runs[ref_name]["train"]}
            common = [(r["loss"], ref[r["step"]]) for r in run["train"] if r["step"] in ref]
            diff = max((abs(a - b) for a, b in common), default=None)
        nproc, rc = procs.get(name, (None, None))
        table.append({"run": name, "processes": nproc, "rc": rc, "tokens_per_s": tps,
                      "ms_per_step": tokens_per_step / tps * 1e3 if tps else None,
                      "last_step": run["train"][-1]["step"] if run["train"] else None,
                      "last_loss": run["train"][-1]["loss"] if run["train"] else None, "val_loss": run["val_loss"],
                      "reference": ref_name, "max_loss_diff": diff})
    for name, (nproc, rc) in procs.items():  # runs that left no metrics
        if name not in runs:
            table.append({"run": name, "processes": nproc, "rc": rc})
    return table


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--skip", type=int, default=10, help="steps left out of the throughput (compiling, recording)")
    args = ap.parse_args()
    table = summarise(args.out, args.skip)
    (args.out / "summary.json").write_text(json.dumps(table, indent=1))
    print("| run | processes | exit | tokens/s | ms per step | last loss | val loss | reference | max loss diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['run']} | {r.get('processes')} | {r.get('rc')} | {fmt(r.get('tokens_per_s'), ',.0f')} | "
              f"{fmt(r.get('ms_per_step'), '.2f')} | {fmt(r.get('last_loss'), '.4f')} | {fmt(r.get('val_loss'), '.4f')} | "
              f"{r.get('reference') or '-'} | {fmt(r.get('max_loss_diff'), '.4f')} |")


if __name__ == "__main__":
    main()
