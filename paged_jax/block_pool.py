"""Physical KV blocks on the host: a free list, reference counts, and the prefix cache's
hash -> block map. No JAX here.

Block 0 is reserved as the padding target (padded slots and block-table entries point at it),
so requests get blocks 1..num_blocks-1.

Prefix caching: a full block whose K/V are (or are being) computed can be registered under
the hash of its tokens and of everything before them (prefix_cache.hash_block). When its last
owner frees it, it keeps its contents and its hash on the free list, and a later request with
the same prefix can take it back (`share`) instead of recomputing it. The free list is in
least-recently-freed order, as vLLM's: allocation takes the front and evicts that block's
hash, so cached blocks go in the order they were last used.
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
        # An ordered set: O(1) pops at the front and removals anywhere (a cache hit on a free
        # block takes it out of the middle).
        self._free: collections.OrderedDict[int, None] = collections.OrderedDict.fromkeys(order)
        self._hash_of: dict[int, bytes] = {}  # block -> hash of its prefix, if registered
        self._block_of: dict[bytes, int] = {}  # the inverse
        self.num_evicted = 0  # cached blocks whose hash allocation dropped
        self.num_extra_refs = 0  # sum over blocks of (owners - 1): how much sharing saves

    @property
    def num_usable(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free(self) -> int:
        """Blocks no request holds, cached ones included (they are evicted on demand)."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_usable - self.num_free

    @property
    def num_cached(self) -> int:
        """Blocks registered in the prefix cache, held or free."""
        return len(self._hash_of)

    def usage(self) -> float:
        return self.num_used / self.num_usable

    def ref_count(self, block_id: int) -> int:
        return self._ref[block_id]

    def ref_counts(self) -> list[int]:
        """Owners of every block (a copy)."""
        return list(self._ref)

    def cached_ids(self) -> set[int]:
        """Blocks registered in the prefix cache, held or free."""
        return set(self._hash_of)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise NoFreeBlocksError(f"asked for {n} blocks, {len(self._free)} free")
        ids = [self._free.popitem(last=False)[0] for _ in range(n)]
        for i in ids:
            self._ref[i] = 1
            h = self._hash_of.pop(i, None)
            if h is not None:  # evicted: its contents are about to be overwritten
                del self._block_of[h]
                self.num_evicted += 1
        return ids

    def share(self, ids: list[int]) -> None:
        """One more owner for blocks in use (forked sequences, shared prefixes), or a first
        one for free blocks that are still cached (a prefix-cache hit)."""
        for i in ids:  # all checked before any changes, so a bad id changes nothing
            if not 0 < i < self.num_blocks or (self._ref[i] < 1 and i not in self._hash_of):
                raise ValueError(f"block {i} is free and cannot be shared")
        for i in ids:
            if self._ref[i] == 0:
                del self._free[i]
            else:
                self.num_extra_refs += 1
            self._ref[i] += 1

    def free(self, ids: list[int]) -> None:
        for i, n in collections.Counter(ids).items():  # checked first: all or nothing
            if not 0 < i < self.num_blocks or self._ref[i] < n:
                raise ValueError(f"block {i} is not allocated (or freed more often than held)")
        # Freed in reverse so a request's tail blocks are reused (or evicted) before its
        # head, which is the part other requests are likeliest to share.
        for i in reversed(ids):
            self._ref[i] -= 1
            if self._ref[i] == 0:
                self._free[i] = None
            else:
                self.num_extra_refs -= 1

    # ---- prefix cache ---------------------------------------------------------------------

    def cached_block(self, block_hash: bytes) -> int | None:
        return self._block_of.get(block_hash)

    def reset_cache(self) -> None:
        """Forget every block's hash: no later request hits the blocks cached so far (their
        owners keep them)."""
        self._hash_of.clear()
        self._block_of.clear()

    def register(self, block_id: int, block_hash: bytes) -> None:
        """Cache a held block under its prefix hash. Nothing changes when the hash already
        names another block, e.g. two requests that computed the same tokens."""
        if self._ref[block_id] < 1:
            raise ValueError(f"block {block_id} is free; only held blocks can be registered")
        if block_hash not in self._block_of and block_id not in self._hash_of:
            self._block_of[block_hash] = block_id
            self._hash_of[block_id] = block_hash
