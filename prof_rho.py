import sys, torch
sys.path.insert(0, "src"); sys.path.insert(0, "benchmarks")
from mosa_attention.bench.layer import make_step
from mosa_attention.layers import MoSAAttention
from mosa_attention.ops import triton_mosa
from bench_layer import profiled
h, T, B = 512, 1024, 16
x = torch.randn(B, T, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
dy = torch.randn(B, T, h, device="cuda", dtype=torch.bfloat16)
for rho in (32, 4):
    layer = MoSAAttention(h, 17, rho, backend="triton").cuda().to(torch.bfloat16)
    for split in (1, None):
        triton_mosa.WGRAD_SPLIT = split
        p = profiled(make_step(layer, x, dy), 3, 5)
        print(f"== rho {rho}, split {split}: per step (us)")
        rows = sorted(((e.key, e.device_time_total / 5, e.count / 5) for e in p.key_averages() if e.device_time_total > 0), key=lambda r: -r[1])
        for k, t, n in rows[:18]:
            print(f"  {t:8.1f} x{n:.0f}  {k[:80]}")
