"""Host-side helpers of the kernels' launchers: grid and tile arithmetic, whether Triton interprets, and
the side CUDA streams that independent work forks onto.

``triton.cdiv`` and ``triton.next_power_of_2`` are constexpr functions: called from Python each goes
through Triton's argument unwrapping (about 4 us per call, a dozen calls per MoSA step in eager mode).
These plain versions give the same numbers for the positive ints the launchers pass.
"""
import os
import threading

_STREAMS: dict = {}


def side_stream(device, key: str = "side"):
    """The CUDA stream named ``key`` on ``device`` (made once)."""
    import torch
    if (device, key) not in _STREAMS:
        _STREAMS[device, key] = torch.cuda.Stream(device)
    return _STREAMS[device, key]


def interpreting() -> bool:
    """Whether Triton's interpreter runs the kernels (``TRITON_INTERPRET=1``: on CPU tensors, in CI)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def outside_graph_pools(make, device):
    """``make()``, for a module-level cache of device tensors, run where no CUDA graph's memory pool takes its
    allocations. While torch.compile's CUDA graphs (``mode="reduce-overhead"``) warm a step up, every
    allocation of the calling thread goes to their pool, and they refuse to go on with tensors alive in it that
    are not the step's outputs (a cache entry made there would be one); made in a thread of its own, the entry
    comes from the ordinary pool (that thread waits for its kernels before handing it over). Under a stream
    capture (``torch.cuda.graph``, cudaMalloc forbidden) the entry is made in place, in the capture's pool.
    Elsewhere (CPU) ``make()`` as it is."""
    import torch
    if getattr(device, "type", str(device)) != "cuda" or torch.cuda.is_current_stream_capturing():
        return make()

    def job():
        with torch.cuda.device(device):
            value = make()
            torch.cuda.current_stream().synchronize()
        return value
    return in_own_thread(job)


def in_own_thread(fn):
    """``fn()`` run in a new thread, waited for: its result, or its exception raised in the caller's thread."""
    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as err:  # noqa: BLE001 (handed to the caller's thread)
            box["error"] = err

    worker = threading.Thread(target=run, name="mosa-own-thread")
    worker.start()
    worker.join()
    if "error" in box:
        raise box["error"]
    return box["value"]
