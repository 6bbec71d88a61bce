import os

import pytest
import torch

# Triton's kernels run under its interpreter on CPU tensors where there is no GPU (CI), and compiled on the GPU
# where there is one (tests/ops/triton_env.py); decided here, before any test module imports a kernel
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread; two threads on a busy 2-core machine can be 50x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
