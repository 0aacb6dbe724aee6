"""BlockPool: unit tests and a randomized state machine over allocate / share / free."""
from __future__ import annotations

import collections

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from paged_jax.block_pool import BlockPool, NoFreeBlocksError


def test_block_zero_is_reserved():
    pool = BlockPool(4)
    assert pool.num_usable == 3 and pool.num_free == 3 and pool.num_used == 0
    assert sorted(pool.allocate(3)) == [1, 2, 3]
    assert pool.ref_count(0) == 0
    with pytest.raises(ValueError):
        pool.free([0])
    with pytest.raises(ValueError):
        pool.share([0])


def test_too_few_blocks_rejected():
    with pytest.raises(ValueError):
        BlockPool(1)


def test_allocate_is_all_or_nothing():
    pool = BlockPool(5)
    pool.allocate(2)
    with pytest.raises(NoFreeBlocksError):
        pool.allocate(3)
    assert pool.num_free == 2 and pool.num_used == 2


def test_usage_and_counts():
    pool = BlockPool(11)
    ids = pool.allocate(4)
    assert pool.num_used == 4 and pool.usage() == pytest.approx(0.4)
    assert all(pool.ref_count(i) == 1 for i in ids)
    pool.free(ids)
    assert pool.num_free == 10 and pool.usage() == 0


def test_shared_blocks_return_to_the_free_list_with_the_last_owner():
    pool = BlockPool(4)
    ids = pool.allocate(2)
    pool.share(ids)
    assert [pool.ref_count(i) for i in ids] == [2, 2]
    pool.free(ids)
    assert pool.num_free == 1 and [pool.ref_count(i) for i in ids] == [1, 1]
    pool.free(ids)
    assert pool.num_free == 3


def test_free_of_unallocated_or_twice_freed_block_raises():
    pool = BlockPool(4)
    ids = pool.allocate(1)
    with pytest.raises(ValueError):
        pool.free([ids[0] % 3 + 1])  # another block, never allocated
    pool.free(ids)
    with pytest.raises(ValueError):
        pool.free(ids)
    with pytest.raises(ValueError):
        pool.share(ids)


@pytest.mark.parametrize("block", [-1, 4, 100])
def test_ids_outside_the_pool_raise(block):
    # -1 used to index the last block: freeing it put -1 on the free list, and the last
    # block, still in a table, was handed out again as -1.
    pool = BlockPool(4)
    pool.allocate(3)
    with pytest.raises(ValueError):
        pool.free([block])
    with pytest.raises(ValueError):
        pool.share([block])
    assert pool.num_free == 0 and pool.ref_count(3) == 1


def test_a_failed_free_or_share_changes_nothing():
    pool = BlockPool(4)
    a, b = pool.allocate(2)
    with pytest.raises(ValueError):
        pool.free([3, a])  # 3 was never allocated: a must stay allocated
    with pytest.raises(ValueError):
        pool.share([b, 3])  # 3 is free: b must not gain an owner
    assert pool.ref_count(a) == 1 and pool.ref_count(b) == 1 and pool.num_free == 1


def test_a_freed_tables_tail_is_reused_before_its_head():
    pool = BlockPool(8)
    table = pool.allocate(3)
    pool.free(table)
    # Tail first onto the free list; the whole free list is cycled before them.
    assert pool.allocate(7)[-3:] == table[::-1]


class BlockPoolMachine(RuleBasedStateMachine):
    """Tables are lists of block ids held by one owner; the model counts owners per block."""

    tables = Bundle("tables")

    def __init__(self):
        super().__init__()
        self.pool: BlockPool | None = None
        self.owners: collections.Counter[int] = collections.Counter()
        self.live: list[list[int]] = []  # tables not yet freed (a table can be freed once)

    @rule(num_blocks=st.integers(2, 24))
    def make_pool(self, num_blocks):
        if self.pool is None:
            self.pool = BlockPool(num_blocks)

    @rule(target=tables, n=st.integers(0, 26))
    def allocate(self, n):
        if self.pool is None:
            self.pool = BlockPool(12)
        free_before = self.pool.num_free
        if n > free_before:
            with pytest.raises(NoFreeBlocksError):
                self.pool.allocate(n)
            assert self.pool.num_free == free_before  # nothing taken
            return self._track([])
        ids = self.pool.allocate(n)
        assert len(ids) == n == len(set(ids)) and 0 not in ids
        assert not any(self.owners[i] for i in ids), "handed out a block in use"
        return self._track(ids)

    @rule(target=tables, table=tables)
    def share(self, table):
        if table not in self.live:
            return self._track([])
        self.pool.share(table)
        return self._track(list(table))

    @rule(table=consumes(tables))
    def free(self, table):
        if table not in self.live:
            return
        self.pool.free(table)
        self.live.remove(table)
        self.owners.subtract(table)

    @rule(block=st.integers(-3, 30))
    def free_unallocated_raises(self, block):
        if self.pool is None or self.owners[block]:
            return
        before = self.pool.num_free
        with pytest.raises(ValueError):
            self.pool.free([block])
        assert self.pool.num_free == before

    @rule(block=st.integers(-3, 30))
    def share_unallocated_raises(self, block):
        if self.pool is None or self.owners[block]:
            return
        with pytest.raises(ValueError):
            self.pool.share([block])

    def _track(self, ids):
        ids = list(ids)
        self.live.append(ids)
        self.owners.update(ids)
        return ids

    @invariant()
    def counts_add_up(self):
        if self.pool is None:
            return
        pool = self.pool
        assert pool.num_free + pool.num_used == pool.num_usable
        assert pool.ref_count(0) == 0
        refs = [pool.ref_count(i) for i in range(pool.num_blocks)]
        assert min(refs) >= 0
        # A block sits in k live tables exactly when k owners hold it (shared on purpose).
        assert refs == [self.owners[i] for i in range(pool.num_blocks)]
        assert pool.num_free == sum(1 for i in range(1, pool.num_blocks) if refs[i] == 0)
        assert pool.num_extra_refs == sum(max(0, r - 1) for r in refs)

    def teardown(self):
        if self.pool is None:
            return
        for table in list(self.live):
            self.pool.free(table)
        assert self.pool.num_free == self.pool.num_usable


TestBlockPoolMachine = BlockPoolMachine.TestCase
TestBlockPoolMachine.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)
