import numpy as np
import pytest

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "the", "of", "and"]



@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A few steps of a tiny MoSA hybrid, trained through the `mosa train` command."""
    import torch

    from mosa_attention.cli import main

    root = tmp_path_factory.mktemp("eval_run")
    corpus = root / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(1)
    for i in range(30):
        (corpus / f"d{i}.txt").write_text(" ".join(rng.choice(WORDS, size=100)) + ".")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc = main(["train", "--data", str(corpus), "--cache-dir", str(root / "cache"), "--vocab-size", "300",
                   "--steps", "6", "--batch-size", "4", "--out", str(root / "run"),
                   "--set", "model.n_layer=2", "--set", "model.d_model=32", "--set", "model.n_head=2",
                   "--set", "model.head_dim=16", "--set", "model.seq_len=32", "--set", "model.sparsity=4",
                   "--set", "model.num_dense_heads=1", "--set", "train.log_every=1", "--set", "train.eval_windows=4"])
    finally:
        torch.set_num_threads(n)
    assert rc == 0
    return root / "run"
