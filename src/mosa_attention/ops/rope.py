"""Rotary position embedding at arbitrary (original) positions.

Rotate-half convention on the first ``rope_dims`` dimensions of each head, as in the official MoSA release:
``x_rot = x * cos + rotate_half(x) * sin`` with angles ``pos * base**(-2i/rope_dims)`` duplicated over the
two halves.
"""
from __future__ import annotations

import math

import torch


def check_rope_base(base) -> float:
    """``base`` as a float, or a ValueError naming it: RoPE's angles need a finite base > 0 (a base of 0 or
    below makes every angle NaN or inf)."""
    if isinstance(base, bool) or not isinstance(base, (int, float)) or not math.isfinite(base) or base <= 0:
        raise ValueError(f"rope_base must be a finite number > 0, got rope_base={base!r}")
    return float(base)


def rope_dims_for(head_dim: int, rope_fraction: float) -> int:
    """Number of rotated dimensions: ``int(rope_fraction * head_dim)`` rounded down to even."""
    if isinstance(rope_fraction, bool) or not isinstance(rope_fraction, (int, float)) \
            or not 0.0 <= rope_fraction <= 1.0:
        raise ValueError(f"rope_fraction must be a number in [0, 1], got rope_fraction={rope_fraction!r}")
    n = int(rope_fraction * head_dim)
    return n - n % 2


def rope_cos_sin(positions: torch.Tensor, rope_dims: int, base: float, dtype: torch.dtype):
    """cos and sin tables of shape ``positions.shape + (rope_dims,)``, computed in float32 (float64 for
    float64 outputs) and returned in ``dtype``."""
    base = check_rope_base(base)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    inv_freq = 1.0 / (base ** (torch.arange(0, rope_dims, 2, device=positions.device, dtype=work) / rope_dims))
    angles = positions.to(work)[..., None] * inv_freq
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` dims of ``x``; the rest pass through."""
    r = cos.shape[-1]
    if r == 0:
        return x
    if r == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    xr, xp = x[..., :r], x[..., r:]
    return torch.cat((xr * cos + rotate_half(xr) * sin, xp), dim=-1)
