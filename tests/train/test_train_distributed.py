"""torchrun with 2 CPU processes (gloo): the same losses as one process with the same global batch, for each
way of sharing the gradients (DDP, FSDP2, and the all-reduce after the backward that the CUDA-graph modes use)."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from torch import nn

from mosa_attention.train.config import build_config
from mosa_attention.train.distributed import DistInfo, all_reduce_grads
from mosa_attention.train.loop import train

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def losses(run):
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def as_flags(overrides):
    return [a for o in overrides for a in ("--set", o)]


@pytest.mark.parametrize("kind", ["ddp", "fsdp", "allreduce"])
def test_two_processes_match_one(kind, tiny_overrides, tmp_path):
    overrides = tiny_overrides + ["train.steps=3", "train.save_every=0"]
    train(build_config(None, overrides + [f"train.out_dir={str(tmp_path / 'one')!r}"]), log=lambda *a: None)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "mosa_attention", "train", *as_flags(overrides),
           "--set", f"train.out_dir={str(tmp_path / 'two')!r}", "--distributed", kind]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 3
    assert max(abs(a - b) for a, b in zip(one, two)) < 1e-5, (one, two)
    # the checkpoint of the 2-process run is an ordinary, unsharded one
    from mosa_attention.train.checkpoint import load_model

    model, _, ck = load_model(tmp_path / "two")
    assert ck.state["world_size"] == 2 and ck.step == 3


@pytest.mark.parametrize("kind", ["ddp", "allreduce"])
def test_two_processes_with_bf16_gradients_follow_one(kind, tiny_overrides, tmp_path):
    # train.grad_reduce_dtype='bfloat16': the run says so and follows the one-process losses to bf16's rounding
    overrides = tiny_overrides + ["train.steps=3", "train.save_every=0"]
    train(build_config(None, overrides + [f"train.out_dir={str(tmp_path / 'one')!r}"]), log=lambda *a: None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "mosa_attention", "train", *as_flags(overrides), "--set", f"train.out_dir={str(tmp_path / 'two')!r}",
           "--distributed", kind, "--grad-reduce-dtype", "bfloat16"]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "float32 gradients averaged in bfloat16" in proc.stdout
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 3
    assert max(abs(a - b) / a for a, b in zip(one, two)) < 2e-4, (one, two)


@pytest.mark.parametrize("compile_mode", ["reduce-overhead", "max-autotune"])
def test_graph_modes_share_gradients_after_the_backward(compile_mode):
    """Under torchrun the CUDA-graph modes average gradients after the backward: chosen over DDP (and said), kept
    where asked for, refused with FSDP; other modes and single processes keep what the config says."""
    from mosa_attention.train.config import ConfigError
    from mosa_attention.train.loop import _sharing

    said = []
    two, one = DistInfo(world_size=2), DistInfo(world_size=1)
    assert _sharing("ddp", compile_mode, two, said.append) == "allreduce"
    assert len(said) == 1 and "allreduce" in said[0] and compile_mode in said[0]
    assert _sharing("allreduce", compile_mode, two, said.append) == "allreduce"
    with pytest.raises(ConfigError, match="fsdp.*allreduce"):
        _sharing("fsdp", compile_mode, two, said.append)
    assert _sharing("fsdp", compile_mode, one, said.append) == "fsdp"
    for mode in (False, True, "default", "max-autotune-no-cudagraphs"):
        assert _sharing("ddp", mode, two, said.append) == "ddp"
    assert len(said) == 1


def _grads_worker(rank, world, init_file, missing, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
        for i, p in enumerate(model.parameters()):
            p.grad = torch.full_like(p, float(rank + 1) * (i + 1))
        if missing and rank == 1:
            model[1].bias.grad = None  # this process has no gradient for one parameter
        info = DistInfo(rank=rank, world_size=world)
        try:
            all_reduce_grads(model, info, check=True)
            results[rank] = [p.grad.tolist() for p in model.parameters()]
        except RuntimeError as err:
            results[rank] = str(err)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("missing", [False, True])
def test_all_reduce_grads_averages_or_names_the_parameters_that_differ(missing, tmp_path):
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_grads_worker, args=(2, str(tmp_path / "init"), missing, results), nprocs=2, join=True)
        results = dict(results)
    if missing:  # both processes stop with the same clear error, none hangs in a collective of another size
        for rank in (0, 1):
            assert "different parameters (1.bias)" in results[rank], results[rank]
    else:  # every gradient is the mean of the processes' values: (1 + 2) / 2 * (i + 1)
        shapes = [(4, 3), (4,), (2, 4), (2,)]
        for rank in (0, 1):
            for i, (g, shape) in enumerate(zip(results[rank], shapes)):
                flat = torch.tensor(g).reshape(-1)
                assert flat.numel() == torch.Size(shape).numel()
                assert torch.allclose(flat, torch.full_like(flat, 1.5 * (i + 1))), (rank, i, g)


def _reduce_dtype_worker(rank, world, init_file, kind, reduce_dtype, results):
    # each process's gradient is (rank + 1) * (1 + 2^-12): float32 holds the 2^-12, bfloat16 (8 bits) rounds it off
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from mosa_attention.train.distributed import wrap

        info = DistInfo(rank=rank, world_size=world)
        model = nn.Linear(1, 2, bias=False)
        low = nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))  # a bf16 parameter travels in its own dtype
        model.register_parameter("low", low)
        value = (rank + 1) * (1 + 2.0 ** -12)
        if kind == "ddp":
            ddp = wrap(model, info, "ddp", reduce_dtype)
            (ddp(torch.full((1, 1), value)).sum() + (ddp.module.low.float() * rank).sum()).backward()
        else:
            model.weight.grad = torch.full((2, 1), value)
            low.grad = torch.full((3,), float(rank), dtype=torch.bfloat16)
            all_reduce_grads(model, info, reduce_dtype=reduce_dtype)
        results[rank] = (model.weight.grad.dtype, model.weight.grad.tolist(), low.grad.dtype, low.grad.tolist())
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["allreduce", "ddp"])
@pytest.mark.parametrize("reduce_dtype", [torch.float32, torch.bfloat16])
def test_gradients_travel_in_the_reduce_dtype(kind, reduce_dtype, tmp_path):
    # train.grad_reduce_dtype: float32 gradients averaged in bf16 where asked (DDP through its compression hook),
    # cast back into float32 gradients; a bf16 gradient as it is
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_reduce_dtype_worker, args=(2, str(tmp_path / "init"), kind, reduce_dtype, results), nprocs=2,
                 join=True)
        results = dict(results)
    exact = 1.5 * (1 + 2.0 ** -12)  # the mean in float32; in bf16 each value rounds to rank + 1, the mean to 1.5
    want = exact if reduce_dtype == torch.float32 else 1.5
    for rank in (0, 1):
        wdtype, w, hdtype, hgrad = results[rank]
        assert wdtype == torch.float32 and hdtype == torch.bfloat16
        assert w == [[pytest.approx(want, rel=1e-7, abs=0)]] * 2, (rank, w, want)
        assert hgrad == [0.5] * 3
