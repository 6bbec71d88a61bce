"""benchmarks/ncu_kernels.py reads Nsight Compute's CSV (both pages) into one row per kernel: checked on the
CSVs of an H200 run committed under benchmarks/results."""
import csv
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUN = ROOT / "benchmarks" / "results" / "h200_v15_call5_ncu"


def _module():
    spec = importlib.util.spec_from_file_location("ncu_kernels", ROOT / "benchmarks" / "ncu_kernels.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _table(capsys, mod, name):
    mod.parse(str(RUN / name))
    lines = capsys.readouterr().out.splitlines()
    head = lines[0].split(" | ")
    return {row.split(" | ")[0]: dict(zip(head, row.split(" | "))) for row in lines[2:]}


def test_details_page(capsys):
    mod = _module()
    table = _table(capsys, mod, "ncu_t3_details.csv")
    assert list(table) == ["_topk_select", "_qkv_fwd", "_attn_fwd", "_out_bwd", "_attn_bwd_seqs", "_qkv_bwd_dx",
                           "_dwqkv", "_dwr"]
    with open(RUN / "ncu_t3_details.csv", newline="") as f:
        rows = [r for r in csv.DictReader(ln for ln in f if ln.startswith('"'))
                if r["Kernel Name"] == "_qkv_bwd_dx" and r["Metric Name"] in ("Duration", "L2 Hit Rate")]
    by = {r["Metric Name"]: r for r in rows}
    assert by["Duration"]["Metric Unit"] == "ns"  # shown in microseconds
    assert float(table["_qkv_bwd_dx"]["us"]) == round(float(by["Duration"]["Metric Value"].replace(",", "")) / 1e3, 1)
    assert float(table["_qkv_bwd_dx"]["L2 hit %"]) == float(by["L2 Hit Rate"]["Metric Value"])
    assert table["_qkv_fwd"]["regs"] == "253" and table["_qkv_fwd"]["grid"] == "1010"


def test_raw_page_and_the_largest_stalls(capsys):
    mod = _module()
    table = _table(capsys, mod, "ncu_t3_raw.csv")
    assert float(table["_qkv_bwd_dx"]["DRAM read MB"]) > 300  # dq / dk / dv read once per column block
    stalls = table["_qkv_bwd_dx"]["top stalls"].split(", ")
    values = [float(s.rsplit(" ", 1)[1]) for s in stalls]
    assert len(stalls) == 3 and values == sorted(values, reverse=True) and stalls[0].startswith("long_scoreboard")


def test_no_kernels(tmp_path, capsys):
    mod = _module()
    empty = tmp_path / "empty.csv"
    empty.write_text("==PROF== Connected\n==ERROR== no kernels were profiled\n")
    mod.parse(str(empty))
    assert "no kernel was profiled" in capsys.readouterr().out
