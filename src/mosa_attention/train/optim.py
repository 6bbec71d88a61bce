"""Optimizer and learning-rate schedule."""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import OptimConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """Adam, or AdamW with weight decay on the weight matrices only (not on norms, biases or routers,
    whose scale is their meaning); torch's fused implementation where the parameters are on a GPU."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and "router" not in name else no_decay).append(p)
    betas = (cfg.beta1, cfg.beta2)
    # on a GPU torch's fused kernels: one pass over each parameter and its moments per step, where the default
    # (multi-tensor) makes several; the FLOP-matched hybrids' many parameters feel it (benchmarks/NOTES.md v26.4)
    # (plain tensors only: FSDP's sharded parameters keep the default)
    params = decay + no_decay
    fused = {"fused": True} if params and all(p.is_cuda and type(p.data) is torch.Tensor for p in params) else {}
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=betas, **fused)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, **fused)


def lr_at(step: int, cfg: OptimConfig) -> float:
    """Linear warmup over ``warmup_steps``, then cosine from ``lr`` to ``min_lr`` at the last step.
    ``step`` counts from 0 (the first update)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(cfg.steps - cfg.warmup_steps - 1, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))
