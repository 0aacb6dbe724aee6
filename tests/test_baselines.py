"""Orca reservation policies, the buddy allocator (unit + randomized) and ContiguousKV."""
from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from paged_jax.intmath import cdiv
from paged_jax.kv_cache_manager import KVCacheManager
from paged_jax.request import Request
from paged_jax.baselines import (BuddyAllocator, ContiguousKV, next_pow2, orca_max,
                                   orca_oracle, orca_pow2)
from paged_jax.sampling_params import SamplingParams
from paged_jax.scheduler import Scheduler


def request(prompt_len: int, output_len: int, rid: str = "r") -> Request:
    return Request(rid, [1] * prompt_len, SamplingParams(max_tokens=output_len),
                   prompt_len + output_len, seed=0)


def test_next_pow2():
    assert [next_pow2(n) for n in (0, 1, 2, 3, 4, 5, 1000, 1024, 1025)] == \
        [1, 1, 2, 4, 4, 8, 1024, 1024, 2048]


def test_policies_reserved_lengths():
    req = request(10, 25)
    assert orca_max(2048)(req) == 2048
    assert orca_pow2(2048)(req) == 10 + 32  # the paper's example: output 25 -> 32 slots
    assert orca_oracle()(req) == 35
    assert orca_pow2(2048)(request(900, 1100)) == 2048  # 900 + 2048, capped
    assert orca_pow2()(request(900, 1100)) == 900 + 2048
    assert orca_pow2(2048)(request(7, 32)) == 7 + 32  # already a power of two


def test_space_is_cut_into_aligned_chunks_of_at_most_max_block():
    b = BuddyAllocator(15728, max_block=2048)
    assert b.capacity == b.num_free == 15728
    assert b.free_blocks()[-6:] == [(12288, 2048), (14336, 1024), (15360, 256), (15616, 64),
                                    (15680, 32), (15712, 16)]
    assert all(start % size == 0 for start, size in b.free_blocks())
    assert BuddyAllocator(10, min_block=4).capacity == 8  # a 2-slot tail is never handed out


def test_split_and_merge():
    b = BuddyAllocator(16)
    a = b.allocate(3)  # 16 -> 8 + 8 -> 4 + 4: the low 4
    assert a == 0 and b.free_blocks() == [(4, 4), (8, 8)]
    assert b.allocated_slots == 4 and b.requested_slots == 3
    c = b.allocate(4)
    assert c == 4 and b.free_blocks() == [(8, 8)]
    b.free(a)
    assert b.free_blocks() == [(0, 4), (8, 8)]  # its buddy (4) is still in use
    b.free(c)
    assert b.free_blocks() == [(0, 16)] and b.allocated_slots == 0


def test_allocation_is_all_or_nothing():
    b = BuddyAllocator(16)
    b.allocate(8)
    b.allocate(1)  # leaves 1 + 2 + 4 free, 7 slots but no 8-slot block
    before = b.free_blocks()
    assert b.num_free == 7 and not b.can_allocate(5)
    assert b.allocate(5) is None
    assert b.free_blocks() == before
    with pytest.raises(ValueError):
        b.allocate(17)  # larger than any block can ever be
    with pytest.raises(ValueError):
        b.allocate(0)


def test_free_of_unallocated_raises():
    b = BuddyAllocator(16)
    s = b.allocate(4)
    with pytest.raises(ValueError):
        b.free(s + 1)
    b.free(s)
    with pytest.raises(ValueError):
        b.free(s)


def test_blocks_never_merge_past_max_block():
    b = BuddyAllocator(64, max_block=16)
    starts = [b.allocate(16) for _ in range(4)]
    for s in starts:
        b.free(s)
    assert b.free_blocks() == [(0, 16), (16, 16), (32, 16), (48, 16)]


class BuddyMachine(RuleBasedStateMachine):
    @initialize(num_slots=st.integers(1, 200), max_exp=st.integers(0, 8), min_exp=st.integers(0, 2))
    def setup(self, num_slots, max_exp, min_exp):
        min_exp = min(min_exp, max_exp)
        self.b = BuddyAllocator(num_slots, 1 << max_exp, 1 << min_exp)
        self.initial = self.b.free_blocks()
        self.held: dict[int, int] = {}  # start -> slots asked for

    @rule(n=st.integers(1, 300))
    def allocate(self, n):
        b = self.b
        if b.block_size_for(n) > b.max_block:
            with pytest.raises(ValueError):
                b.allocate(n)
            return
        before, possible = b.free_blocks(), b.can_allocate(n)
        start = b.allocate(n)
        if start is None:
            assert not possible and b.free_blocks() == before  # nothing taken
            return
        assert possible and start not in self.held
        size = b.allocations()[start][0]
        assert size == b.block_size_for(n) and size >= n and start % size == 0
        self.held[start] = n

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def free(self, data):
        start = data.draw(st.sampled_from(sorted(self.held)))
        self.b.free(start)
        del self.held[start]

    @rule(start=st.integers(0, 300))
    def free_unallocated(self, start):
        if start not in self.held:
            with pytest.raises(ValueError):
                self.b.free(start)

    @invariant()
    def blocks_tile_the_space(self):
        b = self.b
        allocs = b.allocations()
        assert {s: n for s, (_, n) in allocs.items()} == self.held
        pieces = sorted([(s, size) for s, (size, _) in allocs.items()] + b.free_blocks())
        pos = 0
        for start, size in pieces:  # free and allocated blocks: no overlap, no gap
            assert start == pos and start % size == 0 and size <= b.max_block
            pos += size
        assert pos == b.capacity <= b.num_slots
        assert b.num_free + b.allocated_slots == b.capacity
        assert b.requested_slots == sum(self.held.values()) <= b.allocated_slots

    def teardown(self):
        if hasattr(self, "b"):
            for start in list(self.held):
                self.b.free(start)
            assert self.b.free_blocks() == self.initial  # every split merged back


TestBuddyMachine = BuddyMachine.TestCase
TestBuddyMachine.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)


def test_contiguous_kv_grows_only_inside_its_block():
    kv = ContiguousKV(64, max_block=32)
    assert kv.allocate("a", 5)  # an 8-slot block
    assert kv.ranges["a"].size == 8 and kv.ranges["a"].reserved == 5
    assert kv.allocate("a", 8) and kv.ranges["a"].reserved == 8
    assert not kv.allocate("a", 9)
    assert not kv.allocate("b", 33)  # past the largest block
    assert kv.allocate("b", 32) and kv.allocate("c", 16) and not kv.can_admit(16)
    kv.free("a")
    kv.free("a")  # unknown ids are ignored, as KVCacheManager.free does
    assert kv.buddy.allocated_slots == 48


def _apply(sched: Scheduler, batch) -> None:
    sched.dispatched(batch)  # as LLMEngine.step
    sched.update_from_output(batch, [[0]] * len(batch.requests))


def _drain(sched: Scheduler) -> None:
    for _ in range(100_000):
        if not sched.has_unfinished():
            return
        _apply(sched, sched.schedule())
    raise AssertionError("did not finish")


@pytest.mark.parametrize("policy", [orca_max(256), orca_pow2(256), orca_oracle()])
def test_policies_drive_the_scheduler_without_preemption(policy):
    lengths = [(5, 40), (100, 20), (3, 3), (60, 150), (17, 17), (1, 200)] * 3
    reqs = [request(p, o, f"r{i}") for i, (p, o) in enumerate(lengths)]

    kv = ContiguousKV(1000, max_block=256)
    sched = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=256, reservation=policy)
    for r in reqs:
        sched.add(r)
    first = sched.schedule()
    for r in first.requests:
        assert kv.ranges[r.request_id].reserved == policy(r)
        assert kv.ranges[r.request_id].size == next_pow2(policy(r))
    _apply(sched, first)
    _drain(sched)
    assert sched.num_preemptions == 0 and kv.buddy.allocated_slots == 0

    paged = KVCacheManager(64, 16)  # reservations also work over paged blocks
    sched = Scheduler(paged, max_num_seqs=8, max_num_batched_tokens=256, reservation=policy)
    r = request(5, 40, "p")
    sched.add(r)
    sched.schedule()
    assert len(paged.block_table("p")) == cdiv(policy(r), 16)
