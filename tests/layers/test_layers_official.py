"""load_official_state_dict: shape checks always; equality with the official release when it is importable.

The release (github piotrpiekos/MoSA) is not vendored: point MOSA_OFFICIAL_PATH at a folder holding its
``mosa`` package to run the comparison.
"""
import importlib
import os
import sys

import pytest
import torch

from mosa_attention import MoSAAttention, load_official_state_dict


def official_state_dict(E, h, D, H=0):
    sd = {"r.0.weight": torch.randn(E, h), "QKV.W": torch.randn(E, h, 3 * D), "O.W": torch.randn(E, D, h)}
    if H:
        sd = {"mosa_heads." + k: v for k, v in sd.items()}
        sd["other_heads.W_QKV.weight"] = torch.randn(3 * D * H, h)
        sd["other_heads.W_O.weight"] = torch.randn(h, D * H)
    return sd


@pytest.mark.parametrize("H", [0, 2])
def test_loads_every_tensor(H):
    layer = MoSAAttention(16, 3, 4, head_dim=8, num_dense_heads=H)
    sd = official_state_dict(3, 16, 8, H)
    load_official_state_dict(layer, sd)
    p = "mosa_heads." if H else ""
    assert torch.equal(layer.router, sd[p + "r.0.weight"])
    assert torch.equal(layer.W_QKV, sd[p + "QKV.W"])
    assert torch.equal(layer.W_O, sd[p + "O.W"])
    if H:
        assert torch.equal(layer.dense.W_QKV.weight, sd["other_heads.W_QKV.weight"])
        assert torch.equal(layer.dense.W_O.weight, sd["other_heads.W_O.weight"])


def test_rejects_shapes_that_do_not_fit_and_leaves_layer_untouched():
    layer = MoSAAttention(16, 3, 4, head_dim=8, num_dense_heads=2)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    sd = official_state_dict(3, 16, 8, 2)
    sd["other_heads.W_O.weight"] = torch.randn(16, 8)
    with pytest.raises(ValueError, match=r"other_heads.W_O.weight.*\(16, 8\).*\(16, 16\)"):
        load_official_state_dict(layer, sd)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k])


def test_rejects_missing_and_unexpected_keys():
    with pytest.raises(ValueError, match="lacks 'other_heads.W_O.weight'"):
        sd = official_state_dict(3, 16, 8, 2)
        del sd["other_heads.W_O.weight"]
        load_official_state_dict(MoSAAttention(16, 3, 4, head_dim=8, num_dense_heads=2), sd)
    with pytest.raises(ValueError, match="no 'dense.W_QKV.weight'"):
        load_official_state_dict(MoSAAttention(16, 3, 4, head_dim=8), official_state_dict(3, 16, 8, 2))
    with pytest.raises(ValueError, match="does not use"):
        load_official_state_dict(MoSAAttention(16, 3, 4, head_dim=8), {**official_state_dict(3, 16, 8), "foo": torch.ones(1)})


def _official():
    path = os.environ.get("MOSA_OFFICIAL_PATH")
    if not path:
        pytest.skip("set MOSA_OFFICIAL_PATH to the official release's folder to compare with it")
    sys.path.insert(0, path)
    try:
        return importlib.import_module("mosa")
    finally:
        sys.path.remove(path)


@pytest.mark.parametrize("E,H,rho,first,frac", [(3, 0, 4, False, 0.5), (4, 2, 3, True, 0.5), (2, 1, 2, False, 1.0)])
def test_matches_official_release(E, H, rho, first, frac):
    mosa = _official()
    h, D, T = 16, 8, 21
    if H:
        theirs = mosa.MoSA(h, D, E, H, T, rho, "dense", include_first=int(first), rotate_fraction=frac)
    else:
        theirs = mosa.PureMoSA(E, rho, h, D, include_first=int(first), rotate_fraction=frac)
    ours = MoSAAttention(h, E, rho, head_dim=D, num_dense_heads=H, include_first=first, rope_fraction=frac)
    load_official_state_dict(ours, theirs.state_dict())
    x = torch.randn(3, T, h, requires_grad=True)
    y_theirs, y_ours = theirs(x), ours(x)
    torch.testing.assert_close(y_ours, y_theirs, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y_ours)
    theirs_params = dict(theirs.named_parameters())
    ours_for = {"r.0.weight": ours.router, "QKV.W": ours.W_QKV, "O.W": ours.W_O}
    if H:
        ours_for.update({"other_heads.W_QKV.weight": ours.dense.W_QKV.weight,
                         "other_heads.W_O.weight": ours.dense.W_O.weight})
    names = list(theirs_params)
    g_theirs = torch.autograd.grad((y_theirs * g).sum(), [x] + [theirs_params[n] for n in names])
    g_ours = torch.autograd.grad((y_ours * g).sum(), [x] + [ours_for[n.removeprefix("mosa_heads.")] for n in names])
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
