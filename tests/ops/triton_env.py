"""Shared set-up of the Triton kernel tests. Import it before anything imports triton: on a machine without
a GPU (CI) it turns on Triton's interpreter, so the kernels run on CPU tensors."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"


def require(kernel) -> None:
    """Skip the calling test module unless ``kernel`` can run here: interpreted (it was imported after the
    interpreter was turned on), or compiled for a GPU that is present."""
    if not INTERPRET and not torch.cuda.is_available():
        pytest.skip("triton was imported without the interpreter and there is no GPU", allow_module_level=True)
    if not torch.cuda.is_available() and type(kernel).__name__ != "InterpretedFunction":
        pytest.skip("the kernels were imported before TRITON_INTERPRET=1 was set", allow_module_level=True)
