"""The trainer on a GPU (skipped without one; CI has none, the card runs them: benchmarks/NOTES.md v20).
On a GPU the MoSA kernels' default scatter adds by atomics, and SDPA's backward by its own, in an order that
varies between runs; with ``train.deterministic`` every step is in a fixed order and a run repeats bit for
bit."""
import json

import pytest
import torch

from mosa_attention.train.config import build_config
from mosa_attention.train.loop import train
from train_cases import ATTENTION_CASES, attention_overrides

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# wider than the CPU tests' model: head dim 64, T = 128 (several key blocks in SDPA's backward)
WIDER = ["model.d_model=128", "model.n_head=4", "model.head_dim=64", "model.seq_len=128", "model.sparsity=4",
         "train.batch_size=8", "train.steps=4", "train.save_every=2"]


def losses(run, key="loss"):
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}


def on_gpu(overrides, *more):
    return [o for o in overrides if o != "train.device=cpu"] + ["train.device=cuda", *more]


def quiet(*a, **k):
    pass


@pytest.mark.parametrize("compile_mode", ["false", None])
@pytest.mark.parametrize("attention", ATTENTION_CASES)
def test_deterministic_gpu_runs_repeat_bit_for_bit(attention, compile_mode, tiny_overrides, tmp_path):
    # eager, and under the default (train.compile='auto': CUDA graphs)
    kind = attention_overrides(attention)
    base = on_gpu(tiny_overrides, *WIDER, *kind, "train.deterministic=true",
                  *([f"train.compile={compile_mode}"] if compile_mode else []))
    for name in ("a", "b"):
        train(build_config(None, base + [f"train.out_dir={str(tmp_path / name)!r}"]), log=quiet)
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert len(a) == 4 and a == b, (a, b)


@pytest.mark.parametrize("attention", ["routing", "mosa+local"])
def test_compiled_runs_of_two_lengths_in_one_process(attention, tiny_overrides, tmp_path):
    # dynamo makes a dimension symbolic once a function has seen two sizes of it in the process (automatic dynamic
    # shapes), and inductor failed to build the routing model's dynamic graph (torch 2.11: CantSplit); the trainer
    # compiles with static shapes, so the second length recompiles; and the mosa+local model's run at the first
    # length repeats bit for bit after the others (its local heads' mask is made in the compiled graph, never
    # read from the cache that the eager evaluation fills)
    kind = attention_overrides(attention)
    base = on_gpu(tiny_overrides, *WIDER, *kind, "train.deterministic=true")
    for i, T in enumerate((64, 128, 64)):
        train(build_config(None, base + [f"model.seq_len={T}", f"train.out_dir={str(tmp_path / str(i))!r}"]),
              log=quiet)
    first, other, again = (losses(tmp_path / str(i)) for i in range(3))
    assert len(first) == len(other) == 4 and first == again, (first, again)


@pytest.mark.parametrize("compile_mode", ["false", None])
def test_deterministic_gpu_run_resumes_bit_for_bit(compile_mode, tiny_overrides, tmp_path):
    base = on_gpu(tiny_overrides, *WIDER, "train.deterministic=true",
                  *([f"train.compile={compile_mode}"] if compile_mode else []))
    train(build_config(None, base + [f"train.out_dir={str(tmp_path / 'full')!r}"]), log=quiet)
    part = base + [f"train.out_dir={str(tmp_path / 'part')!r}"]
    train(build_config(None, part + ["train.stop_after=2"]), log=quiet)
    train(build_config(None, part), resume=str(tmp_path / "part"), log=quiet)
    assert losses(tmp_path / "part") == losses(tmp_path / "full")


def test_default_gpu_run_is_close_to_the_deterministic_one(tiny_overrides, tmp_path):
    # the same math in another order of additions: the losses agree to rounding, not bit for bit (both eager;
    # the compiled default: the test below)
    det = on_gpu(tiny_overrides, *WIDER, "train.deterministic=true", "train.compile=false",
                 f"train.out_dir={str(tmp_path / 'det')!r}")
    default = on_gpu(tiny_overrides, *WIDER, "train.compile=false", f"train.out_dir={str(tmp_path / 'default')!r}")
    train(build_config(None, det), log=quiet)
    train(build_config(None, default), log=quiet)
    a, b = losses(tmp_path / "det"), losses(tmp_path / "default")
    assert a.keys() == b.keys() and len(a) == 4
    assert all(abs(a[s] - b[s]) <= 1e-3 * abs(a[s]) for s in a), (a, b)


@pytest.mark.parametrize("mode", ["true", "'reduce-overhead'", None])
def test_compiled_gpu_training_matches_eager(mode, tiny_overrides, tmp_path):
    # torch.compile of the model (inductor), and with CUDA graphs ("reduce-overhead", the fast path the docs
    # give for small steps; None: the default, 'auto', which takes it on a GPU): the same losses as the eager run
    # to rounding (bf16 autocast, atomic adds)
    eager = on_gpu(tiny_overrides, *WIDER, "train.compile=false", f"train.out_dir={str(tmp_path / 'eager')!r}")
    compiled = on_gpu(tiny_overrides, *WIDER, *([f"train.compile={mode}"] if mode else []),
                      f"train.out_dir={str(tmp_path / 'c')!r}")
    said = []
    train(build_config(None, eager), log=quiet)
    train(build_config(None, compiled), log=lambda *a, **k: said.append(" ".join(map(str, a))))
    if mode is None:
        assert any("train.compile='auto': reduce-overhead" in line for line in said), said
        assert any("compiled (reduce-overhead)" in line for line in said), said
    a, b = losses(tmp_path / "eager"), losses(tmp_path / "c")
    assert a.keys() == b.keys() and len(a) == 4
    assert all(abs(a[s] - b[s]) <= 5e-3 * abs(a[s]) for s in a), (a, b)


@pytest.mark.parametrize("case", [*ATTENTION_CASES, "threshold+aux"])
def test_every_attention_kind_trains_under_the_default_cuda_graphs(case, tiny_overrides, tmp_path):
    # train.compile='auto' takes CUDA graphs on a GPU for every model: each attention kind (and threshold routing
    # with the router's auxiliary loss) follows its eager run's losses to rounding
    kind = (["model.attention='mosa'", "model.routing='threshold'", "model.router_aux_loss=0.01"]
            if case == "threshold+aux" else attention_overrides(case))
    eager = on_gpu(tiny_overrides, *WIDER, *kind, "train.compile=false", f"train.out_dir={str(tmp_path / 'e')!r}")
    default = on_gpu(tiny_overrides, *WIDER, *kind, f"train.out_dir={str(tmp_path / 'd')!r}")
    said = []
    train(build_config(None, eager), log=quiet)
    train(build_config(None, default), log=lambda *a, **k: said.append(" ".join(map(str, a))))
    assert any("compiled (reduce-overhead)" in line for line in said), said
    a, b = losses(tmp_path / "e"), losses(tmp_path / "d")
    assert a.keys() == b.keys() and len(a) == 4
    assert all(abs(a[s] - b[s]) <= 5e-3 * abs(a[s]) for s in a), (a, b)


def test_gradient_accumulation_under_cuda_graphs(tiny_overrides, tmp_path):
    # two micro-batches per step under CUDA graphs (the first one's gradients moved out of the graphs' pool,
    # pytorch/pytorch#169545) follow one micro-batch of the same global batch, under graphs and eagerly
    runs = {"one": [], "two": ["train.grad_accum=2"], "eager": ["train.grad_accum=2", "train.compile=false"]}
    for name, more in runs.items():
        train(build_config(None, on_gpu(tiny_overrides, *WIDER, "train.compile='reduce-overhead'", *more,
                                        f"train.out_dir={str(tmp_path / name)!r}")), log=quiet)
    for key, tol in (("loss", 5e-3), ("grad_norm", 2e-2)):  # (the norm shows a wrong sum from the first step)
        one, two, eager = (losses(tmp_path / n, key) for n in runs)
        assert one.keys() == two.keys() == eager.keys() and len(one) == 4
        for other in (two, eager):
            assert all(abs(one[s] - other[s]) <= tol * abs(one[s]) for s in one), (key, one, other)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
@pytest.mark.parametrize("reduce_dtype,accum", [("float32", 1), ("bfloat16", 1), ("float32", 2)])
def test_two_gpus_with_cuda_graphs_match_one(reduce_dtype, accum, tiny_overrides, tmp_path):
    # torchrun on two GPUs with CUDA graphs: the processes average their gradients after the backward
    # (train.distributed="allreduce", chosen for the graph modes; in float32 or, train.grad_reduce_dtype, bf16;
    # after two micro-batches each with train.grad_accum=2) and follow the one-GPU run's losses to rounding
    import os
    import subprocess
    import sys

    base = on_gpu(tiny_overrides, *WIDER, "train.compile='reduce-overhead'", "train.save_every=0")
    train(build_config(None, base + [f"train.out_dir={str(tmp_path / 'one')!r}"]), log=quiet)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "mosa_attention", "train", *[a for o in base for a in ("--set", o)],
           "--set", f"train.out_dir={str(tmp_path / 'two')!r}", "--set", f"train.grad_reduce_dtype={reduce_dtype}",
           "--set", f"train.grad_accum={accum}"]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout and "train.distributed='allreduce'" in proc.stdout
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert a.keys() == b.keys() and len(a) == 4
    assert all(abs(a[s] - b[s]) <= 5e-3 * abs(a[s]) for s in a), (a, b)


def test_deterministic_graphs_resume_bit_for_bit_in_fresh_processes(tiny_overrides, tmp_path):
    # a deterministic run under the default CUDA graphs, stopped and resumed in new processes, each with an empty
    # inductor cache (so each compiles and picks its kernels' configurations anew): the losses of one whole run
    import os
    import subprocess
    import sys

    base = on_gpu(tiny_overrides, *WIDER, "train.deterministic=true")

    def run(name, *more):
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"inductor_{name}")}
        cmd = [sys.executable, "-m", "mosa_attention", "train", *[a for o in base for a in ("--set", o)], *more]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "compiled (reduce-overhead)" in proc.stdout + proc.stderr

    run("full", "--set", f"train.out_dir={str(tmp_path / 'full')!r}")
    run("part", "--set", f"train.out_dir={str(tmp_path / 'part')!r}", "--set", "train.stop_after=2")
    run("resumed", "--resume", str(tmp_path / "part"), "--set", f"train.out_dir={str(tmp_path / 'part')!r}")
    full = losses(tmp_path / "full")
    assert len(full) == 4 and losses(tmp_path / "part") == full
