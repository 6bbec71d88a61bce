"""Load weights saved from the official MoSA release (github piotrpiekos/MoSA) into ``MoSAAttention``."""
from __future__ import annotations

from collections.abc import Mapping

import torch

from .mosa import MoSAAttention

# official name -> (our parameter name, whether it belongs to the dense heads)
_PURE = {"r.0.weight": "router", "QKV.W": "W_QKV", "O.W": "W_O"}
_OTHER = {"other_heads.W_QKV.weight": "dense.W_QKV.weight", "other_heads.W_O.weight": "dense.W_O.weight"}


def official_key_map(state_dict: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Official key -> our key, for the release's ``PureMoSA`` or its hybrid ``MoSA`` module."""
    hybrid = any(k.startswith(("mosa_heads.", "other_heads.")) for k in state_dict)
    mapping = {("mosa_heads." + k if hybrid else k): v for k, v in _PURE.items()}
    if hybrid:
        mapping.update(_OTHER)
    return mapping


def load_official_state_dict(layer: MoSAAttention, state_dict: Mapping[str, torch.Tensor]) -> MoSAAttention:
    """Copy an official release state dict into ``layer`` (in place) and return the layer.

    Accepts the state dict of ``mosa.PureMoSA`` (keys ``r.0.weight``, ``QKV.W``, ``O.W``) or of the hybrid
    ``mosa.MoSA`` (the same under ``mosa_heads.`` plus ``other_heads.W_QKV.weight`` and
    ``other_heads.W_O.weight``). Every tensor is checked before anything is copied, so a state dict that
    does not fit leaves the layer untouched and raises a ValueError naming the key and both shapes.
    The release's local hybrid uses the local-attention package, whose windows and rotary embedding differ
    from ours: its weights load, its outputs do not match.
    """
    if not isinstance(layer, MoSAAttention):
        raise TypeError(f"layer must be a MoSAAttention, got {type(layer).__name__}")
    mapping = official_key_map(state_dict)
    ours = dict(layer.named_parameters())
    unknown = [k for k in state_dict if k not in mapping and not k.endswith("inv_freq")]
    if unknown:
        raise ValueError(f"state_dict has keys the official MoSA release does not use here: {unknown}")
    plan = []
    for theirs, mine in mapping.items():
        present = theirs in state_dict
        wanted = mine in ours and ours[mine].numel() > 0
        if present != wanted:
            if present:
                raise ValueError(f"state_dict has {theirs!r} but the layer has no {mine!r} "
                                 f"(num_mosa_heads={layer.num_mosa_heads}, num_dense_heads={layer.num_dense_heads})")
            raise ValueError(f"state_dict lacks {theirs!r}, which the layer needs for {mine!r}")
        if not present:
            continue
        src, dst = state_dict[theirs], ours[mine]
        if tuple(src.shape) != tuple(dst.shape):
            raise ValueError(f"state_dict[{theirs!r}] has shape {tuple(src.shape)}, but the layer's {mine!r} "
                             f"has shape {tuple(dst.shape)}")
        plan.append((dst, src))
    with torch.no_grad():
        for dst, src in plan:
            dst.copy_(src)
    return layer
