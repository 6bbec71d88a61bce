"""`mosa eval`, `mosa plot` and `mosa viz` on a tiny trained run; selection statistics."""
import json

import numpy as np
import pytest
import torch

from mosa_attention import MoSAConfig, MoSALM
from mosa_attention.cli import main
from mosa_attention.eval.perplexity import evaluate
from mosa_attention.eval.selection import selection_stats


def test_eval_perplexity_at_several_lengths_and_selection_stats(trained_run, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["eval", str(trained_run), "--seq-len", "32", "16", "64", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "val at seq_len 32: loss" in text and "val at seq_len 64" in text
    assert "tokens no head chose" in text
    report = json.loads(out.read_text())
    assert [r["seq_len"] for r in report["perplexity"]] == [32, 16, 64]
    final = json.loads((trained_run / "final.json").read_text())
    assert report["perplexity"][0]["loss"] == pytest.approx(final["val_loss"], rel=0.05)
    layer = report["selection"]["32"]["blocks.0.attn"]
    rate = np.array(layer["position_rate"])
    assert rate.shape == (layer["heads"], 32)
    assert np.allclose(rate.sum(1), 32 // 4, atol=0.01)  # each head keeps exactly k = T / sparsity tokens per sequence
    assert 0 <= layer["tokens_no_head_chose"] < 1
    assert all(sum(h) == layer["sequences"] * 32 for h in layer["score_histogram"])


def test_eval_bad_inputs(trained_run, tmp_path, capsys):
    assert main(["eval", str(trained_run), "--seq-len", "100000"]) == 2
    assert "outside what this model accepts" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "nothing")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_plot_and_viz_write_pngs(trained_run, tmp_path, capsys):
    png = tmp_path / "curves.png"
    assert main(["plot", str(trained_run), str(trained_run), "-o", str(png), "--labels", "a", "b"]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    viz = tmp_path / "viz.png"
    assert main(["viz", str(trained_run), "--text", "alpha beta gamma delta the of and kappa iota", "-o", str(viz)]) == 0
    assert viz.read_bytes()[:4] == b"\x89PNG"
    assert main(["plot", str(tmp_path), "-o", str(png)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    assert main(["viz", str(trained_run), "--layers", "99", "-o", str(viz)]) == 2
    assert "--layers: the model has layers 0 to" in capsys.readouterr().err
    for cmd, option in (("viz", "--max-heads"), ("viz", "--max-tokens"), ("eval", "--batch-size")):
        with pytest.raises(SystemExit) as exit_info:  # argparse names the option (was a ZeroDivisionError, or
            main([cmd, str(trained_run), option, "0"])  # "range() arg 3 must not be zero")
        assert exit_info.value.code == 2 and f"{option}: expected an integer >= 1, got 0" in capsys.readouterr().err


def test_selection_stats_without_mosa_heads_and_perplexity_of_uniform_model():
    cfg = MoSAConfig(vocab_size=50, n_layer=1, d_model=16, n_head=1, head_dim=16, seq_len=16, attention="dense")
    model = MoSALM(cfg)
    tokens = np.arange(200) % 50
    assert selection_stats(model, tokens, 16) == {}
    with torch.no_grad():
        model.lm_head.weight.zero_()
    res = evaluate(model, tokens, 16)
    assert res["ppl"] == pytest.approx(50, rel=1e-4) and res["tokens"] == 12 * 16


def test_eval_causal_routing_with_calibration(trained_run, tmp_path, capsys):
    """--routing threshold after --calibrate: heads keep about k of T tokens, perplexity comes out finite."""
    out = tmp_path / "eval.json"
    assert main(["eval", str(trained_run), "--routing", "threshold", "--calibrate", "4", "--json", str(out)]) == 0
    captured = capsys.readouterr()
    assert "routing: threshold" in captured.out and "warning" not in captured.err
    report = json.loads(out.read_text())
    assert report["routing"] == "threshold"
    layer = report["selection"]["32"]["blocks.0.attn"]
    kept_per_head = np.array(layer["position_rate"]).sum(1)
    assert np.all(kept_per_head > 0) and abs(kept_per_head.mean() - 32 // 4) < 4  # ~k = 8, not exact as top-k
    assert np.isfinite(report["perplexity"][0]["ppl"])
    # without calibration the top-k-trained model gets a warning
    assert main(["eval", str(trained_run), "--routing", "threshold", "--no-selection"]) == 0
    assert "add --calibrate" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # argparse: the option named, no traceback
        main(["eval", str(trained_run), "--calibrate", "-1"])
    assert exit_info.value.code == 2 and "--calibrate: expected an integer >= 0, got -1" in capsys.readouterr().err
