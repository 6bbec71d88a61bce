"""Saving a figure whole: a reader never finds a half-written PNG."""
from __future__ import annotations

from pathlib import Path


def save_png(fig, out, *, tight: bool = True) -> Path:
    """Write ``fig`` to ``out`` (its folder made if missing) through a temporary file renamed into place,
    close the figure, and return the path."""
    import matplotlib.pyplot as plt  # noqa: PLC0415

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    if tight:
        fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return out
