"""Causal routing for a trained model: switch the routing rule, calibrate thresholds on data, and report how
the causal rule compares with the paper's top-k (decision agreement and perplexity).

Top-k ranks a token against its whole sequence, the future included, so it cannot generate. The threshold
rule keeps a token iff its score passes the head's threshold. ``calibrate_thresholds`` puts each head's
threshold at the score quantile that keeps, on the given data, as many tokens as top-k would (k of T).
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterable

import torch
import torch.nn.functional as F

from ..layers import MoSAAttention
from ..ops.routing import router_scores, topk_membership


def mosa_layers(model) -> list[MoSAAttention]:
    return [m for m in model.modules() if isinstance(m, MoSAAttention)]


def set_routing(model, routing: str):
    """Switch every MoSA layer to ``routing`` ("topk" or "threshold") for evaluation; returns the model.
    The config's ``routing`` keeps saying how the model was trained."""
    if routing not in ("topk", "threshold"):
        raise ValueError(f"routing must be 'topk' or 'threshold', got routing={routing!r}")
    for layer in mosa_layers(model):
        layer.routing = routing
    return model


@contextlib.contextmanager
def routing_mode(model, routing: str):
    """``with routing_mode(model, "threshold"): ...`` and the layers' previous rules come back after."""
    before = [layer.routing for layer in mosa_layers(model)]
    set_routing(model, routing)
    try:
        yield model
    finally:
        for layer, r in zip(mosa_layers(model), before):
            layer.routing = r


class _Inputs:
    """Captures the input of every MoSA layer during a forward pass."""

    def __init__(self, model):
        self.seen: dict[int, list[torch.Tensor]] = {}
        self.hooks = [layer.register_forward_pre_hook(self._hook(i)) for i, layer in enumerate(mosa_layers(model))]

    def _hook(self, i):
        def hook(module, args):
            self.seen.setdefault(i, []).append(args[0].detach())
        return hook

    def close(self):
        for h in self.hooks:
            h.remove()


def _layer_inputs(model, batches, routing: str) -> dict[int, list[torch.Tensor]]:
    cap = _Inputs(model)
    try:
        with routing_mode(model, routing), torch.no_grad():
            for ids in batches:
                model(_ids(ids, model))
    finally:
        cap.close()
    return cap.seen


def _ids(batch, model) -> torch.Tensor:
    ids = batch[0] if isinstance(batch, (tuple, list)) else batch
    return ids.to(model.embed.weight.device)


@torch.no_grad()
def calibrate_thresholds(model, batches: Iterable) -> list[torch.Tensor]:
    """Set each MoSA head's ``threshold`` so that, on ``batches`` (id tensors [B, T], or (ids, targets)
    pairs), it keeps about as many tokens as top-k keeps: the (1 - k/T) quantile of its scores, with k of
    the batch length T. Marks ``model.config.thresholds_calibrated``. Returns the thresholds per layer.

    Layer by layer, the layers below already routing by threshold, so that each layer is calibrated on the
    inputs it will see when generating (one forward pass over the data per MoSA layer).
    """
    batches = list(batches)
    if not batches:
        raise ValueError("calibrate_thresholds needs at least one batch of token ids")
    layers = mosa_layers(model)
    was_training = model.training
    model.eval()
    before = [layer.routing for layer in layers]
    try:
        for layer in layers:
            xs = _capture_one(model, layer, batches)
            scores = torch.cat([router_scores(x, layer.router).transpose(0, 1).reshape(layer.num_mosa_heads, -1)
                                for x in xs], 1).float()  # [E, tokens]
            keep = layer.num_selected(xs[0].shape[1]) / xs[0].shape[1]
            layer.threshold.copy_(_quantile(scores, 1 - keep).to(layer.threshold))
            layer.routing = "threshold"
    finally:
        for layer, r in zip(layers, before):
            layer.routing = r
        model.train(was_training)
    model.config.thresholds_calibrated = True
    return [layer.threshold.clone() for layer in layers]


def _capture_one(model, layer, batches) -> list[torch.Tensor]:
    seen = []
    hook = layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    try:
        for ids in batches:
            model(_ids(ids, model))
    finally:
        hook.remove()
    return seen


def _quantile(scores: torch.Tensor, q: float) -> torch.Tensor:
    """Row-wise quantile; torch.quantile refuses large inputs, so sort."""
    s = scores.sort(-1).values
    i = min(max(int(math.floor(q * s.shape[-1])), 0), s.shape[-1] - 1)
    # strictly-greater keeps tokens above the threshold: take the midpoint with the next lower score
    lo = s[..., max(i - 1, 0)]
    return (lo + s[..., i]) / 2


@torch.no_grad()
def routing_report(model, batches: Iterable) -> dict:
    """How the causal rule compares with top-k on ``batches`` (id tensors, or (ids, targets) pairs).

    Per layer (in top-k mode, on the same layer inputs): ``precision`` (of the tokens the threshold keeps,
    the share top-k keeps too), ``recall`` (of the tokens top-k keeps, the share the threshold keeps) and
    ``kept_ratio`` (tokens kept by threshold / by top-k). And perplexity of the next token under each rule:
    ``ppl_topk``, ``ppl_threshold``. Batches given as bare ids are scored on ids[:, 1:] from ids[:, :-1].
    """
    batches = [b if isinstance(b, (tuple, list)) else (b[:, :-1], b[:, 1:]) for b in batches]
    if not batches:
        raise ValueError("routing_report needs at least one batch")
    was_training = model.training
    model.eval()
    try:
        inputs = _layer_inputs(model, [b[0] for b in batches], "topk")
        layers = []
        for i, layer in enumerate(mosa_layers(model)):
            tp = pred = true = 0
            for x in inputs.get(i, []):
                scores = router_scores(x, layer.router)
                topk = topk_membership(scores, layer.num_selected(x.shape[1]), layer.include_first)
                thr = scores > layer.threshold[None, :, None]
                if layer.include_first:
                    thr[..., 0] = True
                tp += int((topk & thr).sum())
                pred += int(thr.sum())
                true += int(topk.sum())
            layers.append({"layer": i, "precision": tp / pred if pred else float("nan"),
                           "recall": tp / true if true else float("nan"), "kept_ratio": pred / true if true else 0.0})
        ppl = {}
        for rule in ("topk", "threshold"):
            with routing_mode(model, rule):
                ppl[f"ppl_{rule}"] = _perplexity(model, batches)
    finally:
        model.train(was_training)
    return {"layers": layers, **ppl, "calibrated": bool(model.config.thresholds_calibrated),
            "trained_routing": model.config.routing, "router_aux_loss": model.config.router_aux_loss}


def _perplexity(model, batches) -> float:
    total, count = 0.0, 0
    for ids, targets in batches:
        dev = model.embed.weight.device
        logits, _ = model(ids.to(dev))
        t = targets.to(dev)
        total += float(F.cross_entropy(logits.float().flatten(0, 1), t.flatten(), ignore_index=-100, reduction="sum"))
        count += int((t != -100).sum())
    return math.exp(total / max(count, 1))
