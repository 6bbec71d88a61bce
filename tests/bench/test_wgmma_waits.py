"""benchmarks/wgmma_waits.py compiles t3's kernels for sm_90 without a GPU and reports each one's product waits."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "wgmma_waits.py"


def test_reports_every_kernel():
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        pytest.skip("this triton has no NVIDIA backend")
    run = subprocess.run([sys.executable, str(SCRIPT)], env=dict(os.environ, TRITON_INTERPRET="0"),
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {m.group(1): (m.group(2), m.group(3)) for m in
            re.finditer(r"^(_[\w+]+)\s+wgmma\s+(\d+), waits \(pendings\) ([\d, -]+)", run.stdout, re.M)}
    assert set(rows) == {"_qkv_fwd", "_attn_fwd", "_out_bwd", "_attn_bwd_seqs", "_qkv_bwd_dx", "_dwqkv", "_dwo",
                         "_dwqkv+router+dl16", "_dwqkv+router"}, rows
    # every kernel there multiplies on the tensor cores (a kernel that fell back to no wgmma would read 0)
    assert all(int(n) > 0 for n, _ in rows.values()), rows
    # the router's product from the loaded d-logit tile leaves the loop's products in flight; from one made in
    # registers it waits for all of them
    assert rows["_dwqkv+router+dl16"][1].split(", ")[0] != "0" and rows["_dwqkv+router"][1].startswith("0"), rows
