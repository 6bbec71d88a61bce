"""Shared set-up of the Triton kernel tests. Import it before anything imports triton: on a machine without
a GPU (CI) it turns on Triton's interpreter, so the kernels run on CPU tensors."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
# the dtypes the kernel tests run in: bfloat16 only where the kernels run compiled (on a GPU), since Triton's
# interpreter computes tl.dot on bfloat16 operands wrongly (seen with Triton 3.9)
DTYPES = (torch.float32, torch.float16) + (() if INTERPRET else (torch.bfloat16,))
# relative error allowed against float64: bfloat16 at the bound for real shapes
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1e-2}


def require(kernel) -> None:
    """Skip the calling test module unless ``kernel`` can run here: interpreted (it was imported after the
    interpreter was turned on), or compiled for a GPU that is present."""
    if not INTERPRET and not torch.cuda.is_available():
        pytest.skip("triton was imported without the interpreter and there is no GPU", allow_module_level=True)
    if not torch.cuda.is_available() and type(kernel).__name__ != "InterpretedFunction":
        pytest.skip("the kernels were imported before TRITON_INTERPRET=1 was set", allow_module_level=True)


def eager_and_graphed_steps(eager, shape, dtype, steps: int = 4):
    """For each of ``steps`` steps on fresh random x of ``shape`` and a fresh output gradient: (eager results,
    graphed results), each [y, x's gradient, every parameter's gradient], of the module ``eager`` and of a copy of
    it under ``torch.compile(mode="reduce-overhead")`` (cudagraph trees record its forward and backward). A GPU only."""
    import copy
    compiled_layer = copy.deepcopy(eager)
    compiled = torch.compile(compiled_layer, mode="reduce-overhead")
    for _ in range(steps):
        x = torch.randn(*shape, device=DEVICE, dtype=dtype)
        dy = torch.randn_like(x)
        results = []
        for layer, fn in ((eager, eager), (compiled_layer, compiled)):
            if fn is compiled:
                torch.compiler.cudagraph_mark_step_begin()
            layer.zero_grad(set_to_none=True)
            xl = x.clone().requires_grad_()
            y = fn(xl)
            y.backward(dy)
            # (clones: the graphs' outputs and gradients live in their memory pool, rewritten by the next replay)
            results.append([y.detach().clone(), xl.grad.clone()] + [p.grad.clone() for p in layer.parameters()])
        yield results
