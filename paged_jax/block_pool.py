"""Physical KV blocks on the host: a free list and reference counts. No JAX here.

Block 0 is reserved as the padding target (padded slots and block-table entries point at it),
so requests get blocks 1..num_blocks-1.
"""
from __future__ import annotations

import collections
import random


class NoFreeBlocksError(RuntimeError):
    pass


class BlockPool:
    def __init__(self, num_blocks: int, shuffle_seed: int | None = None):
        """shuffle_seed: hand blocks out in a random order (tests use it to scatter tables)."""
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (block 0 is reserved), got {num_blocks}")
        self.num_blocks = num_blocks
        self._ref = [0] * num_blocks
        order = list(range(1, num_blocks))
        if shuffle_seed is not None:
            random.Random(shuffle_seed).shuffle(order)
        self._free = collections.deque(order)

    @property
    def num_usable(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_usable - self.num_free

    def usage(self) -> float:
        return self.num_used / self.num_usable

    def ref_count(self, block_id: int) -> int:
        return self._ref[block_id]

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise NoFreeBlocksError(f"asked for {n} blocks, {len(self._free)} free")
        ids = [self._free.popleft() for _ in range(n)]
        for i in ids:
            self._ref[i] = 1
        return ids

    def share(self, ids: list[int]) -> None:
        """One more owner for blocks already in use (forked sequences, shared prefixes)."""
        for i in ids:  # all checked before any changes, so a bad id changes nothing
            if not 0 < i < self.num_blocks or self._ref[i] < 1:
                raise ValueError(f"block {i} is free and cannot be shared")
        for i in ids:
            self._ref[i] += 1

    def free(self, ids: list[int]) -> None:
        for i, n in collections.Counter(ids).items():  # checked first: all or nothing
            if not 0 < i < self.num_blocks or self._ref[i] < n:
                raise ValueError(f"block {i} is not allocated (or freed more often than held)")
        # Freed in reverse so a request's tail blocks are reused first (its head may be shared).
        for i in reversed(ids):
            self._ref[i] -= 1
            if self._ref[i] == 0:
                self._free.append(i)
