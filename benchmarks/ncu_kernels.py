"""Hardware counters of the MoSA kernels (Nsight Compute): where each kernel's time goes, measured.

Run one forward + backward step of a case's MoSA heads under ``ncu`` (only that step is profiled), then
read the CSV back into one table per kernel:

    ncu --clock-control none --kernel-name regex:^_ --csv --page details \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
        --section WarpStateStats --section LaunchStats \
        python benchmarks/ncu_kernels.py --case t3 > t3.csv
    python benchmarks/ncu_kernels.py --parse t3.csv
    ncu --clock-control none --kernel-name regex:^_ --csv --page raw \
        --metrics $(python benchmarks/ncu_kernels.py --raw-metrics) python benchmarks/ncu_kernels.py --case t3 > t3raw.csv

Cases: t1 (17 MoSA heads, rho 32: the MoSA part of the perplexity-matched hybrid) and t3 (505 heads, rho 64:
the FLOP-matched hybrid's MoSA part), bf16 parameters and input, B 16, T 1024, d_model 512. ncu runs each
kernel alone with a cold L2 (its default cache control), so hit rates are the reuse inside one kernel.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
from collections import defaultdict

CASES = {"t1": (17, 32), "t3": (505, 64)}

# (--page details: a section's metric name, the table's column)
COLUMNS = [
    ("Duration", "us"),
    ("Compute (SM) Throughput", "SM %"),
    ("Memory Throughput", "mem %"),
    ("DRAM Throughput", "DRAM %"),
    ("L2 Cache Throughput", "L2 %"),
    ("L2 Hit Rate", "L2 hit %"),
    ("L1/TEX Hit Rate", "L1 hit %"),
    ("Achieved Occupancy", "occ %"),
    ("Registers Per Thread", "regs"),
    ("Grid Size", "grid"),
]


def run_case(name: str) -> None:
    import torch

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
    from mosa_attention import MoSAAttention

    E, rho = CASES[name]
    B, T, h = 16, 1024, 512
    torch.manual_seed(0)
    layer = MoSAAttention(h, E, rho, backend="triton").cuda().to(torch.bfloat16)
    x = torch.randn(B, T, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(B, T, h, device="cuda", dtype=torch.bfloat16)

    # one step, no warm-up (ncu replays each kernel from a cold L2 anyway), and no profiler range: on the H200
    # a cudaProfilerStart / Stop pair around a warmed-up step captured only 2 of its 8 kernels (cause not
    # established), so ncu's --kernel-name regex:^_ picks our kernels out of this single step instead
    layer(x).backward(dy)
    torch.cuda.synchronize()


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


STALLS = ("long_scoreboard", "barrier", "mio_throttle", "lg_throttle", "math_pipe_throttle", "wait",
          "short_scoreboard", "not_selected", "membar", "dispatch_stall", "no_instruction", "drain",
          "branch_resolving", "tex_throttle", "selected")
# for a second ncu run with ``--page raw --metrics`` (RAW_METRICS joined by commas)
RAW_METRICS = ["gpu__time_duration.sum", "dram__bytes_read.sum", "dram__bytes_write.sum",
               "lts__t_sector_hit_rate.pct", "lts__t_sectors_op_red.sum", "lts__t_sectors_op_atom.sum"] + [
    f"smsp__average_warps_issue_stalled_{s}_per_issue_active.ratio" for s in STALLS]


def _rows(path: str) -> list[dict]:
    with open(path, newline="") as f:
        lines = f.read().splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith('"ID"')), None)  # after the program's output
    if start is None:
        print(f"{path}: no kernel was profiled (ncu's messages are in its stderr)")
        return []
    return list(csv.DictReader(lines[start:]))


def parse(path: str) -> None:
    """ncu's CSV as a table, one row per kernel launch: ``--page details`` (the COLUMNS) or ``--page raw``
    (RAW_METRICS: DRAM bytes, L2 hit rate and reductions, and the three largest stall reasons in cycles per
    issued instruction)."""
    rows = _rows(path)
    if not rows:
        return None
    if "Metric Name" in rows[0]:
        return _parse_details(rows)
    rows = [r for r in rows if r["ID"].strip()]  # (the second line holds the units)
    head = ["kernel", "us", "DRAM read MB", "DRAM write MB", "L2 hit %", "L2 red sectors M", "top stalls"]
    print(" | ".join(head))
    print(" | ".join("---" for _ in head))
    for r in rows:
        def num(name):
            return _number(r.get(name, "") or "")
        stalls = sorted(((num(f"smsp__average_warps_issue_stalled_{s}_per_issue_active.ratio") or 0.0, s)
                         for s in STALLS), reverse=True)[:3]
        t = num("gpu__time_duration.sum")
        cells = [r["Kernel Name"][:28], "" if t is None else f"{t / 1e3:.1f}"]
        for name, scale in (("dram__bytes_read.sum", 1e-6), ("dram__bytes_write.sum", 1e-6),
                            ("lts__t_sector_hit_rate.pct", 1), ("lts__t_sectors_op_red.sum", 1e-6)):
            v = num(name)
            cells.append("" if v is None else f"{v * scale:.4g}")
        cells.append(", ".join(f"{n} {v:.1f}" for v, n in stalls))
        print(" | ".join(cells))


def _parse_details(rows: list[dict]) -> None:
    kernels: dict = defaultdict(dict)
    names = {}
    for row in rows:
        key = row["ID"]
        names[key] = row["Kernel Name"]
        value = _number(row["Metric Value"])
        unit = row["Metric Unit"]
        metric = row["Metric Name"]
        if value is not None and metric == "Duration":
            value *= {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}.get(unit, 1.0)
        if metric == "Memory Throughput" and unit != "%":
            continue  # (the section's other one, in bytes per second)
        kernels[key][metric] = value
    head = ["kernel"] + [c for _, c in COLUMNS]
    print(" | ".join(head))
    print(" | ".join("---" for _ in head))
    for key, m in kernels.items():
        cells = [names[key][:28]] + [("" if m.get(metric) is None else f"{m[metric]:.4g}") for metric, _ in COLUMNS]
        print(" | ".join(cells))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=sorted(CASES), help="run this case's profiled step (under ncu)")
    ap.add_argument("--parse", metavar="CSV", help="print ncu's CSV of a case as a table")
    ap.add_argument("--raw-metrics", action="store_true", help="print RAW_METRICS for ncu's --metrics")
    args = ap.parse_args()
    if args.raw_metrics:
        print(",".join(RAW_METRICS))
    if args.case:
        run_case(args.case)
    if args.parse:
        parse(args.parse)


if __name__ == "__main__":
    main()
