"""Time one attention layer's training step (forward + backward) or forward pass, and its peak memory.

A step starts from empty gradients (as after ``zero_grad(set_to_none=True)``). On CUDA the time is the
median of CUDA-event timings, eagerly and (``graphs=True``) replayed as one captured CUDA graph, which
removes the host's launch overhead; elsewhere it is the median host time of the step.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch


@dataclass
class Timing:
    eager_ms: float
    graph_ms: float | None  # None: not on CUDA, not asked for, or the step cannot be captured
    peak_mib: float | None  # memory the step allocates beyond its inputs and parameters (CUDA only)
    graph_error: str | None = None

    def best_ms(self) -> float:
        return min(t for t in (self.eager_ms, self.graph_ms) if t is not None)

    def to_dict(self) -> dict:
        return asdict(self)


def make_step(layer: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor | None):
    """One step: forward, and with ``dy`` backward into fresh .grad tensors."""
    leaves = list(layer.parameters()) + [x]

    def step():
        if dy is None:
            with torch.no_grad():
                return layer(x)
        for p in leaves:
            p.grad = None
        y = layer(x)
        y.backward(dy)
        return y
    return step


def median_ms(fn, iters: int, cuda: bool, max_s: float | None = None) -> float:
    """Median milliseconds of ``fn()`` over ``iters`` calls: CUDA-event times on CUDA, host times elsewhere.
    ``max_s``: stop early once that much wall time has passed and five calls are timed."""
    times, t_start = [], time.perf_counter()
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        if max_s is not None and len(times) >= 5 and time.perf_counter() - t_start > max_s:
            break
    return statistics.median(times)


def alternating_rounds(fns: dict, rounds: int, iters: int, cuda: bool, base: str | None = None,
                       label: str = "") -> dict:
    """Time several functions against each other: each of ``rounds`` rounds takes the median milliseconds of
    ``iters`` calls of every function in turn (``median_ms``), so that all of them see the same drift of the
    machine. Returns {name: {"ms": median over the rounds, "rounds": [...], "ratio": ms / base's ms, or None
    without ``base``}}; prints each round, prefixed with ``label``."""
    if base is not None and base not in fns:
        raise ValueError(f"base must name one of the functions {list(fns)}, got base={base!r}")
    times = {name: [] for name in fns}
    for r in range(rounds):
        for name, fn in fns.items():
            times[name].append(median_ms(fn, iters, cuda))
        print(f"{label}round {r}: " + ", ".join(f"{n} {t[-1]:.4f}" for n, t in times.items()), flush=True)
    base_ms = statistics.median(times[base]) if base is not None else None
    return {n: {"ms": statistics.median(t), "rounds": t, "ratio": statistics.median(t) / base_ms if base_ms else None}
            for n, t in times.items()}


def capture_graph(step):
    """(replay, None) for a CUDA graph of ``step``, or (None, why) when the step cannot be captured."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            step()
    except Exception as err:  # noqa: BLE001 (a layer that reads values back to the host cannot be captured)
        return None, f"{type(err).__name__}: {str(err)[:160]}"
    return graph.replay, None


def time_layer(layer: torch.nn.Module, x: torch.Tensor, backward: bool = True, *, autocast_dtype=None,
               iters: int = 20, warmup: int = 3, graphs: bool = True) -> Timing:
    """Time ``layer(x)`` (+ backward of a random dy with ``backward``). ``autocast_dtype``: run under autocast."""
    cuda = x.is_cuda
    x = x.detach().requires_grad_(backward)
    dy = torch.randn(x.shape, device=x.device, dtype=autocast_dtype or x.dtype) if backward else None
    enabled = autocast_dtype is not None
    with torch.autocast(x.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=enabled, cache_enabled=False):
        step = make_step(layer, x, dy)
        for _ in range(warmup):
            step()
        peak = None
        if cuda:
            torch.cuda.synchronize()
            for p in list(layer.parameters()) + [x]:
                p.grad = None
            torch.cuda.reset_peak_memory_stats(x.device)
            base = torch.cuda.memory_allocated(x.device)
            step()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated(x.device) - base) / 2 ** 20
        eager = median_ms(step, iters, cuda)
        graph_ms, why = None, None
        if cuda and graphs:
            replay, why = capture_graph(step)
            if replay is not None:
                graph_ms = median_ms(replay, iters, cuda)
    for p in list(layer.parameters()) + [x]:
        p.grad = None
    return Timing(eager, graph_ms, peak, why)
