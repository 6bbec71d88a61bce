"""Layer time against one swept setting (``mosa bench --plot``), from the runs ``bench.cli.sweep`` made."""
from __future__ import annotations

from pathlib import Path

from ._figure import save_png
from .curves import PlotError

_LABELS = {"seq_len": "sequence length T", "sparsity": "sparsity ρ", "batch": "batch size B", "head_dim": "head dim"}


def _minor_label(v: float, _pos) -> str:
    """Labels for the log axis' minor ticks at 2 and 5 times a power of ten only (all eight crowd)."""
    digit = f"{v:.0e}"[0]
    return f"{v:g}" if digit in "25" else ""


def plot_sweep(runs: list[dict], axis: str, out) -> Path:
    """Best time (eager or graph) of each layer against ``axis``, forward + backward and forward only, on
    log scales; returns the PNG's path (written whole: a temporary file, then renamed)."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    from matplotlib.ticker import FuncFormatter, NullFormatter  # noqa: PLC0415

    if axis not in _LABELS:
        raise PlotError(f"axis must be one of {sorted(_LABELS)}, got {axis!r}")
    if len(runs) < 2:
        raise PlotError(f"a sweep plot needs at least two runs, got {len(runs)}")
    xs = [run["config"][axis] for run in runs]
    layers = list(dict.fromkeys(r["layer"] for r in runs[0]["results"]))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, step in zip(axes, ("f+b", "fwd")):
        for layer in layers:
            ys = [next(r["best_ms"] for r in run["results"] if r["layer"] == layer and r["step"] == step)
                  for run in runs]
            ax.plot(xs, ys, "o-", label=layer)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(_minor_label))
        ax.set_xlabel(_LABELS[axis])
        ax.set_ylabel("ms (best of eager and CUDA graph)")
        ax.set_title("forward + backward" if step == "f+b" else "forward only")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    c = runs[0]["config"]
    fig.suptitle(f"{runs[0]['device']}, {c['dtype']}: h={c['d_model']}, {c['mosa_heads']} MoSA heads "
                 f"+ {c['hybrid_dense_heads']} dense vs {c['dense_heads']} dense heads", fontsize=10)
    return save_png(fig, out)
