"""Compiling the Triton kernels for a GPU target without a GPU (Triton's `ASTSource`): the signature a launch
would give them, so that tests and scripts can check what the card will run (a compile error, the PTX,
registers, the product waits) on a machine without one."""
from __future__ import annotations

# pointer arguments that are float32, int64 or int32 in every launch; the rest are the compute dtype's (bf16)
FLOAT32_PTRS = {"sc_ptr", "lse_ptr", "delta_ptr", "dsc_ptr", "dl_ptr", "cos_ptr", "sin_ptr"}
INT64_PTRS = {"idx_ptr", "perm_ptr", "starts_ptr"}
INT32_PTRS = {"stats_ptr"}


def kernel_signature(kern, cons: dict, types: dict | None = None) -> dict:
    """The signature of ``kern`` (a ``triton.jit`` function) for ``triton.compile``: ``cons`` are its constexprs
    (those left out are added with their defaults, in place), ``types`` overrides an argument's type; pointers
    take the dtypes above (``mark_ptr`` uint8, ``src_ptr`` float16, others bfloat16), scalars int32 but the
    softmax scales float32."""
    types = types or {}
    for p in kern.params:
        if p.is_constexpr and p.name not in cons:
            cons[p.name] = p.default
    sig = {}
    for name in kern.arg_names:
        if name in cons:
            sig[name] = "constexpr"
        elif name in types:
            sig[name] = types[name]
        elif name.endswith("_ptr") or name in ("src0", "src1", "src2"):
            sig[name] = ("*fp32" if name in FLOAT32_PTRS else "*i64" if name in INT64_PTRS
                         else "*i32" if name in INT32_PTRS else "*u8" if name == "mark_ptr"
                         else "*fp16" if name == "src_ptr" else "*bf16")
        else:
            sig[name] = "fp32" if name in ("qk_scale", "sm_scale") else "i32"
    return sig
