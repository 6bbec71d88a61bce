"""benchmarks/bench_parts.py: its scatter-only kernel (the scatter part timed without a product) adds rows
like ``index_add_``, through Triton's interpreter on CPU; without a GPU the script says so and stops."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: on CPU the kernels run interpreted
pytest.importorskip("triton")
import torch  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "bench_parts.py"


def _needs_interpreter():
    """Skip unless the kernels run through Triton's interpreter (set before triton_mosa was first imported)."""
    if not INTERPRET:
        pytest.skip("an interpreter test (TRITON_INTERPRET=0 here)")
    from mosa_attention.ops import triton_mosa
    if type(triton_mosa._add_tile).__name__ != "InterpretedFunction":
        pytest.skip("triton_mosa was imported before TRITON_INTERPRET=1 was set")


def _module():
    spec = importlib.util.spec_from_file_location("bench_parts", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("N, h, M, BM, BH", [(100, 256, 50, 64, 128), (1, 96, 3, 64, 64), (130, 40, 7, 32, 32)])
def test_scatter_rows_adds_like_index_add(N, h, M, BM, BH):
    _needs_interpreter()
    mod = _module()
    g = torch.Generator().manual_seed(N + h)
    src = torch.randn(N, h, generator=g)
    at = torch.randint(0, M, (N,), generator=g, dtype=torch.int32)  # repeats: several rows per destination
    out = torch.randn(M, h, generator=g)
    ref = out.clone().index_add_(0, at.long(), src)
    mod.add_rows(src, at, out, 0, BM=BM, BH=BH)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_without_a_gpu_it_stops_with_a_message():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    run = subprocess.run([sys.executable, str(SCRIPT), "--case", "t2"], capture_output=True, text=True,
                         env=dict(os.environ, TRITON_INTERPRET="1"), timeout=300)
    assert run.returncode != 0
    assert "needs a CUDA GPU" in run.stderr


def test_plot_draws_the_committed_stand_ins(tmp_path):
    run = ROOT / "benchmarks" / "results" / "h200_v17_call6_staged_floor_router"
    out = _module().plot([run / "parts_t2.json", run / "parts_t3.json"], tmp_path / "floors.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.tmp*"))  # written whole, then renamed


def test_plot_refuses_a_run_without_stand_ins(tmp_path):
    t4 = ROOT / "benchmarks" / "results" / "h200_v17_call1_parts" / "parts_t4.json"
    with pytest.raises(SystemExit, match="no stand-in hybrids"):
        _module().plot([t4], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_atomics_only_adds_its_register_values_at_the_rows():
    # the scatter's additions without rows: values made in registers, added where ``at`` says (repeats included)
    _needs_interpreter()
    mod = _module()
    N, h, M = 70, 48, 9
    at = torch.randint(0, M, (N,), generator=torch.Generator().manual_seed(1), dtype=torch.int32)
    out = torch.zeros(M, h)
    mod._atomics_only[(2, 1)](at, out, N, h, BM=64, BH=64, VEC=0)
    rows, cols = torch.arange(N), torch.arange(h)
    values = ((rows % 7)[:, None] + (cols % 5)[None, :]).float() * 0.125
    torch.testing.assert_close(out, torch.zeros(M, h).index_add_(0, at.long(), values))


def test_dx_probe_whole_is_the_x_gradient_kernel():
    # the probe with its product and its scatter is _qkv_bwd_dx's tile (without the router's share): equal results,
    # so that its parts measure that kernel's
    _needs_interpreter()
    from mosa_attention.ops import triton_mosa
    mod = _module()
    B, T, h, E, K, D = 2, 32, 48, 3, 4, 16
    R = B * K
    g = torch.Generator().manual_seed(2)
    pos = torch.rand(B, E, T, generator=g).topk(K, dim=-1).indices.sort(-1).values.contiguous()
    dqkv, w = torch.randn(3, E, R, D, generator=g), torch.randn(E, h, 3 * D, generator=g)
    grid = (-(-R // 8), E, -(-h // 16))
    ours, probe = torch.zeros(B, T, h), torch.zeros(B, T, h)
    triton_mosa._qkv_bwd_dx[grid](dqkv, pos, w, ours, T, h, E, R, K, ours, ours, D=D, DP=D, BM=8, BH=16, PREC="ieee",
                                  ROUTER=False, ATOMIC=True, VEC=0)
    mod._dx_probe[grid](dqkv, pos, w, probe, T, h, E, R, K, D=D, BM=8, BH=16, VEC=0, DOT=True, ADD=True)
    assert ours.abs().sum() > 0
    torch.testing.assert_close(probe, ours, rtol=1e-5, atol=1e-4)


def test_plot_draws_the_stand_ins_with_the_scatters(tmp_path):
    run = ROOT / "benchmarks" / "results" / "h200_v34_call7_10_parts_scatter_floor" / "parts_t3.json"
    mod = _module()
    import json
    floor = json.loads(run.read_text())["hybrid_floor_ms"]
    assert all(key in floor for _, key in mod.STAGES)  # every stage drawn, the scatters' two included
    out = mod.plot([run], tmp_path / "floors.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
