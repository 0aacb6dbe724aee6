"""Per-request block tables over the block pool, grown on demand; prefix-cache lookups and
registration; swapping tables out to a pool of host (CPU) blocks and back; blocks that fell out
of a sliding window given back; KV usage accounting.

A table entry of 0 (the reserved padding block) after `release_outside_window` is a logical
block whose K/V no later query reads: every layer's window has moved past it. Readers still
see its slot in the table (positions stay where they are) and the window masks it out."""
from __future__ import annotations

import dataclasses

from paged_jax.block_pool import BlockPool
from paged_jax.intmath import cdiv
from paged_jax.prefix_cache import PrefixHit, block_hashes


@dataclasses.dataclass(frozen=True)
class KVUsage:
    used_blocks: int
    total_blocks: int
    token_slots: int  # used_blocks * block_size
    token_states: int  # tokens whose K/V are held

    @property
    def usage(self) -> float:
        return self.used_blocks / self.total_blocks

    @property
    def token_state_share(self) -> float:
        """Share of allocated slots holding a token's K/V (the paper's 'token states')."""
        return self.token_states / self.token_slots if self.token_slots else 1.0

    @property
    def internal_fragmentation(self) -> float:
        return 1.0 - self.token_state_share


@dataclasses.dataclass
class PrefixCacheStats:
    queries: int = 0  # prompt tokens (of admitted requests) looked up
    hits: int = 0  # of those, tokens whose K/V came from the cache


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, shuffle_seed: int | None = None,
                 enable_caching: bool = False, num_cpu_blocks: int = 0,
                 sliding_window: int | None = None):
        """num_cpu_blocks: host blocks that preemption by swap copies tables into (0: none).
        Host block 0 is reserved like the device's, as the target of padded copies.
        sliding_window: the window every layer of the model attends within (None: some layer
        reads the whole context), after which release_outside_window gives blocks back."""
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
        self.block_size = block_size
        self.sliding_window = sliding_window
        self._released: dict[str, int] = {}  # request -> leading table entries given back
        self.num_released_blocks = 0  # running total, for the metrics
        self.pool = BlockPool(num_blocks, shuffle_seed)
        self.cpu_pool = BlockPool(num_cpu_blocks + 1) if num_cpu_blocks else None
        self._swapped: dict[str, list[int]] = {}  # swapped-out request -> its host blocks
        self.enable_caching = enable_caching
        self.cache_stats = PrefixCacheStats()
        self._tables: dict[str, list[int]] = {}
        self._hashes: dict[str, list[bytes]] = {}  # hashes of each table's full blocks so far

    def block_table(self, request_id: str) -> list[int]:
        return self._tables.get(request_id, [])

    def blocks_needed(self, request_id: str, num_tokens: int) -> int:
        return max(0, cdiv(num_tokens, self.block_size) - len(self.block_table(request_id)))

    def room(self, request_id: str, hit: PrefixHit | None = None) -> int:
        """Tokens the request's table could hold if it took every free block: a new table
        starting from `hit`'s cached blocks (those no request holds come off the free list)."""
        if hit is not None and hit.blocks:
            free = self.pool.num_free - self._reclaimed(hit.blocks)
            return (len(hit.blocks) + free) * self.block_size
        return (len(self.block_table(request_id)) + self.pool.num_free) * self.block_size

    def _reclaimed(self, hit_blocks) -> int:
        """Hit blocks that no request holds sit on the free list: taking them shrinks it."""
        return sum(1 for b in set(hit_blocks) if self.pool.ref_count(b) == 0)

    def find_cached(self, token_ids: list[int], known: list[bytes] | None = None) -> PrefixHit:
        """The longest run of cached full blocks that token_ids start with. The last token is
        never a hit (its logits are needed), so a hit ends at least one token early; empty
        when caching is off. known: the hashes of token_ids' first blocks from an earlier
        call (a request's tokens only grow, so they stay true), extended in place; a prompt
        waiting many steps at the head of the queue is then hashed once."""
        if not self.enable_caching:
            return PrefixHit(block_size=self.block_size)
        limit = (len(token_ids) - 1) // self.block_size
        hashes_now = block_hashes(token_ids, self.block_size, known, limit=limit)
        if known is not None:
            known[:] = hashes_now
        blocks, hashes = [], []
        for h in hashes_now[:limit]:
            b = self.pool.cached_block(h)
            if b is None:
                break
            blocks.append(b)
            hashes.append(h)
        return PrefixHit(tuple(blocks), tuple(hashes), self.block_size)

    def holds(self, request_id: str, num_tokens: int) -> bool:
        """Whether the request's table has slots for num_tokens tokens already (so that
        allocate(request_id, num_tokens) would change nothing)."""
        table = self._tables.get(request_id)
        return table is not None and num_tokens <= len(table) * self.block_size

    def allocate(self, request_id: str, num_tokens: int, hit: PrefixHit | None = None) -> bool:
        """Grow the table to hold num_tokens tokens, a new table starting from `hit`'s cached
        blocks. All or nothing: False if blocks run out."""
        if hit is None and self.holds(request_id, num_tokens):
            return True  # (most calls: a table that has room already)
        hit_blocks = list(hit.blocks) if hit is not None else []
        if hit_blocks and request_id in self._tables:
            raise ValueError(f"request {request_id!r} already has blocks; a prefix hit "
                             "only starts a new table")
        need = max(0, self.blocks_needed(request_id, num_tokens) - len(hit_blocks))
        if need + self._reclaimed(hit_blocks) > self.pool.num_free:
            return False
        if hit_blocks:
            self.pool.share(hit_blocks)
            self._tables[request_id] = hit_blocks
            self._hashes[request_id] = list(hit.hashes)
        if need:
            self._tables.setdefault(request_id, []).extend(self.pool.allocate(need))
        return True

    def new_full_blocks(self, request_id: str, num_tokens: int) -> bool:
        """Whether cache_blocks would register anything for the request's first num_tokens
        tokens: lets a decode step skip building a request's token list (O(length)) in the
        steps that fill no block."""
        if not self.enable_caching:
            return False
        full = min(len(self._tables.get(request_id, ())), num_tokens // self.block_size)
        return full > len(self._hashes.get(request_id, ()))

    def cache_blocks(self, request_id: str, token_ids: list[int]) -> None:
        """Register the request's full blocks among token_ids, the tokens whose K/V will be in
        its blocks once the step being scheduled has run. Registering before the step is safe:
        within each layer the step writes all its new K/V before any attention reads them, so
        a request that hits these blocks in the same step reads them written."""
        if not self.enable_caching:
            return
        table = self._tables[request_id]
        known = self._hashes.setdefault(request_id, [])
        done = len(known)
        known[:] = block_hashes(token_ids, self.block_size, known, limit=len(table))
        for i in range(done, len(known)):
            if table[i]:  # (0: released before it was registered; nothing to cache)
                self.pool.register(table[i], known[i])

    def reset_prefix_cache(self) -> None:
        """Drop every cached hash; the tables' own blocks stay. Held blocks computed so far
        are not registered again (only blocks completed from now on are)."""
        self.pool.reset_cache()

    def record_admission(self, num_prompt_tokens: int, hit: PrefixHit) -> None:
        if self.enable_caching:
            self.cache_stats.queries += num_prompt_tokens
            self.cache_stats.hits += hit.num_tokens

    def free(self, request_id: str) -> None:
        """Give back the request's device blocks, or its host blocks if it is swapped out."""
        self._hashes.pop(request_id, None)
        released = self._released.pop(request_id, 0)
        table = self._tables.pop(request_id, None)
        if table:
            self.pool.free(table[released:])
        host = self._swapped.pop(request_id, None)
        if host:
            self.cpu_pool.free([b for b in host if b])  # (0: a block released before)

    # ---- sliding windows ------------------------------------------------------------------

    def release_outside_window(self, request_id: str, num_computed: int) -> int:
        """Give back the request's blocks that no later query reads: its next query sits at
        position num_computed and attends to keys after num_computed - sliding_window, so
        every block wholly before that is dead in every layer (vLLM's sliding-window manager
        does the same). Released blocks keep their prefix-cache hash on the free list, as any
        freed block does. Returns how many blocks were given back (0 without a window).
        num_computed must never exceed what later queries start from: speculative drafts
        are settled first (update_from_output), so it only grows."""
        table = self._tables.get(request_id)
        if self.sliding_window is None or not table:
            return 0
        done = self._released.get(request_id, 0)
        dead = min(len(table), max(0, num_computed - self.sliding_window + 1) // self.block_size)
        if dead <= done:
            return 0
        self.pool.free(table[done:dead])
        table[done:dead] = [0] * (dead - done)
        self._released[request_id] = dead
        self.num_released_blocks += dead - done
        return dead - done

    def num_released(self, request_id: str) -> int:
        """Leading blocks of the request's table given back to the pool (entries now 0)."""
        return self._released.get(request_id, 0)

    # ---- swapping (preemption by swap) ----------------------------------------------------

    def swap_out(self, request_id: str, num_computed: int,
                 copied: dict[int, int] | None = None) -> list[tuple[int, int]] | None:
        """Move the blocks holding the request's first num_computed tokens to host blocks and
        free its device table: the (device block, host block) pairs to copy, before any step
        writes the freed blocks. None, and nothing changes, if the host pool lacks room.
        Blocks shared with other requests are copied too: on the device they stay with their
        other owners, or on the free list under their hash. copied: device -> host blocks
        already being copied out this step; their host copies are shared, not made again."""
        copied = copied or {}
        table = self._tables[request_id]
        released = self._released.get(request_id, 0)
        blocks = table[released:cdiv(num_computed, self.block_size)]
        new = [b for b in blocks if b not in copied]
        if self.cpu_pool is None or len(new) > self.cpu_pool.num_free:
            return None
        fresh = dict(zip(new, self.cpu_pool.allocate(len(new))))
        self.cpu_pool.share([copied[b] for b in blocks if b in copied])
        self.free(request_id)
        # (released blocks stay released: host entry 0, nothing copied)
        self._swapped[request_id] = [0] * released + [
            fresh[b] if b in fresh else copied[b] for b in blocks]
        return list(fresh.items())

    def swap_in(self, request_id: str, num_tokens: int) -> list[tuple[int, int]] | None:
        """A new device table for num_tokens tokens, and the (host block, device block) pairs
        that bring the swapped-out blocks back into it, to copy before the step that reads
        them. The host blocks are free once the copy is made. None, and nothing changes, if
        device blocks run out. Its full blocks rejoin the prefix cache through cache_blocks,
        as any computed block does."""
        host = self._swapped[request_id]
        if request_id in self._tables:
            raise ValueError(f"request {request_id!r} is swapped out and holds device blocks")
        released = next((i for i, b in enumerate(host) if b), len(host))
        if released:  # a table starts with its released entries: nothing to copy there
            self._tables[request_id] = [0] * released
        if not self.allocate(request_id, max(num_tokens, len(host) * self.block_size)):
            self._tables.pop(request_id, None)
            return None
        if released:
            self._released[request_id] = released
        del self._swapped[request_id]
        self.cpu_pool.free(host[released:])
        table = self._tables.setdefault(request_id, [])  # [] if none computed
        return list(zip(host[released:], table[released:]))

    def host_blocks(self, request_id: str) -> list[int]:
        """A swapped-out request's host blocks (shared with others swapped out in the same
        step where their device blocks were shared)."""
        return self._swapped.get(request_id, [])

    def num_swapped_blocks(self) -> int:
        return self.cpu_pool.num_used if self.cpu_pool is not None else 0

    def slots(self, request_id: str, start: int, end: int) -> list[int]:
        """Cache slots (block_id * block_size + offset) of token positions start..end-1."""
        table, b = self._tables[request_id], self.block_size
        return [table[p // b] * b + p % b for p in range(start, end)]

    def tokens_held(self, request_id: str, num_computed: int) -> int:
        """Of the request's first num_computed tokens, those whose K/V its blocks still hold
        (released blocks hold none)."""
        return max(0, num_computed - self._released.get(request_id, 0) * self.block_size)

    def usage(self, tokens_held: dict[str, int]) -> KVUsage:
        """tokens_held: request id -> tokens whose K/V sit in its blocks (tokens_held), for
        every request that holds blocks. A shared block is always full (only full blocks are shared), so
        each extra owner of one counted block_size tokens twice."""
        used = self.pool.num_used
        return KVUsage(used, self.pool.num_usable, used * self.block_size,
                       sum(tokens_held.values()) - self.pool.num_extra_refs * self.block_size)
