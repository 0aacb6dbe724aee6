"""The paper's Orca baselines, kept apart from the engine: up-front KV reservations in
contiguous buddy-allocated ranges, and a KV manager without a prefix cache.

Three reservation policies (paper §6, Fig. 2), each a callable req -> tokens to hold at
admission that the Scheduler accepts as `reservation=`. The true output length is read from
`req.max_total_tokens`, which an experiment sets to prompt + true output:

  orca_max(max_model_len)     every request reserves max_model_len slots
  orca_pow2(max_model_len)    prompt + the next power of two of the true output
  orca_oracle()               exactly prompt + true output

Orca keeps each request's KV in one contiguous range; like the paper we place those ranges
with a buddy allocator (BuddyAllocator) over a token-slot space, and ContiguousKV puts it
behind the calls the Scheduler makes (allocate, free, and no prefix cache). No JAX here.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from paged_jax.intmath import next_pow2
from paged_jax.prefix_cache import PrefixHit
from paged_jax.request import Request

Reservation = Callable[[Request], int]


def _true_output_len(req: Request) -> int:
    return req.max_total_tokens - len(req.prompt_token_ids)


def orca_max(max_model_len: int) -> Reservation:
    """Orca (Max): reserve the longest sequence the model allows."""
    return lambda req: max_model_len


def orca_pow2(max_model_len: int | None = None) -> Reservation:
    """Orca (Pow2): over-reserve the output by at most 2x (true output 25 -> 32 slots), as the
    paper defines it; capped at max_model_len, which no sequence can pass anyway."""
    def reserve(req: Request) -> int:
        n = len(req.prompt_token_ids) + next_pow2(_true_output_len(req))
        return min(n, max_model_len) if max_model_len else n
    return reserve


def orca_oracle() -> Reservation:
    """Orca (Oracle): knows the true output length and reserves exactly prompt + output."""
    return lambda req: req.max_total_tokens


class BuddyAllocator:
    """Power-of-two ranges over slots [0, num_slots), each aligned to its size.

    The space is first cut into the largest aligned power-of-two chunks of at most max_block
    slots; what a request asks for is rounded up to a power of two (at least min_block), taken
    from the smallest free block that holds it (lowest address first), which is halved until it
    fits. A freed block merges with its buddy (start ^ size) while both are free.
    """

    def __init__(self, num_slots: int, max_block: int | None = None, min_block: int = 1):
        max_block = max_block or next_pow2(num_slots)
        if num_slots < 1 or min_block < 1:
            raise ValueError(f"need num_slots, min_block >= 1, got {num_slots}, {min_block}")
        if max_block != next_pow2(max_block) or min_block != next_pow2(min_block):
            raise ValueError(f"block sizes must be powers of two, got {max_block}, {min_block}")
        self.num_slots, self.max_block, self.min_block = num_slots, max_block, min_block
        self._free: dict[int, set[int]] = {}  # block size -> starts of free blocks of that size
        self._allocated: dict[int, int] = {}  # start -> block size
        self._requested: dict[int, int] = {}  # start -> slots asked for
        start = 0
        while start < num_slots:
            size = max_block
            while size > min_block and (start % size or start + size > num_slots):
                size //= 2
            if start + size > num_slots:
                break  # a tail shorter than min_block can never be handed out
            self._free.setdefault(size, set()).add(start)
            start += size
        self.capacity = start  # slots that can ever be allocated

    # ---- accounting ---------------------------------------------------------------------

    @property
    def allocated_slots(self) -> int:
        """Slots inside allocated blocks (what requests asked for, rounded up)."""
        return sum(self._allocated.values())

    @property
    def requested_slots(self) -> int:
        return sum(self._requested.values())

    @property
    def num_free(self) -> int:
        return sum(size * len(starts) for size, starts in self._free.items())

    @property
    def largest_free(self) -> int:
        return max((size for size, starts in self._free.items() if starts), default=0)

    def block_size_for(self, n: int) -> int:
        return max(self.min_block, next_pow2(n))

    def can_allocate(self, n: int) -> bool:
        return self.block_size_for(n) <= self.largest_free

    def allocations(self) -> dict[int, tuple[int, int]]:
        """start -> (block size, slots asked for)."""
        return {s: (size, self._requested[s]) for s, size in self._allocated.items()}

    def free_blocks(self) -> list[tuple[int, int]]:
        """(start, size) of every free block, by address."""
        return sorted((s, size) for size, starts in self._free.items() for s in starts)

    # ---- allocate / free ----------------------------------------------------------------

    def allocate(self, n: int) -> int | None:
        """Start of a block of at least n slots, or None if no free block is big enough."""
        if n < 1:
            raise ValueError(f"asked for {n} slots")
        want = self.block_size_for(n)
        if want > self.max_block:
            raise ValueError(f"{n} slots exceed the largest block, {self.max_block}")
        size = min((s for s, starts in self._free.items() if starts and s >= want), default=0)
        if not size:
            return None
        start = min(self._free[size])
        self._free[size].remove(start)
        while size > want:  # halve, keeping the low half and freeing the high one
            size //= 2
            self._free.setdefault(size, set()).add(start + size)
        self._allocated[start] = size
        self._requested[start] = n
        return start

    def free(self, start: int) -> None:
        if start not in self._allocated:
            raise ValueError(f"no block allocated at slot {start}")
        size = self._allocated.pop(start)
        del self._requested[start]
        while size < self.max_block and (start ^ size) in self._free.get(size, ()):
            self._free[size].remove(start ^ size)
            start, size = min(start, start ^ size), size * 2
        self._free.setdefault(size, set()).add(start)


@dataclasses.dataclass
class Range:
    start: int
    size: int  # the buddy block's slots
    reserved: int  # slots the request asked for (its reservation)


class NoPrefixCache:
    """The prefix-cache and sliding-window half of the Scheduler's KV interface, for KV
    managers without them (the Orca baselines): nothing is ever found, registered, counted
    or released early (a reservation is held whole until its request ends)."""

    block_size = 0
    sliding_window = None

    def find_cached(self, token_ids, known=None) -> PrefixHit:
        return PrefixHit()

    def new_full_blocks(self, request_id: str, num_tokens: int) -> bool:
        return False

    def cache_blocks(self, request_id: str, token_ids) -> None:
        pass

    def record_admission(self, num_prompt_tokens: int, hit: PrefixHit) -> None:
        pass

    def release_outside_window(self, request_id: str, num_computed: int) -> int:
        return 0


class ContiguousKV(NoPrefixCache):
    """Orca-style KV placement behind the Scheduler's allocate/free: one contiguous buddy range
    per request, reserved at admission. A request can grow only inside its own block; past it,
    allocate returns False and the Scheduler preempts, as it does when paged blocks run out."""

    def __init__(self, num_slots: int, max_block: int, min_block: int = 1):
        self.buddy = BuddyAllocator(num_slots, max_block, min_block)
        self.ranges: dict[str, Range] = {}

    def holds(self, request_id: str, num_tokens: int) -> bool:
        """Whether allocate(request_id, num_tokens) would change nothing."""
        r = self.ranges.get(request_id)
        return r is not None and num_tokens <= r.reserved

    def allocate(self, request_id: str, num_tokens: int, hit: PrefixHit | None = None) -> bool:
        r = self.ranges.get(request_id)
        if r is not None:
            if num_tokens > r.size:
                return False
            r.reserved = max(r.reserved, num_tokens)
            return True
        if self.buddy.block_size_for(num_tokens) > self.buddy.max_block:
            return False
        start = self.buddy.allocate(num_tokens)
        if start is None:
            return False
        self.ranges[request_id] = Range(start, self.buddy.block_size_for(num_tokens), num_tokens)
        return True

    def can_admit(self, num_tokens: int) -> bool:
        return self.buddy.can_allocate(num_tokens)

    def free(self, request_id: str) -> None:
        r = self.ranges.pop(request_id, None)
        if r is not None:
            self.buddy.free(r.start)
