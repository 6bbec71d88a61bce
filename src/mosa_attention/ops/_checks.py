"""Argument checks shared by every layer of the package: clear errors that name the argument and value."""
from __future__ import annotations

import torch


def check_positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {name}={value!r}")
    return value


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {name}={value!r}")
    return value


def check_optional_bool(name: str, value):
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"{name} must be True, False or None, got {name}={value!r}")
    return value


def check_sequences(x) -> None:
    """x must be a tensor [B, T, h] with no empty dimension."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or 0 in x.shape:
        got = f"x.shape={tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a tensor [B, T, h] with B, T, h >= 1, got {got}")
