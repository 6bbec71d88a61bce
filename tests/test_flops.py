import json

import pytest

from mosa_attention import head_flops, match_sparse_heads
from mosa_attention.cli import main


def test_head_flops_by_hand():
    h, d, T = 512, 64, 1024
    assert head_flops("dense", h, d, T) == 8 * 512 * 64 * 1024 + 4 * 64 * 1024 ** 2 == 536_870_912
    # k = 1024 // 64 = 16
    assert head_flops("mosa", h, d, T, 64) == 4_194_304 + 65_536 + 1_048_576 + 1_024
    assert head_flops("fixed", h, d, T, 64) == 4_194_304 + 65_536
    assert head_flops("routing", h, d, T, 64) == 64 * (6 * 512 * 64 * 16 + 4 * 64 * 256) + 2 * 64 * 1024
    assert head_flops("local", h, d, T, 64) == 8 * 512 * 64 * 1024 + 4 * 64 * 1024 * 16


def test_matching_reproduces_paper_head_count():
    # the paper's FLOP-matched tiny hybrid at ρ = 64: 4 dense + 505 MoSA heads
    assert match_sparse_heads("mosa", 512, 9, 64, 1024, 64, 4) == 505
    budget = 5 * head_flops("dense", 512, 64, 1024)
    n = match_sparse_heads("mosa", 512, 9, 64, 1024, 16, 4)
    assert n * head_flops("mosa", 512, 64, 1024, 16) <= budget < (n + 1) * head_flops("mosa", 512, 64, 1024, 16)


def test_cli_json(capsys):
    assert main(["flops", "--d-model", "512", "--layers", "6", "--heads", "9", "--head-dim", "64",
                 "--seq-len", "1024", "--sparsity", "64", "--dense-heads", "4", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["num_mosa_heads"] == 505
    dense = 6 * (9 * 536_870_912 + 16 * 512 ** 2 * 1024)
    assert r["dense_gflops_forward"] == pytest.approx(dense / 1e9)
    assert r["gflops_forward"] <= r["dense_gflops_forward"]
    assert r["kv_cache_entries_per_layer"] == 1024 * 4 + 16 * 505
    # parameters: embeddings + output layer + per layer (router, QKV, O of each MoSA head; 4 dense heads; MLP; 2 LN)
    per_layer = 505 * (512 + 4 * 512 * 64) + 4 * 4 * 512 * 64 + 8 * 512 ** 2 + 4 * 512
    assert r["params"] == 2 * 8192 * 512 + 6 * per_layer + 2 * 512


def test_cli_preset_and_text(capsys):
    assert main(["flops", "--preset", "tiny", "--sparsity", "32"]) == 0
    out = capsys.readouterr().out
    assert "dense model: 6 layers" in out and "sparse heads" in out


def test_cli_routing_has_no_kv_cache_count(capsys):
    # (it printed "KV cache 0 entries per layer": routing attention has no KV-cache generation)
    assert main(["flops", "--preset", "tiny", "--sparsity", "32", "--attention", "routing"]) == 0
    assert "no KV-cache generation for this kind" in capsys.readouterr().out
    assert main(["flops", "--preset", "tiny", "--sparsity", "32", "--attention", "routing", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kv_cache_entries_per_layer"] is None


def test_flops_bad_input_is_one_error_line(capsys):
    assert main(["flops", "--heads", "9"]) == 2
    assert capsys.readouterr().err.strip() == "mosa flops: error: give --preset or --d-model, --layers"
    assert main(["flops", "--preset", "tiny", "--sparsity", "0"]) == 2
    assert "mosa flops: error: sparsity must be a finite number >= 1, got sparsity=0.0" in capsys.readouterr().err
