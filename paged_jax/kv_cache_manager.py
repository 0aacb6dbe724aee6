"""Per-request block tables over the block pool, grown on demand, and KV usage accounting."""
from __future__ import annotations

import dataclasses

from paged_jax.block_pool import BlockPool


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


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


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, shuffle_seed: int | None = None):
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, shuffle_seed)
        self._tables: dict[str, list[int]] = {}

    def block_table(self, request_id: str) -> list[int]:
        return self._tables.get(request_id, [])

    def blocks_needed(self, request_id: str, num_tokens: int) -> int:
        return max(0, cdiv(num_tokens, self.block_size) - len(self.block_table(request_id)))

    def allocate(self, request_id: str, num_tokens: int) -> bool:
        """Grow the table to hold num_tokens tokens. All or nothing: False if blocks run out."""
        need = self.blocks_needed(request_id, num_tokens)
        if need > self.pool.num_free:
            return False
        if need:
            self._tables.setdefault(request_id, []).extend(self.pool.allocate(need))
        return True

    def free(self, request_id: str) -> None:
        table = self._tables.pop(request_id, None)
        if table:
            self.pool.free(table)

    def slots(self, request_id: str, start: int, end: int) -> list[int]:
        """Cache slots (block_id * block_size + offset) of token positions start..end-1."""
        table, b = self._tables[request_id], self.block_size
        return [table[p // b] * b + p % b for p in range(start, end)]

    def usage(self, tokens_held: dict[str, int]) -> KVUsage:
        """tokens_held: request id -> tokens whose K/V sit in its blocks."""
        used = self.pool.num_used
        return KVUsage(used, self.pool.num_usable, used * self.block_size,
                       sum(tokens_held.values()))
