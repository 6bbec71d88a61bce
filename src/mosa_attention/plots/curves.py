"""Loss curves of one or more runs in one PNG, read from each run's ``metrics.jsonl``."""
from __future__ import annotations

import json
from pathlib import Path

from ._figure import save_png


class PlotError(ValueError):
    pass


def read_metrics(run_dir) -> tuple[list[dict], list[dict]]:
    """(training rows, validation rows) of a run folder."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"{run_dir} has no metrics.jsonl (is it a run folder of `mosa train`?)")
    train, val = [], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise PlotError(f"{path}:{n} is not JSON") from None
        (val if row.get("split") == "val" else train).append(row)
    return train, val


def _smooth(values: list[float], window: int) -> list[float]:
    if window <= 1:
        return values
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def label_of(run_dir) -> str:
    """The run's folder name, with its attention kind and sparsity when its config says so."""
    run_dir = Path(run_dir)
    try:
        m = json.loads((run_dir / "model_config.json").read_text())
        kind = m["attention"] + (f" ρ={m['sparsity']:g}" if m["attention"] != "dense" else "")
        return f"{run_dir.name} ({kind})"
    except (OSError, ValueError, KeyError):
        return run_dir.name


def plot_runs(run_dirs, out, *, x: str = "step", smooth: int = 1, labels=None, title: str | None = None) -> Path:
    """Draw training loss (lines) and validation loss (markers) of each run; returns the PNG's path."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    if not run_dirs:
        raise PlotError("no runs to plot")
    if x not in ("step", "tokens"):
        raise PlotError(f"x must be 'step' or 'tokens', got {x!r}")
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, run in enumerate(run_dirs):
        train, val = read_metrics(run)
        if not train:
            raise PlotError(f"{run} has no training metrics yet")
        label = labels[i] if labels else label_of(run)
        xs = [r[x] for r in train]
        (line,) = ax.plot(xs, _smooth([r["loss"] for r in train], smooth), label=label, lw=1.4)
        if val:
            per_step = train[-1]["tokens"] / train[-1]["step"] if x == "tokens" else 1
            ax.plot([r["step"] * per_step for r in val], [r["val_loss"] for r in val], "o", color=line.get_color(),
                    ms=6, label=f"{label} (val {val[-1]['val_loss']:.3f})")
    ax.set_xlabel("training tokens" if x == "tokens" else "step")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.set_title(title or "training loss (lines) and validation loss (dots)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_png(fig, out)
