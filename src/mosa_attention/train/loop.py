"""The training loop: data, model, optimizer, checkpoints and metrics, each from its own module, in the
order a reader would do them by hand."""
from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from ..data.batches import check_length, train_batch
from ..data.prepare import prepare
from ..eval.perplexity import autocast, evaluate
from ..layers import mosa as mosa_layer
from ..models import MoSALM
from . import checkpoint as ckpt_io
from . import distributed as D
from .config import GRAPH_COMPILE_MODES, ConfigError, TrainConfig, to_toml
from .optim import build_optimizer, lr_at


def _amp_dtype(name: str, device: torch.device) -> torch.dtype | None:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return torch.bfloat16 if name == "bfloat16" else None


def _default_run_dir(cfg: TrainConfig) -> Path:
    preset = cfg.model.get("preset", "toy")
    attention = cfg.model.get("attention", "mosa")
    return Path("runs") / f"{preset}-{attention}-{time.strftime('%Y%m%d-%H%M%S')}"


def _rows(batch_size: int, world: int, accum: int, rank: int, micro: int) -> slice:
    """Which rows of the global batch this process reads at micro-step ``micro``."""
    mb = batch_size // (world * accum)
    start = (micro * world + rank) * mb
    return slice(start, start + mb)


def _trim_metrics(path: Path, last_step: int, final: bool = False) -> None:
    """Drop metrics past ``last_step`` (written after the checkpoint we resume from); with ``final`` (the run
    is at its last step and will only be validated again) also the validation at ``last_step``. Rewritten
    through a temporary file, so a crash leaves the old file or the new one."""
    if not path.is_file():
        return

    def keep(row: dict) -> bool:
        step = row.get("step", 0)
        return step < last_step or (step == last_step and not (final and row.get("split") == "val"))
    kept = [ln for ln in path.read_text().splitlines() if ln.strip() and keep(json.loads(ln))]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(ln + "\n" for ln in kept))
    os.replace(tmp, path)


def _step_of(checkpoint: Path) -> int:
    """The step of a ``checkpoints/step-NNNNNN`` folder."""
    return int(checkpoint.name.rsplit("-", 1)[-1])


def train(cfg: TrainConfig, resume: str | None = None, log=print) -> dict:
    """Train as ``cfg`` says; returns the final validation metrics. ``resume``: a run or checkpoint folder."""
    t = cfg.train
    info = D.init(t.device)
    say = log if info.is_main else (lambda *a, **k: None)
    was = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    hybrid_op = mosa_layer.HYBRID_OP  # (_train may change it for this run)
    try:
        with _inductor_deterministic(t.deterministic):
            if t.deterministic:
                _deterministic(info.device)
            return _train(cfg, resume, info, say)
    finally:
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])
        mosa_layer.HYBRID_OP = hybrid_op
        D.shutdown()


def _inductor_deterministic(on: bool):
    """For the run, where ``on``: inductor's deterministic mode, which picks its kernels' configurations by rule
    instead of by timing them on the device, so that a compiled run resumed in another process (or run again
    after inductor's cache is cleared) takes the same reduction orders. A no-op where torch lacks the switch."""
    if not on:
        return contextlib.nullcontext()
    from torch._inductor import config as inductor_config

    if not hasattr(inductor_config, "deterministic"):
        return contextlib.nullcontext()
    return inductor_config.patch(deterministic=True)


def _deterministic(device: torch.device) -> None:
    """``train.deterministic``: every op of a step in a fixed order, so that a run repeats bit for bit. The MoSA
    kernels then add by ordered segment sums. torch promises SDPA's deterministic attention backward (cuDNN,
    FlashAttention) only in the strict mode, where an op that has no deterministic version raises (with
    ``warn_only`` it warns that it stays non-deterministic, though on an H200 such runs still repeated:
    benchmarks/NOTES.md v20), and cuBLAS a fixed workspace (``CUBLAS_WORKSPACE_CONFIG``, read when cuBLAS
    starts: set here unless the environment sets it)."""
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)


def _train(cfg: TrainConfig, resume, info: D.DistInfo, say) -> dict:
    t = cfg.train
    if t.batch_size % (info.world_size * t.grad_accum):
        raise ConfigError(f"train.batch_size={t.batch_size} must be divisible by processes x grad_accum "
                          f"= {info.world_size} x {t.grad_accum}")
    device, amp = info.device, _amp_dtype(t.dtype, info.device)
    compile_mode, why = resolve_compile(t, device)
    if why:
        say(why)
    kind = _sharing(t.distributed, compile_mode, info, say)
    if resume:
        ckpt_io.resolve(resume)  # a missing checkpoint is an error now, not after the data is prepared

    # data: the first process of each node prepares (or finds) it, the others then open the same folder
    if info.local_rank == 0:
        data = prepare(cfg.data, log=say)
    D.barrier(info)
    if info.local_rank != 0:
        data = prepare(cfg.data, log=lambda *a: None)
    tokenizer = data.tokenizer
    train_tokens, val_tokens = data.tokens("train"), data.tokens("val")

    model_cfg = cfg.model_config(tokenizer.vocab_size)
    T = model_cfg.seq_len
    check_length(train_tokens, T, "the training split")
    check_length(val_tokens, T, "the validation split")  # now, not after the training

    if resume:  # a resumed run goes on in its own folder
        run_dir = Path(resume)
        if (run_dir / "state.json").is_file():  # a checkpoint folder: the run is two levels up
            run_dir = run_dir.parent.parent
    else:
        run_dir = Path(t.out_dir or _default_run_dir(cfg))
    run_dir = Path(D.broadcast_object(str(run_dir), info))
    if not resume and ckpt_io.list_checkpoints(run_dir):
        raise ConfigError(f"{run_dir} already holds checkpoints of another run; continue it with "
                          f"--resume {run_dir}, or train into another --out")

    torch.manual_seed(t.seed)  # the same initial weights on every process
    model = MoSALM(model_cfg).to(device)
    reduce_dtype = getattr(torch, t.grad_reduce_dtype)
    if info.enabled and reduce_dtype != torch.float32:
        say(f"train.grad_reduce_dtype={t.grad_reduce_dtype!r}: float32 gradients averaged in {t.grad_reduce_dtype}")
    wrapped = D.wrap(model, info, kind, reduce_dtype)
    optimizer = build_optimizer(wrapped, t)

    torch.manual_seed(t.seed * 1000 + info.rank)  # dropout streams differ per process
    start = _resume(resume, model_cfg, cfg, wrapped, optimizer, tokenizer, info, say) if resume else 0
    if start > t.steps:
        raise ConfigError(f"the checkpoint is at step {start}, past train.steps={t.steps}; raise --steps to go on")
    later = [p.name for p in ckpt_io.list_checkpoints(run_dir) if _step_of(p) > start] if resume else []
    if later:
        say(f"warning: resuming from step {start} while {run_dir} holds later checkpoints ({', '.join(later)}): "
            f"they are replaced as training passes their steps, and metrics.jsonl is cut back to step {start}")
    graphs = compile_mode in GRAPH_COMPILE_MODES and device.type == "cuda"
    if compile_mode and not graphs and mosa_layer.HYBRID_OP is None:
        # a hybrid's heads as one op pay where CUDA graphs replay the step; without them a compiled step is bound by
        # the host, which the op's own launches load more than inductor's code (benchmarks/NOTES.md v30)
        mosa_layer.HYBRID_OP = False
    # static shapes: a training step's shapes are fixed, and dynamo's automatic dynamic shapes would otherwise make a
    # dimension symbolic once the model's forward has seen two sizes of it anywhere in the process (two runs of
    # other lengths in one process, as a sweep or the tests do), a graph inductor failed to build for the routing
    # model on torch 2.11 ("CantSplit"; benchmarks/NOTES.md v31); a new shape recompiles instead
    forward = (torch.compile(wrapped, mode=None if compile_mode is True else compile_mode, dynamic=False)
               if compile_mode else wrapped)

    n_params = model.num_params()
    say("config:\n" + _indent(to_toml({**cfg.to_dict(), "model (resolved)": model_cfg.to_dict()})))
    say(f"model: {n_params / 1e6:.2f}M parameters ({model.num_params(exclude_embeddings=True) / 1e6:.2f}M without "
        f"embeddings), heads per layer {model_cfg.head_counts()}, {model_cfg.forward_flops() / 1e9:.3f} GFLOPs "
        f"forward per sequence; {info.world_size} process(es) on {device}"
        f"{', bf16 autocast' if amp else ''}"
        f"{'' if not compile_mode else ', compiled' if compile_mode is True else f', compiled ({compile_mode})'}")
    say(f"run folder: {run_dir}")

    metrics_path = run_dir / "metrics.jsonl"
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.toml").write_text(to_toml(cfg.to_dict()))
        (run_dir / "model_config.json").write_text(json.dumps(model_cfg.to_dict(), indent=1))
        tokenizer.save(run_dir / "tokenizer.json")
        if resume:
            _trim_metrics(metrics_path, start, final=start >= t.steps)
        else:
            metrics_path.unlink(missing_ok=True)  # a fresh run starts a fresh curve
    metrics = open(metrics_path, "a") if info.is_main else None

    def record(row: dict) -> None:
        if metrics:
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()

    def validate(step: int) -> dict:
        res = evaluate(model, val_tokens, T, batch_size=t.eval_batch_size, max_windows=t.eval_windows or None,
                       device=device, amp_dtype=amp, rank=info.rank, world_size=info.world_size,
                       reduce=lambda x: D.all_sum(x, info))
        record({"step": step, "split": "val", "val_loss": res["loss"], "val_ppl": res["ppl"], "tokens": res["tokens"]})
        return res

    def save(step: int) -> Path | None:
        path = _save(run_dir, step, cfg, model_cfg, wrapped, optimizer, tokenizer, info)
        if path:
            say(f"checkpoint: {path}")
        return path

    tokens_per_step = t.batch_size * T
    end = t.steps if t.stop_after is None else min(t.steps, start + t.stop_after)
    bar = _progress(t.steps, start, info.is_main)
    wrapped.train()
    t0, last_t, last_step = time.time(), time.time(), start
    completed = start  # optimizer steps taken so far
    pending = []  # (step, loss, gradient norm) on the device, of the steps not read back yet
    pin = device.type == "cuda"
    try:
        for step in range(start, end):
            lr = lr_at(step, t)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=device)
            for micro in range(t.grad_accum):
                x, y = train_batch(train_tokens, T, t.batch_size, t.seed, step,
                                   _rows(t.batch_size, info.world_size, t.grad_accum, info.rank, micro))
                if pin:  # a copy from pinned memory does not wait for the GPU's queue (a pageable one does)
                    x, y = x.pin_memory(), y.pin_memory()
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with D.no_sync(wrapped, micro < t.grad_accum - 1):
                    if graphs:  # the last step's graph outputs may be overwritten from here on
                        torch.compiler.cudagraph_mark_step_begin()
                    try:
                        with autocast(device, amp):
                            _, loss = forward(x, y, return_logits=False)
                        (loss / t.grad_accum).backward()
                    except Exception as err:
                        if step < start + 3 and t.compile == "auto" and compile_mode:  # compiling, recording
                            raise RuntimeError(f"step {step + 1} failed under torch.compile (train.compile='auto' "
                                               f"chose {compile_mode!r} on this GPU): {type(err).__name__}: {err}; "
                                               f"if compiling is the cause, --compile false trains eagerly") from err
                        raise
                if graphs and micro == 0 and t.grad_accum > 1:
                    _own_grads(wrapped)
                loss_sum += loss.detach()
            if kind == "allreduce":
                D.all_reduce_grads(wrapped, info, check=step == start, reduce_dtype=reduce_dtype)
            norm = _clip(wrapped, t.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            completed = step + 1
            pending.append((step + 1, D.all_mean(loss_sum / t.grad_accum, info), norm))
            done = step + 1
            bar.update(1)
            logged = done % t.log_every == 0 or done == end
            evaluated = bool(t.eval_every) and done % t.eval_every == 0 and done < t.steps
            saved = bool(t.save_every) and done % t.save_every == 0 and done < end
            if not (logged or evaluated or saved):
                continue  # the GPU runs on while the host prepares the next steps
            loss_val, grad_norm = _read_back(pending)
            now = time.time()
            tps = tokens_per_step * (done - last_step) / max(now - last_t, 1e-9)
            bar.set_postfix(loss=f"{loss_val:.3f}", tok_s=f"{tps:,.0f}", refresh=False)
            if logged:
                record({"step": done, "loss": loss_val, "lr": lr, "grad_norm": grad_norm,
                        "tokens": done * tokens_per_step, "tokens_per_s": tps, "elapsed_s": now - t0})
                last_t, last_step = now, done
            if evaluated:
                res = validate(done)
                if info.is_main:
                    bar.write(f"step {done}: val loss {res['loss']:.4f}, ppl {res['ppl']:.2f}")
            if saved:
                save(done)
    except KeyboardInterrupt:
        bar.close()
        say(f"\ninterrupted after step {completed}; saving a checkpoint to resume from")
        if completed > start:
            save(completed)
        say(f"resume with: mosa train --resume {run_dir}")
        if metrics:
            metrics.close()
        raise
    bar.close()
    done = end
    ckpt_path = save(done) if done > start else ckpt_io.resolve(run_dir)
    if done < t.steps:
        say(f"stopped after step {done} of {t.steps} (train.stop_after); resume with: mosa train --resume {run_dir}")
        if metrics:
            metrics.close()
        return {"step": done, "run_dir": str(run_dir), "checkpoint": str(ckpt_path)}
    res = validate(done)
    if metrics:
        metrics.close()
    elapsed = time.time() - t0
    final = {"step": done, "val_loss": res["loss"], "val_ppl": res["ppl"], "val_tokens": res["tokens"],
             "train_seconds": elapsed}
    if device.type == "cuda":
        final["max_cuda_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    say(f"done: {done} steps in {elapsed:.0f}s; validation loss {res['loss']:.4f}, "
        f"perplexity {res['ppl']:.2f} ({res['tokens']:,} tokens at seq_len {T})")
    if info.is_main:
        _plot(run_dir, say)
        (run_dir / "final.json").write_text(json.dumps(final, indent=1))
    return {"step": done, "val_loss": res["loss"], "val_ppl": res["ppl"], "run_dir": str(run_dir),
            "checkpoint": str(ckpt_path)}


def _indent(text: str) -> str:
    return "".join("  " + ln + "\n" for ln in text.strip().splitlines())


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm  # noqa: PLC0415

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True,
                file=sys.stderr, mininterval=0.5)


def resolve_compile(t, device: torch.device) -> tuple[bool | str, str | None]:
    """``train.compile`` as this run takes it, and a line for the log where "auto" chose on a GPU. "auto" is
    "reduce-overhead" (CUDA graphs) on a GPU, where an eager step is bound by the host (docs/training.md), except
    with FSDP (which cannot run inside graphs) or no triton (which torch.compile needs on a GPU); otherwise eager
    (False). Deterministic runs take the graphs too: they repeat and resume bit for bit there (benchmarks/NOTES.md
    v27.0)."""
    if t.compile != "auto":
        return t.compile, None
    if device.type != "cuda":
        return False, None
    why = ("train.distributed='fsdp'" if t.distributed == "fsdp"
           else "triton is not installed" if importlib.util.find_spec("triton") is None else None)
    if why:
        return False, f"train.compile='auto': eager ({why})"
    return "reduce-overhead", ("train.compile='auto': reduce-overhead, each step replayed as CUDA graphs (the first "
                               "steps compile and record; --compile false trains eagerly)")


def _own_grads(model) -> None:
    """After a step's first micro-batch under CUDA graphs: each ``.grad`` that autograd took from the backward
    graph's outputs lives in the graphs' memory pool, where the next micro-batch's replay writes again
    (pytorch/pytorch#169545: the accumulated gradient then comes out wrong, or torch stops). A clone in memory
    the trainer owns takes its place, and later micro-batches add into it."""
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.grad = p.grad.clone()


def _sharing(distributed: str, compile_mode, info, say) -> str:
    """How the processes share gradients (``train.distributed``). The CUDA-graph modes of ``train.compile`` replay
    the forward and backward as graphs, which hold no collective and no hook of DDP's: under torchrun they
    average the gradients after the backward instead ("allreduce", chosen over the default "ddp"); FSDP, which
    gathers each block's weights inside the forward, cannot run that way."""
    if not (compile_mode in GRAPH_COMPILE_MODES and info.world_size > 1) or distributed == "allreduce":
        return distributed
    if distributed == "fsdp":
        raise ConfigError(f"train.compile={compile_mode!r} (CUDA graphs) cannot run with train.distributed='fsdp' "
                          f"(FSDP gathers weights inside the graphs); use train.distributed='allreduce' or 'ddp', "
                          f"or train.compile=true")
    say(f"train.compile={compile_mode!r} under torchrun: the gradients are averaged after each step's backward "
        f"(train.distributed='allreduce') instead of by DDP's hooks inside it")
    return "allreduce"


def _clip(model, max_norm: float) -> torch.Tensor:
    """Clip the gradients' total norm to ``max_norm`` (0: no clipping); the norm before clipping, on the device."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
        norm = norm.full_tensor()
    return norm


def _read_back(pending: list) -> tuple[float, float]:
    """(loss, gradient norm) of the last of ``pending``'s steps, read from the device in one transfer (the only
    point where the loop waits for the GPU); a FloatingPointError names the first step whose loss is not
    finite. Empties ``pending``."""
    steps = [s for s, _, _ in pending]
    vals = torch.stack([torch.stack([lo.float(), n.float()]) for _, lo, n in pending]).cpu().tolist()
    pending.clear()
    for step, (loss, _) in zip(steps, vals):
        if not math.isfinite(loss):
            raise FloatingPointError(f"the loss is {loss} at step {step}; lower train.lr or check the data")
    return vals[-1][0], vals[-1][1]


def _state_dicts(model, optimizer):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict  # noqa: PLC0415

    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _save(run_dir, step, cfg, model_cfg, model, optimizer, tokenizer, info) -> Path | None:
    msd, osd = _state_dicts(model, optimizer)  # collective under FSDP: every process calls it
    rng = D.all_gather_object(ckpt_io.rng_state(), info)
    path = None
    if info.is_main:
        state = {"model_config": model_cfg.to_dict(), "train_config": cfg.to_dict(), "world_size": info.world_size,
                 "rng": rng, "data": {"seed": cfg.train.seed, "next_step": step, "source": cfg.data.source}}
        path = ckpt_io.save(run_dir, step, msd, osd, state, tokenizer.to_str(), keep_last=cfg.train.keep_last)
    D.barrier(info)
    return path


def _resume(where, model_cfg, cfg, model, optimizer, tokenizer, info, say) -> int:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict  # noqa: PLC0415

    ck = ckpt_io.load(where)
    diff = ckpt_io.config_diff(ck.state["model_config"], model_cfg.to_dict())
    if diff:
        raise ckpt_io.CheckpointError(f"checkpoint {ck.path} is of another model: " + "; ".join(diff))
    if ck.tokenizer_json != tokenizer.to_str():
        raise ckpt_io.CheckpointError(f"checkpoint {ck.path} was trained with another tokenizer than the data "
                                      f"source {cfg.data.source!r} gives; resume with the run's own data settings")
    if ck.optimizer_state is None:
        raise ckpt_io.CheckpointError(f"checkpoint {ck.path} has no optimizer state to resume from")
    expected = {k: v.shape for k, v in _unwrap(model).state_dict().items()}
    ckpt_io.check_fits(ck.model_state, expected, ck.path)
    saved_train = ck.state["train_config"]["train"]
    changed = [k for k in ("batch_size", "lr", "min_lr", "warmup_steps", "optimizer", "seed", "grad_clip")
               if saved_train.get(k) != getattr(cfg.train, k)]
    if changed:
        say(f"warning: resuming with changed train settings {changed}; the curve will differ from the original run's")
    try:
        set_state_dict(model, optimizer, model_state_dict=ck.model_state, optim_state_dict=ck.optimizer_state,
                       options=StateDictOptions(full_state_dict=True))
    except (KeyError, RuntimeError, ValueError) as e:
        raise ckpt_io.CheckpointError(f"checkpoint {ck.path} does not fit this model or optimizer: {e}") from e
    rng = ck.state.get("rng") or []
    if rng and len(rng) == info.world_size:
        ckpt_io.set_rng_state(rng[info.rank])
    say(f"resumed from {ck.path} at step {ck.step}")
    return ck.step


def _unwrap(model):
    return getattr(model, "module", model)


def _plot(run_dir: Path, say) -> None:
    from ..plots.curves import plot_runs  # noqa: PLC0415

    try:
        out = plot_runs([run_dir], run_dir / "loss.png")
        say(f"loss curve: {out}")
    except Exception as e:  # a missing plot must not fail a finished run
        say(f"warning: could not draw the loss curve: {e}")

