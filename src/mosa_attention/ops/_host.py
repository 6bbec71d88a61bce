"""Integer helpers for the kernels' launchers (grids, tile sizes) on the host.

``triton.cdiv`` and ``triton.next_power_of_2`` are constexpr functions: called from Python each goes
through Triton's argument unwrapping (about 4 us per call, a dozen calls per MoSA step in eager mode).
These plain versions give the same numbers for the positive ints the launchers pass.
"""


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
