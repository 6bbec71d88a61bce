"""The atomic scatter's inline PTX assembled for sm_90 without a GPU: Triton compiles the kernels for an
H100/H200 target and runs ptxas, so a malformed instruction fails here, in CI, rather than on the card.
(The interpreter, which runs the kernels' values in the other tests, cannot run inline PTX.)"""
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent("""
    import json, re
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from mosa_attention.ops import triton_mosa as tm
    found = {}
    for odt, vec in (("fp32", 4), ("bf16", 4), ("bf16", 8), ("fp16", 4), ("fp16", 8)):
        cdt = "bf16" if odt == "fp32" else odt
        for name, kern, sig, cons, warps in (
            ("attn_fwd", tm._attn_fwd,
             dict(qkv_ptr=f"*{cdt}", idx_ptr="*i64", sc_ptr="*fp32", wo_ptr=f"*{cdt}", o_ptr=f"*{cdt}",
                  lse_ptr="*fp32", out_ptr=f"*{odt}", T="i32", h="i32", E="i32", R="i32", K="i32", qk_scale="fp32",
                  stats_ptr="*i32"),
             dict(D=64, DP=64, BM=64, BN=32, BH=64, BS=128, PREC="tf32", ATOMIC=True, VEC=vec,
                  SCALED=odt == "fp16", ATTN=True, PROJ=True, SPLIT_H=False), 4),
            ("dx", tm._qkv_bwd_dx,
             dict(dqkv_ptr=f"*{cdt}", idx_ptr="*i64", w_ptr=f"*{cdt}", dx_ptr=f"*{odt}", T="i32", h="i32",
                  E="i32", R="i32", K="i32", dl_ptr="*fp32", wr_ptr=f"*{cdt}"),
             dict(D=64, DP=64, BM=64, BH=128, PREC="tf32", ROUTER=True, ATOMIC=True, VEC=vec), 8)):
            sig.update({k: "constexpr" for k in cons})
            k = triton.compile(ASTSource(kern, sig, cons), target=GPUTarget("cuda", 90, 32),
                               options=dict(num_warps=warps, num_stages=2))
            assert k.asm["cubin"], (name, odt, vec)
            ptx = k.asm["ptx"]
            found[f"{name} {odt} {vec}"] = sorted(set(re.findall(r"@p (red\\.[a-z0-9.]+)", ptx)))
    print(json.dumps(found))
""")


def test_vector_atomics_assemble_for_sm90():
    env = dict(os.environ, TRITON_INTERPRET="0")
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        pytest.skip("this triton has no NVIDIA backend")
    run = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    import json
    found = json.loads(run.stdout.strip().splitlines()[-1])
    want = {"fp32 4": "red.global.add.v4.f32", "bf16 4": "red.global.add.noftz.v2.bf16x2",
            "bf16 8": "red.global.add.noftz.v4.bf16x2", "fp16 4": "red.global.add.noftz.v2.f16x2",
            "fp16 8": "red.global.add.noftz.v4.f16x2"}
    for key, ops in found.items():
        mode = key.split(" ", 1)[1]
        assert ops == [want[mode]], (key, ops)


ALL_KERNELS = textwrap.dedent("""
    import sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from mosa_attention.ops import triton_mosa as tm
    from mosa_attention.bench.compile import kernel_signature as sig_of
    ARCH = int(sys.argv[1])
    TARGET = GPUTarget("cuda", ARCH, 32)
    # y's scatter as the launchers pick it (_atomic_plan): 16-byte vector adds into the scaled float16 buffer
    # from sm_90, scalar atomics before (the vector forms' inline PTX needs sm_90)
    Y_SCATTER = dict(VEC=8, SCALED=True) if ARCH >= 90 else dict(VEC=0, SCALED=False)

    base = dict(D=64, DP=64, PREC="tf32")
    for kern, cons in (
            (tm._qkv_fwd, dict(base, ROPE=32, BM=128, BK=64, FUSED=True, ZERO=1)),
            (tm._qkv_fwd, dict(base, ROPE=32, BM=128, BK=64, FUSED=True, ZERO=2, MARK=True)),
            (tm._qkv_fwd, dict(base, ROPE=32, BM=128, BK=64, FUSED=True, ZERO=1, STATS=True)),
            (tm._qkv_fwd, dict(base, ROPE=32, BM=64, BK=32, FUSED=False, ZERO=1, STATS=True, COUNT=True)),
            (tm._attn_fwd, dict(base, BM=64, BN=32, BH=64, BS=128)),
            (tm._attn_fwd, dict(base, BM=64, BN=32, BH=64, BS=128, ATOMIC=True, **Y_SCATTER)),
            # the attention alone, then the projection alone adding into a hybrid's y in place (project_into)
            (tm._attn_fwd, dict(base, BM=64, BN=32, BH=64, BS=128, ATOMIC=True, PROJ=False)),
            (tm._attn_fwd, dict(base, BM=64, BN=32, BH=128, BS=128, ATOMIC=True, ATTN=False, SPLIT_H=True,
                                VEC=8 if ARCH >= 90 else 0)),
            (tm._unscale, dict(D=64, BLOCK=4096)),
            (tm._unscale, dict(D=64, BLOCK=4096, ADD=True)),  # into the dense heads' y (add_unfinished)
            (tm._unscale, dict(D=64, BLOCK=4096, ADD=True, SCALED=False)),  # a float32 buffer, likewise
            (tm._segment_sum, dict(BT=16, BH=512)),
            (tm._out_bwd, dict(base, BM=64, BH=64, DLOGIT=True, ZERO=1, DENSE_DL=True)),
            (tm._out_bwd, dict(base, BM=64, BH=64, DLOGIT=True, ZERO=2)),
            (tm._out_bwd, dict(base, BM=256, BH=64, DLOGIT=True, ZERO=1, DWO=True)),
            (tm._out_bwd, dict(base, BM=64, BH=64, DLOGIT=True, ZERO=1, ATTN=True, ROPE=32)),
            (tm._out_bwd, dict(base, BM=32, BH=64, DLOGIT=True, ZERO=2, ATTN=True, ROPE=32)),  # alone's block
            (tm._dwo, dict(base, BR=128, BH=128)),
            (tm._attn_bwd_dkdv, dict(base, ROPE=32, BM=64, BN=64, BS=128)),
            (tm._attn_bwd_dq, dict(base, ROPE=32, BM=64, BN=32, BS=128)),
            (tm._attn_bwd_seqs, dict(base, ROPE=32, BLK=64)),
            (tm._qkv_bwd_dx, dict(base, BM=64, BH=128, ROUTER=True)),
            (tm._qkv_bwd_dx, dict(base, BM=64, BH=128, ROUTER=True, ATOMIC=True, VEC=4 if ARCH >= 90 else 0)),
            (tm._dwqkv, dict(base, BR=64, BH=128, FUSED=True, ROUTER=True)),
            # the weight gradients in row slices: partial sums added into float32 (vector atomics from sm_90)
            (tm._dwqkv, dict(base, BR=128, BH=128, FUSED=True, ROUTER=True, SPLIT=2, VEC=4 if ARCH >= 90 else 0)),
            (tm._dwqkv, dict(base, BR=128, BH=128, FUSED=True, ROUTER=True, DL16=True)),
            (tm._out_bwd, dict(base, BM=64, BH=64, DLOGIT=True, ZERO=2, DL16=True)),
            (tm._dwo, dict(base, BR=128, BH=128, SPLIT=4, VEC=4 if ARCH >= 90 else 0)),
            (tm._dwr, dict(BR=32, BH=128))):
        sig = sig_of(kern, cons)
        if cons.get("ATOMIC") and kern is tm._qkv_bwd_dx:  # x's gradient adds into float32
            sig["dx_ptr"] = "*fp32"
        elif cons.get("ATOMIC") and ARCH < 90:  # and so does a bfloat16 y before sm_90
            sig["out_ptr"] = "*fp32"
        elif cons.get("SPLIT", 1) > 1:  # and the sliced weight gradients
            sig.update({n: "*fp32" for n in ("dw_ptr", "dwr_ptr", "dwo_ptr") if n in sig})
        if cons.get("DL16") and kern is tm._dwqkv:  # the d-logit tile, in the compute dtype
            sig["dl_ptr"] = "*bf16"
        k = triton.compile(ASTSource(kern, sig, cons), target=TARGET,
                           options=dict(num_warps=4, num_stages=2))
        assert k.asm["cubin"], kern.__name__
        print("compiled", kern.__name__)
    # the routing and dense-head kernels too
    from mosa_attention.ops import triton_routing as tr, triton_rope as rp
    for bits, s_dt, unroll, two in ((16, "*bf16", False, True), (32, "*fp32", False, True),
                                    (19, "*fp16", False, True), (16, "*bf16", False, False),
                                    (16, "*bf16", True, False)):
        cons = dict(INCLUDE_FIRST=True, SIGMOID=True, BT=1024, BE=1, KEY_BITS=bits, UNROLL=unroll, TWO_LEVEL=two)
        sig = dict(s_ptr=s_dt, idx_ptr="*i64", kept_ptr="*fp32", T="i32", E="i32", k="i32", stride_b="i64",
                   stride_t="i64", stride_e="i64", n_bits="i32", **{n: "constexpr" for n in cons})
        k = triton.compile(ASTSource(tr._topk_select, sig, cons), target=TARGET,
                           options=dict(num_warps=1, num_stages=2))
        assert k.asm["cubin"]
        print("compiled _topk_select", bits)
    for backward in (False, True):
        cons = dict(D=64, DP=64, ROPE=32, BT=32, BACKWARD=backward)
        k = triton.compile(ASTSource(rp._split_rope, sig_of(rp._split_rope, cons), cons),
                           target=TARGET, options=dict(num_warps=4, num_stages=2))
        assert k.asm["cubin"]
        print("compiled _split_rope", backward)
    from mosa_attention.ops import triton_combine as tc
    cons = dict(BR=8, BH=512)
    sig = dict(dst_ptr="*bf16", src_ptr="*bf16", rows_ptr="*u8", N="i32", h="i32", BR="constexpr", BH="constexpr")
    k = triton.compile(ASTSource(tc._add_at_rows, sig, cons), target=TARGET,
                       options=dict(num_warps=4, num_stages=2))
    assert k.asm["cubin"]
    print("compiled _add_at_rows")
    slots = {}
    for i in range(5):
        slots.update({f"s{i}": "*fp32", f"d{i}": "*bf16", f"n{i}": "i32"})
    sig = dict(slots, e0="i32", e1="i32", e2="i32", e3="i32", BLOCK="constexpr")
    k = triton.compile(ASTSource(tc._cast_many, sig, dict(BLOCK=4096)), target=TARGET,
                       options=dict(num_warps=8, num_stages=2))
    assert k.asm["cubin"]
    print("compiled _cast_many")
    # the decoding step's MoSA heads (ops.triton_decode_heads), float32 and bfloat16 weights and caches
    from mosa_attention.ops import triton_decode_heads as dh
    for dt in ("*fp32", "*bf16"):
        fixed = dict(keep_ptr="*i8", count_ptr="*i64", pos_ptr="*i64", posc_ptr="*i64", part_ptr="*fp32",
                     yh_ptr="*fp32", scc_ptr="*fp32", thr_ptr="*fp32", list_ptr="*i32", n_ptr="*i32")
        for kern, cons in ((dh._route, dict(FIRST=True, COMPACT=True, BE=8, BK=512)),
                           (dh._qkv_parts, dict(COMPACT=True, D=64, DP=64, BK=64)),
                           (dh._attend_out, dict(COMPACT=True, D=64, DP=64, RD=32, NSP=8, BS=64, BH=64)),
                           (dh._sum_heads, dict(BE=512, BH=16))):
            types = {n: fixed.get(n, dt) for n in kern.arg_names if n.endswith("_ptr")}
            k = triton.compile(ASTSource(kern, sig_of(kern, cons, types), cons), target=TARGET,
                               options=dict(num_warps=4, num_stages=2))
            assert k.asm["cubin"]
            print("compiled", kern.__name__, dt)
""")


@pytest.mark.parametrize("arch", [90, 80])
def test_every_kernel_compiles(arch):
    # the interpreter runs Python semantics: it accepts what Triton's compiler rejects (a loop that changes
    # a variable's type, say), so compile each kernel (the op's, top-k's, the dense heads' split + RoPE) as a
    # GPU launch would: for an H100/H200 (sm_90) and for an A100 (sm_80: no wgmma, no vector atomics)
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        pytest.skip("this triton has no NVIDIA backend")
    run = subprocess.run([sys.executable, "-c", ALL_KERNELS, str(arch)], env=dict(os.environ, TRITON_INTERPRET="0"),
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("compiled") == 46, run.stdout
