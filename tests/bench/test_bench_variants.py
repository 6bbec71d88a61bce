"""benchmarks/bench_variants.py: each variant's settings hold while its graph is captured, and only then (the
capture itself needs a GPU and is replaced here by a stand-in that records what it saw)."""
import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("triton")

from mosa_attention.ops import triton_mosa  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_variants.py"


def _module():
    spec = importlib.util.spec_from_file_location("bench_variants", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_variant_settings_hold_during_the_capture_only(monkeypatch):
    mod = _module()
    seen = []

    def fake_capture(step):
        seen.append((triton_mosa.ATTN_IN_OUT_BWD, {k: dict(v) for k, v in triton_mosa.TILE_OVERRIDES.items()}))
        return step, None
    monkeypatch.setattr(mod, "capture_graph", fake_capture)
    monkeypatch.setitem(triton_mosa.TILE_OVERRIDES, "_dwo", {"BH": 32})  # a caller's own override stays
    before = triton_mosa.ATTN_IN_OUT_BWD
    step = object()
    assert mod.capture(step, mod.VARIANTS["attn_inside_bm32"]) is step
    assert seen == [(True, {"_dwo": {"BH": 32}, "_out_bwd": {"BM": 32}})]
    assert triton_mosa.ATTN_IN_OUT_BWD is before and triton_mosa.TILE_OVERRIDES == {"_dwo": {"BH": 32}}
    # restored also when the capture fails, and a step that cannot be captured stops the script
    monkeypatch.setattr(mod, "capture_graph", lambda step: (None, "RuntimeError: no graph"))
    with pytest.raises(SystemExit, match="no graph"):
        mod.capture(step, mod.VARIANTS["attn_outside"])
    monkeypatch.setattr(mod, "capture_graph", lambda step: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        mod.capture(step, mod.VARIANTS["out_bm32"])
    assert triton_mosa.ATTN_IN_OUT_BWD is before and triton_mosa.TILE_OVERRIDES == {"_dwo": {"BH": 32}}


def test_every_variant_names_real_switches_and_kernels():
    mod = _module()
    kernels = {name for name in dir(triton_mosa) if name.startswith("_") and hasattr(getattr(triton_mosa, name), "fn")}
    for name, variant in mod.VARIANTS.items():
        assert set(variant) <= set(mod.SWITCHES) | {"tiles"}, name
        for key, module in mod.SWITCHES.items():
            for flag in variant.get(key, {}):
                assert hasattr(module, flag), (name, flag)
        for kernel in variant.get("tiles", {}):
            assert kernel in kernels, (name, kernel)


def test_layer_switches_hold_during_the_capture_only(monkeypatch):
    from mosa_attention.layers import mosa as layer_mosa
    mod = _module()
    seen = []
    monkeypatch.setattr(mod, "capture_graph", lambda step: (seen.append(layer_mosa.MOSA_HEADS_FIRST), (step, None))[1])
    before = layer_mosa.MOSA_HEADS_FIRST
    step = object()
    assert mod.capture(step, mod.VARIANTS["dense_first"]) is step
    assert seen == [not before] and layer_mosa.MOSA_HEADS_FIRST is before


def test_hybrid_op_switches_hold_during_the_capture_only(monkeypatch):
    from mosa_attention.layers import mosa as layer_mosa
    from mosa_attention.ops import triton_hybrid
    mod = _module()
    assert set(mod.SWITCHES) == {"flags", "layer_flags", "hybrid_flags"}
    seen = []
    monkeypatch.setattr(mod, "capture_graph", lambda step: (
        seen.append((layer_mosa.HYBRID_OP, triton_hybrid.PROJECT_AFTER_DENSE)), (step, None))[1])
    before = (layer_mosa.HYBRID_OP, triton_hybrid.PROJECT_AFTER_DENSE)
    step = object()
    assert mod.capture(step, mod.VARIANTS["op_sum"]) is step
    assert seen == [(True, False)]
    assert (layer_mosa.HYBRID_OP, triton_hybrid.PROJECT_AFTER_DENSE) == before


def test_eager_steps_run_under_their_variants_settings():
    mod = _module()
    seen = []
    before = triton_mosa.WGRAD_SIDE_STREAM
    run = mod.eager(lambda: seen.append(triton_mosa.WGRAD_SIDE_STREAM) or "y", mod.VARIANTS["wgrad_fork_off"])
    assert triton_mosa.WGRAD_SIDE_STREAM is before  # set only while a step runs
    assert run() == "y" and run() == "y"
    assert seen == [False, False] and triton_mosa.WGRAD_SIDE_STREAM is before
