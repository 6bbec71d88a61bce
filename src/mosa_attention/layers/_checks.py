"""Input validation shared by the attention layers: clear errors that name the argument and value."""
from __future__ import annotations

import torch

from ..ops._checks import check_bool, check_optional_bool, check_positive_int  # noqa: F401 (re-exported)


def check_input(x, d_model: int, dtype: torch.dtype | None = None) -> None:
    """x [B, T, d_model], floating, not empty; outside autocast in ``dtype`` (the layer's parameters')."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"x must have shape [batch, seq_len, d_model], got x.shape={tuple(x.shape)}")
    if x.shape[-1] != d_model:
        raise ValueError(f"x's last dim must be d_model={d_model}, got x.shape={tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"x must hold at least one sequence of at least one token, got x.shape={tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got x.dtype={x.dtype}")
    if dtype is not None and x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"x.dtype={x.dtype} must match the layer's parameters ({dtype}) outside autocast; "
                        f"cast one of them (e.g. layer.to({dtype}) or x.to({dtype})), or run under torch.autocast")


def exact_float(name: str) -> property:
    """A float hyperparameter that a module's forward reads (sparsity, RoPE's base), kept as the exact ratio of two
    ints and read back as the same float. Under torch.compile a float attribute that differs between two instances
    of one module class turns into a symbolic float from the second instance on (automatic dynamic shapes), which
    the ops' checks and k's arithmetic cannot take inside one graph (a graph break; an error with fullgraph); int
    attributes of a module stay constants."""
    slot = f"_{name}_ratio"

    def get(self) -> float:
        num, den = getattr(self, slot)
        return num / den

    def put(self, value) -> None:
        setattr(self, slot, float(value).as_integer_ratio())
    return property(get, put, doc=f"{name} (kept as an exact ratio of ints: see ``exact_float``)")
