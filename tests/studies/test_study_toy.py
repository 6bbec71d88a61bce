"""The reproduction study's pipeline at toy size, so that its scripts do not rot."""
import json
import runpy
from pathlib import Path

import pytest

STUDY = Path(__file__).resolve().parents[2] / "studies" / "paper_study.py"


@pytest.fixture(scope="module")
def study():
    return runpy.run_path(str(STUDY))


def test_study_end_to_end_toy(study, tmp_path):
    main = study["main"]
    corpus, data, res = tmp_path / "corpus", tmp_path / "data", tmp_path / "res"
    assert main(["corpus", "--out", str(corpus), "--max-docs", "150"]) == 0
    sources = json.loads((corpus / "SOURCES.json").read_text())
    assert sources["wiki"]["documents"] == 150
    assert main(["prepare", "--corpus", str(corpus), "--out", str(data), "--vocab-size", "300",
                 "--cache", str(tmp_path / "cache")]) == 0
    assert (data / "train.bin").exists() and (data / "tokenizer.json").exists()
    args = ["train", "--toy", "--data", str(data), "--out", str(res), "--work", str(tmp_path / "runs"),
            "--steps", "4", "--batch-size", "2", "--eval-windows", "2", "--calibrate-windows", "2",
            "--runs", "dense,ppl-matched-r32"]
    assert main(args) == 0
    mosa = json.loads((res / "ppl-matched-r32.json").read_text())
    assert mosa["causal"]["calibrated"] and len(mosa["causal"]["layers"]) == 2
    assert mosa["val_ppl"] > 1 and mosa["curve"][-1]["step"] == 4
    # a finished run is skipped, not retrained
    before = (res / "dense.json").stat().st_mtime_ns
    assert main(args) == 0
    assert (res / "dense.json").stat().st_mtime_ns == before
    # a run whose result is missing (cut short after its checkpoint) resumes instead of failing
    (res / "dense.json").unlink()
    assert main(args) == 0
    assert json.loads((res / "dense.json").read_text())["curve"][-1]["step"] == 4
    assert main(["perf", "--toy", "--out", str(res), "--seq-lens", "64", "--perf-batch", "1", "--perf-steps", "1"]) == 0
    perf = json.loads((res / "perf.json").read_text())
    dense, sparse = perf["results"]
    # the MoSA hybrid caches T per dense head plus about k per MoSA head (calibrated thresholds)
    assert dense["kv_entries"]["dense"] == 2 * 2 * 64
    assert sparse["kv_entries"]["dense"] == 2 * 1 * 64 and sparse["kv_entries"]["sparse"] > 0
    table, plot = tmp_path / "table.md", tmp_path / "loss.png"
    assert main(["report", "--runs-dir", str(res), "--table", str(table), "--plot", str(plot)]) == 0
    text = table.read_text()
    assert "| dense | dense |" in text and "| mosa-r16 | not run |" in text and "ppl-matched-r32" in text
    assert plot.stat().st_size > 1000
