import numpy as np
import pytest

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "the", "of", "and"]

# A model small enough that a step takes milliseconds: 1 layer of width 32, T = 32, sparsity 4.
TINY_MODEL = ["model.n_layer=2", "model.d_model=32", "model.n_head=2", "model.head_dim=16", "model.seq_len=32",
              "model.sparsity=4", "model.num_dense_heads=1"]


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_corpus")
    rng = np.random.default_rng(0)
    for i in range(40):
        (root / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(WORDS, size=120)) + ".")
    return root


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def tiny_overrides(tiny_corpus, cache_dir, tmp_path):
    """Overrides for a fast run into tmp_path/run (add more after these to change them). On the CPU also on a
    machine with a GPU: these tests compare runs bit for bit, which the GPU's default atomic scatters and
    bf16 autocast do not repeat (``test_train_cuda.py`` covers the GPU)."""
    return TINY_MODEL + ["train.device=cpu", f"data.source={str(tiny_corpus)!r}", f"data.cache_dir={str(cache_dir)!r}",
                         "data.vocab_size=300", "train.steps=8", "train.batch_size=4", "train.warmup_steps=2",
                         "train.log_every=1", "train.eval_windows=4", "train.save_every=4", "train.keep_last=5",
                         f"train.out_dir={str(tmp_path / 'run')!r}"]


