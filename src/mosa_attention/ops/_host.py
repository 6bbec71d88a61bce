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


class Fork:
    """Work forked from the calling thread's current CUDA stream (``main``) onto a side stream and joined back,
    with host calls kept few (an eager step pays each): ``run(fn)`` makes the side stream wait for the work
    launched on ``main`` so far (unless nothing was launched there since the last ``run``: ``wait=False``) and
    calls ``fn`` with the side stream current; ``join()`` makes ``main`` wait for everything launched on the
    side stream. The two events are made once per device and thread (each thread has its own pair, so that
    another thread's record cannot come between a record and its wait)."""

    def __init__(self, device, key: str):
        import torch
        self.stream = side_stream(device, key)
        self.main = torch.cuda.current_stream(device)
        cache = getattr(_EVENTS, "pairs", None)
        if cache is None:
            cache = _EVENTS.pairs = {}
        if device not in cache:
            cache[device] = (torch.cuda.Event(), torch.cuda.Event())
        self._forked, self._joined = cache[device]

    def run(self, fn, wait: bool = True):
        import torch
        if wait:
            self._forked.record(self.main)
            self.stream.wait_event(self._forked)
        torch.cuda.set_stream(self.stream)
        try:
            return fn()
        finally:
            torch.cuda.set_stream(self.main)

    def join(self):
        self._joined.record(self.stream)
        self.main.wait_event(self._joined)


_EVENTS = threading.local()


def on_its_device(fn):
    """``fn(t, ...)`` run with its first argument's CUDA device current. Triton launches a kernel on the
    current device's current stream, not on its tensors' device: a layer moved to ``cuda:1`` while ``cuda:0``
    is current would run its kernels on the wrong GPU, unordered with the work that made their inputs. The
    device is switched only where it differs (one ``current_device()`` call otherwise), and not inside a
    ``torch.compile`` trace (compiled code sets its device itself)."""
    import functools

    @functools.wraps(fn)
    def wrapped(t, *args, **kwargs):
        import torch
        dev = t.device
        if dev.type == "cuda" and not torch.compiler.is_compiling() and dev.index != torch.cuda.current_device():
            with torch.cuda.device(dev):
                return fn(t, *args, **kwargs)
        return fn(t, *args, **kwargs)
    return wrapped


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
