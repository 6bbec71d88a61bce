"""Which tokens each MoSA head keeps over a given text: one panel per MoSA layer, heads as rows, tokens as
columns, each kept token coloured by its router score."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ._figure import save_png


@torch.no_grad()
def selections_for_text(model, tokenizer, text: str, device="cpu"):
    """(token strings, [(layer index, scores [E, T] of kept tokens else NaN)]) for one text."""
    ids = tokenizer.encode(text)
    if not ids:
        raise ValueError("the text is empty after tokenization")
    limit = model.config.longest_input
    if len(ids) > limit:
        raise ValueError(f"the text has {len(ids)} tokens, more than this model accepts ({limit}); shorten it")
    x = torch.tensor([ids], device=device)
    model.eval()
    _, _, selections = model(x, return_selections=True)
    T = len(ids)
    panels = []
    for i, sel in enumerate(selections):
        if sel is None:
            continue
        scores, idx = (t[0].float().cpu() for t in sel)  # [E, k]
        grid = torch.full((scores.shape[0], T + 1), float("nan"))
        grid.scatter_(1, idx.long(), scores)
        panels.append((i, grid[:, :T].numpy()))
    return [tokenizer.id_to_token(i) for i in ids], panels


def draw_selections(tokens: list[str], panels, out, title: str = "") -> Path:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    if not panels:
        raise ValueError("the model has no MoSA heads to show")
    T = len(tokens)
    heads = sum(g.shape[0] for _, g in panels)
    fig_w = min(max(6, 0.22 * T + 2), 60)
    fig_h = min(max(3, 0.28 * heads + 1.2 * len(panels) + 1), 60)
    fig, axes = plt.subplots(len(panels), 1, figsize=(fig_w, fig_h), squeeze=False, layout="constrained",
                             gridspec_kw={"height_ratios": [g.shape[0] for _, g in panels]})
    cmap = plt.get_cmap("viridis").with_extremes(bad="#f2f2f2")
    im = None
    for ax, (layer, grid) in zip(axes[:, 0], panels):
        im = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        ax.set_ylabel(f"layer {layer}\nhead", fontsize=8)
        ax.set_yticks(range(grid.shape[0]))
        ax.set_yticklabels([str(e) for e in range(grid.shape[0])], fontsize=6)
        ax.set_xticks(range(T))
        ax.set_xticklabels([t.replace("\n", "\\n") for t in tokens], rotation=90, fontsize=7)
        ax.tick_params(axis="x", length=0)
    fig.colorbar(im, ax=axes[:, 0].tolist(), shrink=min(1.0, 6 / fig_h), pad=0.01, label="router score of kept tokens")
    fig.suptitle(title or "tokens kept by each MoSA head (grey: not kept)", fontsize=10)
    return save_png(fig, out, tight=False)
