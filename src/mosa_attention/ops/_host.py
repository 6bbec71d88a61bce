"""Host-side helpers of the kernels' launchers: grid and tile arithmetic, whether Triton interprets, and
the side CUDA streams that independent work forks onto.

``triton.cdiv`` and ``triton.next_power_of_2`` are constexpr functions: called from Python each goes
through Triton's argument unwrapping (about 4 us per call, a dozen calls per MoSA step in eager mode).
These plain versions give the same numbers for the positive ints the launchers pass.
"""
import os

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
