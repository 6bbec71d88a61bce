"""Perplexity of a language model over consecutive windows of a token split."""
from __future__ import annotations

import contextlib
import math

import numpy as np
import torch

from ..data.batches import eval_batches


def autocast(device: torch.device, dtype: torch.dtype | None):
    """bfloat16 autocast where asked for, nothing otherwise."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate(model, tokens: np.ndarray, seq_len: int, *, batch_size: int = 16, max_windows: int | None = None,
             device=torch.device("cpu"), amp_dtype: torch.dtype | None = None, rank: int = 0, world_size: int = 1,
             reduce=None) -> dict:
    """Mean next-token loss and perplexity over up to ``max_windows`` windows of ``seq_len`` tokens.

    Each window is scored from its own start (no context carried over). Under several processes the
    windows are shared out and ``reduce`` (a sum across processes) combines the totals."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # summed loss, tokens
    for x, y in eval_batches(tokens, seq_len, batch_size, max_windows, rank, world_size):
        x, y = x.to(device), y.to(device)
        with autocast(device, amp_dtype):
            _, loss = model(x, y)
        total[0] += loss.double() * y.numel()
        total[1] += y.numel()
    if reduce is not None:
        total = reduce(total)
    model.train(was_training)
    loss = (total[0] / total[1].clamp(min=1)).item()
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "tokens": int(total[1].item()), "seq_len": seq_len}
