"""Multi-process training through PyTorch's own stack: torchrun sets RANK/WORLD_SIZE/LOCAL_RANK, we join
the process group (NCCL on GPUs, gloo on CPUs) and wrap the model with DDP or FSDP2 (``fully_shard``), or
leave it unwrapped and average its gradients once per step (``"allreduce"``: no hooks inside the backward, so
that a step can be replayed as CUDA graphs). The model itself knows nothing of this."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """``name`` ("auto": CUDA where torch sees it, else the CPU) as a torch.device; a ValueError naming it
    for a string torch does not parse or a CUDA device torch does not see."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got device={name!r}") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} was asked for but torch sees no CUDA device")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        count = torch.cuda.device_count()
        if device.index >= count:
            why = (f"local rank {local_rank} takes cuda:{local_rank}" if name in ("auto", "cuda")
                   else f"device {name!r} was asked for")
            raise ValueError(f"{why}, but torch sees {count} CUDA device(s): start at most {count} process(es) "
                             f"per machine (torchrun --nproc-per-node {count}) or train on the CPU (train.device=cpu)")
    return device


def init(device_name: str = "auto") -> DistInfo:
    """Join the process group when started by torchrun with more than one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name, local)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world, local, device)


def shutdown() -> None:
    """Leave the process group, all processes together: one that tore its connections down while another still
    held them made gloo's threads abort the other at exit now and then ("terminate called without an active
    exception", in 2 of ~35 two-process CPU runs here)."""
    if dist.is_initialized():
        with contextlib.suppress(RuntimeError):  # a group already broken by another process's failure
            dist.barrier()
        dist.destroy_process_group()


def wrap(model: nn.Module, info: DistInfo, kind: str, reduce_dtype: torch.dtype = torch.float32) -> nn.Module:
    """DDP; FSDP2 with each transformer block sharded, then the root; or, for ``"allreduce"``, the model itself
    with rank 0's parameters and buffers copied to every process (as DDP does when it wraps a model), whose
    gradients the loop then averages with ``all_reduce_grads``. ``reduce_dtype`` bfloat16: DDP's buckets of
    float32 gradients travel in bf16 (a communication hook, ``_average_in``); for "allreduce" ``all_reduce_grads``
    takes it."""
    if not info.enabled:
        return model
    if kind == "allreduce":
        with torch.no_grad():
            for t in [*model.parameters(), *model.buffers()]:
                dist.broadcast(t.data, src=0)
        return model
    if kind == "ddp":
        ids = [info.device.index] if info.device.type == "cuda" else None
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        if reduce_dtype != torch.float32:  # (torch's own bf16 hook needs NCCL; this one runs on gloo too)
            ddp.register_comm_hook(reduce_dtype, _average_in)
        return ddp
    try:
        from torch.distributed.fsdp import fully_shard  # torch >= 2.6
    except ImportError:  # pragma: no cover
        from torch.distributed._composable.fsdp import fully_shard  # torch 2.4-2.5
    # the mesh of the training device's type: left to itself, FSDP builds one on CUDA wherever torch sees a GPU
    # and sets each rank's device to cuda:<local rank>, also for a run on the CPU
    from torch.distributed.device_mesh import init_device_mesh  # noqa: PLC0415
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _average_in(dtype: torch.dtype, bucket):
    """DDP communication hook: average a bucket of float32 gradients over the processes in ``dtype`` (each
    process's share divided by the world size in float32, then cast, summed and cast back); a bucket of
    another dtype travels in its own, as in ``all_reduce_grads``."""
    grads = bucket.buffer()
    sent = grads.div(dist.get_world_size())
    if grads.dtype == torch.float32:
        sent = sent.to(dtype)
    work = dist.all_reduce(sent, async_op=True).get_future()

    def back(fut):
        return grads.copy_(fut.value()[0])

    return work.then(back)


def no_sync(model: nn.Module, skip: bool):
    """Skip DDP's gradient all-reduce on micro-batches before the last one of a step."""
    if skip and isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    if skip and hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        return _restore_sync(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _restore_sync(model):
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def all_reduce_grads(model: nn.Module, info: DistInfo, check: bool = False,
                     reduce_dtype: torch.dtype = torch.float32) -> None:
    """Average the gradients of ``model``'s parameters over the processes (``train.distributed="allreduce"``),
    after the step's last backward: one collective per gradient dtype over a flat copy of those gradients,
    outside any CUDA graph (the graphs of a compiled step hold no collective). ``reduce_dtype`` bfloat16: the
    float32 gradients' copy is made in bf16 (half the bytes to send; the average is cast back into the float32
    gradients), others travel in their own dtype. Every process must have
    gradients for the same parameters, as the processes of one model do; ``check`` (the loop's first step)
    compares which ones first and raises a RuntimeError naming them where processes differ, instead of
    all-reducing buffers of different sizes."""
    if not info.enabled:
        return
    named = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
    if check:
        mine = [(n, str(p.grad.dtype), p.grad.numel()) for n, p in named]
        every = all_gather_object(mine, info)
        if any(other != mine for other in every):
            differ = sorted({n for other in every for n, *_ in set(other) ^ set(mine)})
            raise RuntimeError(f"the processes have gradients for different parameters ({', '.join(differ[:8])}"
                               f"{', ...' if len(differ) > 8 else ''}); train.distributed='allreduce' needs the same "
                               f"ones on every process")
    groups: dict = {}
    for _, p in named:
        dtype = reduce_dtype if p.grad.dtype == torch.float32 else p.grad.dtype
        groups.setdefault(dtype, []).append(p.grad)
    average = dist.get_backend() == "nccl"  # NCCL averages in the collective; gloo only sums
    with torch.no_grad():
        for dtype, grads in groups.items():
            sizes = [g.numel() for g in grads]
            flat = grads[0].new_empty(sum(sizes), dtype=dtype)
            parts = [part.view_as(g) for g, part in zip(grads, flat.split(sizes))]
            torch._foreach_copy_(parts, grads)  # (one pass, casting where the dtypes differ)
            dist.all_reduce(flat, op=dist.ReduceOp.AVG if average else dist.ReduceOp.SUM)
            if not average:
                flat /= info.world_size
            torch._foreach_copy_(grads, parts)


def all_mean(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x /= info.world_size
    return x


def all_sum(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def broadcast_object(obj, info: DistInfo):
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj, info: DistInfo) -> list:
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
