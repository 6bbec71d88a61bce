"""What the MoSA heads choose: per head, how often each position is kept, the fraction of tokens that no
head of a layer keeps, and the distribution of router scores.

Gathered with forward pre-hooks on the ``MoSAAttention`` layers, which see each layer's input and ask the
layer itself which tokens it keeps (``layer.select``), so the statistics follow whatever routing rule the
layer uses.
"""
from __future__ import annotations

import numpy as np
import torch

from ..data.batches import eval_batches
from ..layers import MoSAAttention
from ..ops import router_scores
from .perplexity import autocast

BINS = 50  # router score histogram over [0, 1]


class SelectionRecorder:
    """Context manager; while active, accumulates the selections of every MoSA layer of ``model``."""

    def __init__(self, model):
        self.layers = [(name, m) for name, m in model.named_modules() if isinstance(m, MoSAAttention) and m.num_mosa_heads]
        self.stats: dict[str, dict] = {}
        self._handles = []

    def __enter__(self):
        for name, layer in self.layers:
            self._handles.append(layer.register_forward_pre_hook(self._hook(name, layer)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, name, layer):
        def hook(module, args):
            x = args[0].detach()
            with torch.no_grad():
                scores = router_scores(x, layer.router).float()  # [B, E, T]
                _, idx = layer.select(x)  # [B, E, k]; positions == T are padding
            B, E, T = scores.shape
            kept = torch.zeros(B, E, T + 1, device=x.device)
            kept.scatter_(2, idx, 1.0)
            kept = kept[..., :T]
            s = self.stats.get(name)
            if s is None or s["position_counts"].shape[1] != T:
                s = self.stats[name] = {"sequences": 0, "position_counts": np.zeros((E, T)), "none_chosen": 0.0,
                                        "tokens": 0, "hist": np.zeros((E, BINS)), "sum": np.zeros(E),
                                        "sumsq": np.zeros(E), "kept_sum": np.zeros(E), "kept_n": np.zeros(E)}
            s["sequences"] += B
            s["tokens"] += B * T
            s["position_counts"] += kept.sum(0).cpu().numpy()
            s["none_chosen"] += float((kept.sum(1) == 0).sum())
            s["hist"] += torch.stack([torch.histc(scores[:, e], BINS, 0.0, 1.0) for e in range(E)]).cpu().numpy()
            s["sum"] += scores.sum((0, 2)).cpu().numpy()
            s["sumsq"] += (scores ** 2).sum((0, 2)).cpu().numpy()
            s["kept_sum"] += (scores * kept).sum((0, 2)).cpu().numpy()
            s["kept_n"] += kept.sum((0, 2)).cpu().numpy()
        return hook

    def summary(self) -> dict:
        """Per MoSA layer: JSON-able statistics (see ``summarize``)."""
        return {name: summarize(s) for name, s in self.stats.items()}


def summarize(s: dict) -> dict:
    n = s["tokens"] / s["sequences"] if s["sequences"] else 0  # tokens per sequence per head
    rate = s["position_counts"] / max(s["sequences"], 1)  # [E, T]: P(position chosen)
    mean = s["sum"] / max(s["tokens"], 1)
    std = np.sqrt(np.maximum(s["sumsq"] / max(s["tokens"], 1) - mean ** 2, 0))
    cdf = np.cumsum(s["hist"], 1) / np.maximum(s["hist"].sum(1, keepdims=True), 1)
    edges = np.linspace(0, 1, BINS + 1)[1:]

    def quantile(q):
        return [float(edges[np.searchsorted(c, q)]) if c[-1] > 0 else 0.0 for c in cdf]

    k = rate.sum(1)  # tokens kept per sequence, per head
    p = rate / np.maximum(k[:, None], 1e-12)
    h = -(p * np.log(np.where(p > 0, p, 1))).sum(1)
    # 0 when a head keeps the same k positions in every sequence, 1 when it keeps every position equally often
    lo, hi = np.log(np.maximum(k, 1)), np.log(max(n, 1))
    entropy = np.where(hi > lo, (h - lo) / np.maximum(hi - lo, 1e-12), 1.0)
    return {
        "heads": int(rate.shape[0]), "seq_len": int(rate.shape[1]), "sequences": int(s["sequences"]),
        "tokens_no_head_chose": s["none_chosen"] / max(s["tokens"], 1),
        "position_rate": rate.round(4).tolist(),  # per head, per position: fraction of sequences keeping it
        "first_token_rate": rate[:, 0].round(4).tolist(),
        "position_entropy": entropy.round(4).tolist(),  # 1: kept positions spread evenly; 0: always the same
        "score_mean": mean.round(4).tolist(), "score_std": std.round(4).tolist(),
        "score_p10": quantile(0.1), "score_p50": quantile(0.5), "score_p90": quantile(0.9),
        "kept_score_mean": (s["kept_sum"] / np.maximum(s["kept_n"], 1)).round(4).tolist(),
        "score_histogram": s["hist"].astype(int).tolist(), "score_bins": BINS,
    }


@torch.no_grad()
def selection_stats(model, tokens: np.ndarray, seq_len: int, *, batch_size: int = 16, max_windows: int | None = 64,
                    device=torch.device("cpu"), amp_dtype=None) -> dict:
    """Run ``model`` over windows of ``tokens`` and return ``SelectionRecorder.summary()``."""
    model.eval()
    with SelectionRecorder(model) as rec:
        for x, _ in eval_batches(tokens, seq_len, batch_size, max_windows):
            with autocast(device, amp_dtype):
                model(x.to(device))
    return rec.summary()


def format_stats(stats: dict) -> str:
    """A short table: one line per head."""
    if not stats:
        return "selection statistics: the model has no MoSA heads"
    lines = []
    for name, s in stats.items():
        lines.append(f"{name}: {s['heads']} MoSA heads, T={s['seq_len']}, {s['sequences']} sequences; "
                     f"tokens no head chose: {100 * s['tokens_no_head_chose']:.1f}%")
        lines.append("  head  score mean±std  p10/p50/p90      kept mean  first-token  position entropy")
        for e in range(s["heads"]):
            lines.append(f"  {e:4d}  {s['score_mean'][e]:.3f}±{s['score_std'][e]:.3f}   "
                         f"{s['score_p10'][e]:.2f}/{s['score_p50'][e]:.2f}/{s['score_p90'][e]:.2f}   "
                         f"{s['kept_score_mean'][e]:.3f}      {100 * s['first_token_rate'][e]:5.1f}%      "
                         f"{s['position_entropy'][e]:.3f}")
    return "\n".join(lines)
