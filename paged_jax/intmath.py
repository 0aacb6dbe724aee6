"""Integer helpers the host bookkeeping and the step shapes share (no JAX here)."""
from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """a / b rounded up: the blocks that hold a tokens, the tiles that cover a rows."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, n - 1).bit_length()
