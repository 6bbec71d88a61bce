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


def _module():
    spec = importlib.util.spec_from_file_location("bench_parts", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("N, h, M, BM, BH", [(100, 256, 50, 64, 128), (1, 96, 3, 64, 64), (130, 40, 7, 32, 32)])
def test_scatter_rows_adds_like_index_add(N, h, M, BM, BH):
    if not INTERPRET:
        pytest.skip("an interpreter test (TRITON_INTERPRET=0 here)")
    from mosa_attention.ops import triton_mosa
    if type(triton_mosa._add_tile).__name__ != "InterpretedFunction":
        pytest.skip("triton_mosa was imported before TRITON_INTERPRET=1 was set")
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
