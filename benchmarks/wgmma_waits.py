"""Which MoSA kernels let their tensor-core products run while other work goes on: no GPU needed.

On sm_90 Triton issues each `tl.dot` as an asynchronous wgmma and waits for it (`warp_group_dot_wait`) before
its result is used; `pendings = 0` waits for every product issued so far, so a loop whose step ends in such a
wait runs its products one at a time. This compiles the kernels at t3's launch settings for an H100/H200
(16-bit heads of dim 64, as `_cfg` picks them) and prints, per kernel, its wgmma count, the `pendings` of
each wait and the registers and spills that ptxas reports. Run with the Triton the card has (3.6 in
NOTES.md v22) ahead on the path:

    TRITON_INTERPRET=0 PYTHONPATH=/path/to/triton-3.6:src python benchmarks/wgmma_waits.py
"""
import glob
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(1, os.path.join(os.path.dirname(__file__), "..", "src"))
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from mosa_attention.bench.compile import kernel_signature  # noqa: E402
from mosa_attention.ops import triton_mosa as tm  # noqa: E402

BASE = dict(D=64, DP=64, PREC="tf32")
# kernel, constexprs, warps, stages, argument types; t3's launches (505 heads of k = 16, R = 256 rows, bf16)
LAUNCHES = [
    (tm._qkv_fwd, dict(BASE, ROPE=32, BM=128, BK=64, FUSED=True, ZERO=2, MARK=True, STATS=True), 8, 4, {}),
    (tm._attn_fwd, dict(BASE, BM=64, BN=32, BH=64, BS=128, ATOMIC=True, VEC=8, SCALED=True), 4, 3,
     {"out_ptr": "*fp16"}),
    (tm._out_bwd, dict(BASE, BM=256, BH=64, DLOGIT=True, ZERO=2, DWO=True), 8, 3, {}),
    (tm._attn_bwd_seqs, dict(BASE, ROPE=32, BLK=64), 4, 3, {}),
    (tm._qkv_bwd_dx, dict(BASE, BM=64, BH=128, ROUTER=False, ATOMIC=True, VEC=4), 8, 3, {"dx_ptr": "*fp32"}),
    (tm._dwqkv, dict(BASE, BR=64, BH=128, FUSED=True, ROUTER=False), 8, 2, {}),
    (tm._dwo, dict(BASE, BR=128, BH=128), 4, 3, {}),
    # t1's (17 heads of k = 32, R = 512): the router's weight gradient inside _dwqkv, its d-logit tile loaded
    # (DL16, the default) and made in registers (the old form, whose products wait for each other)
    (tm._dwqkv, dict(BASE, BR=128, BH=128, FUSED=True, ROUTER=True, DL16=True), 8, 2, {"dl_ptr": "*bf16"}),
    (tm._dwqkv, dict(BASE, BR=128, BH=128, FUSED=True, ROUTER=True), 8, 2, {}),
]


def main():
    ptxas = glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))
    print(f"Triton {triton.__version__}, sm_90")
    for kern, cons, warps, stages, types in LAUNCHES:
        cons = dict(cons)
        sig = kernel_signature(kern, cons, types)
        # pointers and h marked 16-byte divisible, as the launches' tensors are (so the loads pipeline)
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(sig) if n.endswith("_ptr") or n == "h"}
        k = triton.compile(ASTSource(kern, sig, cons, attrs=attrs),
                           target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))
        ttgir = k.asm["ttgir"]
        waits = re.findall(r"warp_group_dot_wait .*?pendings = (\d+)", ttgir)
        regs = ""
        if ptxas:
            with tempfile.TemporaryDirectory() as tmp:
                src = os.path.join(tmp, "k.ptx")
                with open(src, "w") as f:
                    f.write(k.asm["ptx"])
                run = subprocess.run([ptxas[0], "-v", "--gpu-name=sm_90a", src, "-o", os.path.join(tmp, "k.cubin")],
                                     capture_output=True, text=True)
                found = re.search(r"Used (\d+) registers", run.stderr)
                spill = re.search(r"(\d+) bytes spill stores", run.stderr)
                regs = f", {found.group(1) if found else '?'} registers, {spill.group(1) if spill else '?'} B spilled"
        label = kern.fn.__name__ + ("+router" if cons.get("ROUTER") else "") + ("+dl16" if cons.get("DL16") else "")
        print(f"{label:22s} wgmma {ttgir.count('ttng.warp_group_dot '):2d}, waits (pendings) "
              f"{', '.join(waits) or '-'}{regs}")


if __name__ == "__main__":
    main()
