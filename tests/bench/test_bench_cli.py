"""``mosa bench`` and ``bench.time_layer`` on the CPU: what is timed is what was asked for, the JSON is whole,
bad arguments get a clear error."""
import json

import pytest
import torch

from mosa_attention.bench import time_layer
from mosa_attention.cli import main
from mosa_attention.layers import DenseAttention, MoSAAttention

SMALL = ["--d-model", "32", "--mosa-heads", "3", "--sparsity", "4", "--dense-heads", "2", "--head-dim", "16",
         "--seq-len", "24", "--batch", "2", "--iters", "2", "--device", "cpu"]


def test_bench_writes_every_row_for_the_layers_asked_for(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", *SMALL, "--hybrid-dense-heads", "1", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert not (tmp_path / "bench.json.tmp").exists()
    c = res["config"]
    assert c["k"] == 24 // 4 and c["dtype"] == "float32"
    assert c["mosa_params"] == sum(p.numel() for p in MoSAAttention(32, 3, 4, head_dim=16, num_dense_heads=1).parameters())
    assert c["dense_params"] == sum(p.numel() for p in DenseAttention(32, 2, head_dim=16).parameters())
    assert [(r["layer"], r["step"]) for r in res["results"]] == [("mosa", "f+b"), ("mosa", "fwd"),
                                                                 ("dense", "f+b"), ("dense", "fwd")]
    assert all(r["eager_ms"] > 0 and r["graph_ms"] is None and r["peak_mib"] is None for r in res["results"])
    best = {(r["layer"], r["step"]): r["best_ms"] for r in res["results"]}
    assert res["mosa_over_dense"]["f+b"] == pytest.approx(best[("mosa", "f+b")] / best[("dense", "f+b")])
    assert "MoSA / dense" in capsys.readouterr().out


@pytest.mark.parametrize("flag,value", [("--sparsity", "0.5"), ("--batch", "0"), ("--hybrid-dense-heads", "-1")])
def test_bench_rejects_bad_arguments(flag, value, capsys):
    assert main(["bench", *SMALL, flag, value]) == 2
    assert flag in capsys.readouterr().err


def test_time_layer_steps_leave_no_gradients_and_run_under_autocast():
    layer = DenseAttention(32, 2, head_dim=16)
    x = torch.randn(2, 8, 32)
    calls = []
    layer.register_forward_hook(lambda m, i, o: calls.append((torch.is_grad_enabled(), o.dtype)))
    t = time_layer(layer, x, backward=True, autocast_dtype=torch.bfloat16, iters=2, warmup=1)
    assert t.eager_ms > 0 and t.best_ms() == t.eager_ms and t.graph_ms is None
    assert all(p.grad is None for p in layer.parameters())
    assert calls and all(grad and dtype == torch.bfloat16 for grad, dtype in calls)
    calls.clear()
    time_layer(layer, x, backward=False, iters=2, warmup=1)
    assert calls and all(not grad and dtype == torch.float32 for grad, dtype in calls)


def test_bench_names_a_bad_official_path(tmp_path, capsys):
    assert main(["bench", *SMALL, "--official", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--official" in err and str(tmp_path) in err


def test_bench_times_the_official_release_beside(tmp_path):
    import os
    path = os.environ.get("MOSA_OFFICIAL_PATH")
    if not path:
        pytest.skip("set MOSA_OFFICIAL_PATH to the official release's folder to compare with it")
    out = tmp_path / "bench.json"
    assert main(["bench", *SMALL, "--official", path, "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    rows = {(r["layer"], r["step"]): r for r in res["results"]}
    assert rows[("official", "f+b")]["eager_ms"] > 0 and rows[("official", "f+b")]["graph_ms"] is None
    assert res["mosa_over_official"]["fwd"] == pytest.approx(rows[("mosa", "fwd")]["best_ms"]
                                                             / rows[("official", "fwd")]["best_ms"])


def test_median_ms_is_the_median_and_stops_at_max_s():
    import time as _time
    from mosa_attention.bench.layer import median_ms
    calls = []

    def slow():
        calls.append(1)
        _time.sleep(0.01 * (len(calls) % 3 + 1))  # 20, 30, 10, 20, 30, ... ms

    assert 19.5 <= median_ms(slow, 6, cuda=False) <= 35  # the median of 20, 30, 10, 20, 30, 10 ms (sleep overshoots)
    calls.clear()
    median_ms(slow, 1000, cuda=False, max_s=0.1)
    assert 5 <= len(calls) < 20  # stopped once 0.1 s had passed, after at least five calls


SWEEP = [a for a in SMALL if a not in ("--seq-len", "24", "--sparsity", "4")]


def test_bench_sweeps_every_combination_and_plots_time_against_the_swept_setting(tmp_path, capsys):
    out, png = tmp_path / "sweep.json", tmp_path / "plots" / "t.png"
    assert main(["bench", *SWEEP, "--seq-len", "16,32", "--sparsity", "4", "--json", str(out), "--plot", str(png)]) == 0
    res = json.loads(out.read_text())
    assert res["sweep"] == {"seq_len": [16, 32]}
    assert [(r["config"]["seq_len"], r["config"]["k"]) for r in res["runs"]] == [(16, 4), (32, 8)]
    for run in res["runs"]:
        best = {(r["layer"], r["step"]): r["best_ms"] for r in run["results"]}
        assert run["mosa_over_dense"]["fwd"] == pytest.approx(best[("mosa", "fwd")] / best[("dense", "fwd")])
    assert png.read_bytes()[:4] == b"\x89PNG" and sorted(p.name for p in png.parent.iterdir()) == ["t.png"]
    printed = capsys.readouterr().out
    assert printed.count("\n    16 ") == 1 and printed.count("\n    32 ") == 1
    # two swept settings: their product, T outermost
    assert main(["bench", *SWEEP, "--seq-len", "16,32", "--sparsity", "2,4", "--json", str(out)]) == 0
    runs = json.loads(out.read_text())["runs"]
    assert [(r["config"]["seq_len"], r["config"]["sparsity"]) for r in runs] == [(16, 2), (16, 4), (32, 2), (32, 4)]


@pytest.mark.parametrize("args,named", [(["--seq-len", "16,0"], "--seq-len"), (["--sparsity", "4,0.5"], "--sparsity"),
                                        (["--seq-len", "16", "--plot", "x.png"], "--plot"),
                                        (["--seq-len", "16,32", "--batch", "1,2", "--plot", "x.png"], "--plot")])
def test_bench_sweep_rejects_bad_values_and_plots_without_one_swept_setting(args, named, capsys):
    assert main(["bench", *SWEEP, *args]) == 2
    assert named in capsys.readouterr().err


def test_bench_list_arguments_must_parse(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", *SWEEP, "--seq-len", "16,x"])
    assert exc.value.code == 2 and "--seq-len" in capsys.readouterr().err


def test_sweep_plot_labels_only_some_minor_ticks():
    # a log axis over several decades has eight minor ticks per decade: label 2 and 5 times a power of ten
    from mosa_attention.plots.bench import _minor_label
    assert [_minor_label(v, 0) for v in (0.2, 0.3, 0.5, 0.7, 2.0, 5.0, 20.0, 90.0)] == \
        ["0.2", "", "0.5", "", "2", "5", "20", ""]


def test_bench_times_a_local_hybrid(tmp_path, capsys, monkeypatch):
    # --hybrid-kind local: the hybrid's other heads are sliding-window heads (window k unless set)
    built = []
    real = MoSAAttention.__init__
    monkeypatch.setattr(MoSAAttention, "__init__", lambda self, *a, **kw: (built.append(kw), real(self, *a, **kw))[1])
    out = tmp_path / "local.json"
    assert main(["bench", *SMALL, "--hybrid-dense-heads", "1", "--hybrid-kind", "local", "--local-window", "5",
                 "--json", str(out)]) == 0
    c = json.loads(out.read_text())["config"]
    assert (c["hybrid_kind"], c["local_window"]) == ("local", 5)
    assert built[-1]["dense_kind"] == "local" and built[-1]["local_window"] == 5
    assert "+ 1 local (window 5) vs 2 dense heads" in capsys.readouterr().out
    assert main(["bench", *SMALL, "--hybrid-dense-heads", "1", "--hybrid-kind", "local"]) == 0
    assert built[-1]["dense_kind"] == "local" and built[-1]["local_window"] is None
    assert "local (window k)" in capsys.readouterr().out


@pytest.mark.parametrize("extra,named", [(["--local-window", "4"], "--local-window"),
                                         (["--hybrid-kind", "local", "--local-window", "0"], "--local-window"),
                                         (["--hybrid-kind", "local", "--official", "x"], "--official")])
def test_bench_rejects_bad_local_arguments(extra, named, capsys):
    assert main(["bench", *SMALL, "--hybrid-dense-heads", "1", *extra]) == 2
    assert named in capsys.readouterr().err


def test_alternating_rounds_times_every_function_in_every_round():
    # each round times the functions in turn; the medians and the ratios to the base come from those rounds
    import time
    from mosa_attention.bench.layer import alternating_rounds
    order = []

    def sleeper(name, s):
        return lambda: (order.append(name), time.sleep(s))
    res = alternating_rounds({"fast": sleeper("fast", 0.001), "slow": sleeper("slow", 0.004)}, rounds=3, iters=2,
                             cuda=False, base="fast")
    assert order == ["fast", "fast", "slow", "slow"] * 3
    assert len(res["slow"]["rounds"]) == 3 and res["fast"]["ratio"] == 1.0
    assert res["slow"]["ms"] > res["fast"]["ms"] and res["slow"]["ratio"] > 2
    with pytest.raises(ValueError, match="base"):
        alternating_rounds({"a": lambda: None}, 1, 1, False, base="b")
