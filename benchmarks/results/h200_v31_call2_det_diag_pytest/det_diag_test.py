"""Temporary diagnostic (not committed): why two deterministic runs of the mosa+local model differ in one process."""
import pytest
import torch

from mosa_attention.ops import attention as A
from mosa_attention.train.config import build_config
from mosa_attention.train.loop import train
from test_train_cuda import WIDER, losses, on_gpu, quiet

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("variant", ["as_is", "clear_masks", "dynamo_reset", "both", "eager_first"])
def test_diag(variant, tiny_overrides, tmp_path):
    base = on_gpu(tiny_overrides, *WIDER, "model.attention=mosa", "model.dense_kind='local'",
                  "train.deterministic=true")
    out = {}
    for name in ("a", "b"):
        if variant in ("clear_masks", "both"):
            A._FLEX_MASKS.clear()
            A._FLEX_COMPILED = None
        if variant in ("dynamo_reset", "both"):
            torch._dynamo.reset()
        if variant == "eager_first" and name == "a":
            x = torch.randn(8, 4, 128, 64, device="cuda")
            A.local_attention(x, x, x, 32)
        print("before", variant, name, list(A._FLEX_MASKS), A._FLEX_COMPILED is not None, flush=True)
        train(build_config(None, base + [f"train.out_dir={str(tmp_path / name)!r}"]), log=quiet)
        out[name] = losses(tmp_path / name)
        print("after", variant, name, list(A._FLEX_MASKS), A._FLEX_COMPILED is not None, flush=True)
    print("RESULT", variant, out["a"] == out["b"], out, flush=True)
