"""Count what one decode step does on the device: kernel launches, device->host reads, CPU vs GPU time.

    python benchmarks/profile_decode.py cuda OUT.json        # from the repository root; PL=1024 prompt tokens

Tiny preset at rho = 32, dense and mosa-hybrid (the models of bench_generation.py, thresholds calibrated the
same way), batch 1 and 8: prefill PL tokens, 8 warm-up steps, then 8 decode steps under torch.profiler.
gpu_kernel_ms_per_step sums the CUDA kernels' durations; gpu_self_ms_per_step (key_averages) counts each
kernel twice (as the kernel and as its launching op's self time) and is kept only as it was recorded.
"""
import json, sys, time, os
import torch
from torch.profiler import profile, ProfilerActivity
sys.path.insert(0, "src"); sys.path.insert(0, "benchmarks")
from bench_generation import bench_model, sync
from mosa_attention.inference import extend, new_cache

dev = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cuda")
out = sys.argv[2] if len(sys.argv) > 2 else "probe.json"
L, steps = int(os.environ.get("PL", 1024)), 8
rows = []
for name in ["dense", "mosa-hybrid"]:
    model = bench_model(name, dev)
    cfg = model.config
    for B in [1, 8]:
        ids = torch.randint(0, cfg.vocab_size, (B, L + 2 * steps), generator=torch.Generator().manual_seed(0)).to(dev)
        cache = new_cache(model, torch.zeros(B, dtype=torch.long, device=dev))
        extend(model, ids[:, :L], cache)
        for t in range(L, L + steps):  # warm-up steps
            extend(model, ids[:, t:t + 1], cache)
        sync(dev)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with profile(activities=acts) as prof:
            t0 = time.perf_counter()
            for t in range(L + steps, L + 2 * steps):
                extend(model, ids[:, t:t + 1], cache)
            sync(dev)
            wall = time.perf_counter() - t0
        ev = prof.events()
        cnt = lambda pred: sum(1 for e in ev if pred(e.name))
        try:
            gpu_us = sum(e.device_time_total for e in ev if e.device_type == torch.autograd.DeviceType.CUDA)
        except Exception as exc:
            gpu_us = float("nan"); print("gpu time:", exc)
        try:
            gpu_us2 = sum(k.self_device_time_total for k in prof.key_averages())
        except Exception as exc:
            gpu_us2 = float("nan"); print("gpu time 2:", exc)
        api = {}
        for e in ev:
            if e.name.startswith("cu"):
                api[e.name] = api.get(e.name, 0) + 1
        r = {"model": name, "batch": B, "prompt": L, "steps": steps,
             "wall_ms_per_step_profiled": 1e3 * wall / steps,
             "launches_per_step": cnt(lambda n: n in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")) / steps,
             "syncs_per_step": cnt(lambda n: "Synchronize" in n) / steps,
             "memcpy_per_step": cnt(lambda n: n == "cudaMemcpyAsync") / steps,
             "gpu_kernel_ms_per_step": gpu_us / 1e3 / steps, "gpu_self_ms_per_step": gpu_us2 / 1e3 / steps,
             "runtime_calls_per_step": {k: c / steps for k, c in sorted(api.items())},
             "aten_ops_per_step": cnt(lambda n: n.startswith("aten::")) / steps}
        rows.append(r)
        print(json.dumps(r), flush=True)
        with open(out, "w") as f:
            json.dump(rows, f, indent=1)
    del model
with open(out, "w") as f:
    json.dump(rows, f, indent=1)
