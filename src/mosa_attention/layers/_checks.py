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
