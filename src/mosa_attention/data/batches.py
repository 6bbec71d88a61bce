"""Batches of (input, target) windows from a token stream.

Training batches are random windows whose offsets are a pure function of (seed, step): the data position
of a run is its step, so a resumed run reads exactly what the uninterrupted one would have read, and the
same global batch is cut into the same rows whatever the number of processes.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from .corpus import DataError


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = np.stack([np.asarray(tokens[s:s + seq_len + 1], dtype=np.int64) for s in starts])
    t = torch.from_numpy(rows)
    return t[:, :-1], t[:, 1:]


def check_length(tokens: np.ndarray, seq_len: int, what: str = "data") -> None:
    if len(tokens) < seq_len + 1:
        raise DataError(f"{what} has {len(tokens):,} tokens, fewer than one window of seq_len+1={seq_len + 1}; "
                        "use more text or a shorter seq_len")


def train_offsets(num_tokens: int, seq_len: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Start offsets of the ``batch_size`` windows of the global batch at ``step``."""
    rng = np.random.default_rng([seed, step])
    return rng.integers(0, num_tokens - seq_len, size=batch_size)


def train_batch(tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, step: int,
                rows: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``rows`` of the global training batch of ``step``: (x [b, T], y [b, T]) int64, y = x shifted by one."""
    offsets = train_offsets(len(tokens), seq_len, batch_size, seed, step)[rows]
    return _windows(tokens, offsets, seq_len)


def eval_batches(tokens: np.ndarray, seq_len: int, batch_size: int, max_windows: int | None = None,
                 rank: int = 0, world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive, non-overlapping windows from the start of the stream (the same every time),
    dealt round-robin to ``world_size`` processes. ``max_windows`` 0 or None: the whole stream."""
    check_length(tokens, seq_len, "the evaluation split")
    n = (len(tokens) - 1) // seq_len
    if max_windows:
        n = min(n, max_windows)
    if n >= world_size:
        n -= n % world_size  # every process gets as many batches (FSDP's forward is collective)
    starts = np.arange(n)[rank::world_size] * seq_len
    for i in range(0, len(starts), batch_size):
        yield _windows(tokens, starts[i:i + batch_size], seq_len)
