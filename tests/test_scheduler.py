"""Scheduler: unit tests and a randomized state machine, driven like LLMEngine.step without a
model (each scheduled request gets one fake token and finishes at max_total_tokens)."""
from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from paged_jax.intmath import cdiv
from paged_jax.kv_cache_manager import KVCacheManager
from paged_jax.request import Request, Status
from paged_jax.sampling_params import SamplingParams
from paged_jax.scheduler import ScheduledBatch, Scheduler

_ids = itertools.count()


def make_request(prompt_len: int, output_len: int) -> Request:
    return Request(f"r{next(_ids)}", [1] * prompt_len, SamplingParams(max_tokens=output_len),
                   prompt_len + output_len, seed=0)


def engine_step(sched: Scheduler) -> ScheduledBatch | None:
    """What LLMEngine.step does to the host state around the model call."""
    batch = sched.schedule()
    if batch is None:
        return None
    sched.dispatched(batch)
    sched.update_from_output(batch, [[7]] * len(batch.requests))
    return batch


def make_scheduler(num_blocks=64, block_size=4, max_num_seqs=8, budget=64, **kw) -> Scheduler:
    return Scheduler(KVCacheManager(num_blocks, block_size), max_num_seqs, budget, **kw)


def test_prefill_admits_fcfs_within_seqs_and_token_budget():
    sched = make_scheduler(max_num_seqs=2, budget=20)
    reqs = [make_request(8, 4), make_request(8, 4), make_request(8, 4)]
    for r in reqs:
        sched.add(r)
    batch = sched.schedule()
    assert batch.kind == "prefill" and batch.requests == tuple(reqs[:2])
    assert batch.num_new_tokens == (8, 8) and batch.num_tokens == 16
    assert all(r.status is Status.RUNNING for r in reqs[:2]) and list(sched.waiting) == reqs[2:]

    sched = make_scheduler(max_num_seqs=8, budget=20)
    for r in [make_request(8, 4), make_request(8, 4), make_request(8, 4)]:
        sched.add(r)
    assert len(sched.schedule().requests) == 2  # a third prompt would pass the 20-token budget


def test_prefill_before_decode_and_one_slot_per_decode():
    sched = make_scheduler(block_size=4)
    a = make_request(3, 5)
    sched.add(a)
    assert engine_step(sched).kind == "prefill"
    assert a.num_computed_tokens == 3 and a.num_tokens == 4
    assert len(sched.kv.block_table(a.request_id)) == 1
    b = make_request(2, 2)
    sched.add(b)
    assert engine_step(sched).requests == (b,)  # a waiting prompt goes first
    batch = engine_step(sched)
    assert batch.kind == "decode" and batch.requests == (a, b) and batch.num_new_tokens == (1, 1)
    assert len(sched.kv.block_table(a.request_id)) == 1  # a's 4th token fits its first block


def test_preempts_newest_and_recomputes_it_from_the_head_of_the_queue():
    sched = make_scheduler(num_blocks=4, block_size=2)  # 3 usable blocks
    old, new, late = make_request(2, 4), make_request(2, 4), make_request(1, 1)
    sched.add(old)
    sched.add(new)
    engine_step(sched)  # both prefilled: one block each, 3 tokens each
    sched.add(late)
    engine_step(sched)  # late (1 block) fills the pool and finishes at once
    assert late.finished and sched.kv.pool.num_free == 1
    batch = engine_step(sched)  # old takes the free block; new cannot grow and is preempted
    assert batch.requests == (old,) and batch.preempted == (new,)
    assert list(sched.waiting) == [new] and new.num_computed_tokens == 0
    assert new.status is Status.WAITING and new.num_preemptions == 1
    assert sched.kv.block_table(new.request_id) == []
    assert sched.num_preemptions == 1
    assert sched.schedule().kind == "decode"  # new needs 2 blocks, 1 is free: old goes on
    sched.finish(old)
    prefill = sched.schedule()  # recomputed from prompt + its output so far
    assert prefill.kind == "prefill" and prefill.num_new_tokens == (new.num_tokens,)


def test_a_request_larger_than_the_cache_preempts_itself_and_stalls():
    # Why LLMEngine._validate rejects requests that need more blocks than the cache has.
    sched = make_scheduler(num_blocks=2, block_size=2)  # one usable block
    req = make_request(2, 3)
    sched.add(req)
    engine_step(sched)
    batch = sched.schedule()
    assert batch.requests == () and batch.preempted == (req,)
    assert sched.schedule() is None and sched.has_unfinished()


def test_finish_frees_blocks_wherever_the_request_is():
    sched = make_scheduler(max_num_seqs=1)
    a, b = make_request(5, 5), make_request(5, 5)
    sched.add(a)
    sched.add(b)
    engine_step(sched)
    sched.finish(b)  # aborted while waiting
    sched.finish(a)  # aborted while running
    assert not sched.has_unfinished() and a.finished and b.finished
    assert sched.kv.pool.num_free == sched.kv.pool.num_usable


def test_reservation_holds_blocks_at_admission():
    sched = make_scheduler(block_size=4, reservation=lambda req: req.max_total_tokens)
    req = make_request(3, 10)
    sched.add(req)
    sched.schedule()
    assert len(sched.kv.block_table(req.request_id)) == cdiv(13, 4)


def test_mixed_step_decodes_the_running_and_admits_prompts_in_the_rest_of_the_budget():
    sched = make_scheduler(budget=20, mixed=True)
    a, b = make_request(6, 9), make_request(5, 9)
    sched.add(a)
    sched.add(b)
    assert engine_step(sched).requests == (a, b)  # nothing runs yet: a plain prefill
    c, d, e = make_request(8, 4), make_request(11, 4), make_request(3, 4)
    for r in (c, d, e):
        sched.add(r)
    batch = engine_step(sched)
    # a and b decode (2 tokens); c fits the 18 left, d would not (2 + 8 + 11 > 20), and e,
    # which would, waits behind it (FCFS).
    assert batch.kind == "prefill" and batch.num_decodes == 2
    assert batch.requests == (a, b, c) and batch.num_new_tokens == (1, 1, 8)
    assert list(sched.waiting) == [d, e]
    batch = engine_step(sched)
    assert batch.requests == (a, b, c, d, e) and batch.num_new_tokens == (1, 1, 1, 11, 3)
    assert batch.num_decodes == 3


def test_mixed_gives_a_long_prompt_a_prefill_only_step():
    sched = make_scheduler(budget=20, mixed=True)
    a = make_request(4, 9)
    sched.add(a)
    engine_step(sched)
    long = make_request(20, 1)  # fits the budget alone, not beside a's decode token
    sched.add(long)
    batch = engine_step(sched)
    assert batch.kind == "prefill" and batch.requests == (long,) and batch.num_decodes == 0
    assert engine_step(sched).requests == (a,)  # long finished at its first token


def test_mixed_step_that_preempts_admits_nothing():
    sched = make_scheduler(num_blocks=4, block_size=2, budget=16, mixed=True)  # 3 usable
    a, b = make_request(2, 5), make_request(2, 5)
    sched.add(a)
    sched.add(b)
    engine_step(sched)  # a and b hold one full block each
    c = make_request(1, 1)
    sched.add(c)
    batch = sched.schedule()  # a takes the last block, b is preempted: c must wait
    assert batch.kind == "decode" and batch.requests == (a,) and batch.preempted == (b,)
    assert list(sched.waiting) == [b, c]


def test_tokens_between_is_a_slice_of_all_token_ids():
    req = make_request(5, 4)
    req.prompt_token_ids = [10, 11, 12, 13, 14]
    req.output_token_ids = [20, 21, 22]
    for start in range(9):
        for end in range(start, 9):
            assert req.tokens_between(start, end) == req.all_token_ids[start:end], (start, end)


def test_a_chunked_prompt_takes_its_blocks_chunk_by_chunk():
    sched = make_scheduler(num_blocks=64, block_size=4, budget=8, mixed=True, chunked=True)
    req = make_request(30, 2)
    sched.add(req)
    held = []
    for _ in range(4):  # chunks of 8, 8, 8 and 6 tokens
        batch = sched.schedule()
        held.append(len(sched.kv.block_table(req.request_id)))
        req.num_computed_tokens += batch.num_new_tokens[0]
    assert held == [2, 4, 6, 8]  # not all 8 at admission


def test_a_chunk_is_cut_to_the_free_blocks_and_new_prompts_wait_for_blocks():
    sched = make_scheduler(num_blocks=9, block_size=4, budget=16, mixed=True, chunked=True)
    hog = make_request(12, 20)  # decodes, holding 3 blocks, then 4
    sched.add(hog)
    engine_step(sched)
    long_prompt, short = make_request(24, 1), make_request(2, 1)
    sched.add(long_prompt)
    sched.add(short)
    batch = sched.schedule()  # hog decodes (block 4); the prompt gets the 4 blocks left
    assert batch.requests == (hog, long_prompt) and batch.num_new_tokens == (1, 15)
    assert sched.kv.pool.num_free == 0 and list(sched.waiting) == [short]
    for r, new in zip(batch.requests, batch.num_new_tokens):
        r.num_computed_tokens += new
    hog.output_token_ids.append(7)
    batch = sched.schedule()  # the prompt's last block has room for 1 token; none is free
    assert batch.requests == (hog, long_prompt) and batch.num_new_tokens == (1, 1)
    assert list(sched.waiting) == [short]


def test_prompts_part_way_through_that_find_no_block_preempt_the_newest():
    # Two prompts part-way through hold every block (as after swapping one back in): the
    # older finds no block for its next chunk, so the newer gives its blocks up (as a decode
    # that finds none would) and the older goes on in the same step.
    sched = make_scheduler(num_blocks=5, block_size=4, budget=16, mixed=True, chunked=True)
    older, newer = make_request(12, 1), make_request(12, 1)
    for req, computed in ((older, 8), (newer, 8)):
        assert sched.kv.allocate(req.request_id, computed)
        req.num_computed_tokens, req.status = computed, Status.RUNNING
        sched.running.append(req)
    assert sched.kv.pool.num_free == 0
    batch = sched.schedule()
    assert batch.requests == (older,) and batch.num_new_tokens == (4,)
    assert batch.preempted == (newer,) and batch.samples == (True,)
    assert newer.status is Status.WAITING and newer.num_computed_tokens == 0
    sched.dispatched(batch)
    sched.update_from_output(batch, [[7]])
    assert older.finished  # (one output token)
    batch = sched.schedule()  # the newer starts again, from its prompt
    assert batch.requests == (newer,) and batch.num_new_tokens == (12,)


def test_a_step_never_passes_its_token_budget_decodes_included():
    # The budget bounds every row: with more requests than budgeted tokens, the oldest
    # decode and the newer wait (vLLM V1) until those finish.
    sched = make_scheduler(max_num_seqs=6, budget=4, mixed=True, chunked=True)
    reqs = [make_request(1, 6) for _ in range(6)]
    for r in reqs:
        sched.add(r)
    steps = []
    while sched.has_unfinished():
        batch = engine_step(sched)
        assert batch.num_tokens <= 4
        steps.append([r.request_id for r in batch.requests])
    assert steps[1] == ["r%d" % int(r.request_id[1:]) for r in reqs[:4]]
    assert all(r.finished and len(r.output_token_ids) == 6 for r in reqs)


def test_drafts_ride_after_the_decodes_cut_to_the_budget():
    sched = make_scheduler(budget=6, mixed=True)
    a, b = make_request(3, 9), make_request(3, 9)
    sched.add(a)
    sched.add(b)
    engine_step(sched)
    batch = sched.schedule({a.request_id: [5, 6, 7, 8], b.request_id: [9]})
    # a asks 1 + 4 tokens of the 6: granted; b's decode and draft find one token left.
    assert batch.requests == (b, a) and batch.num_new_tokens == (1, 5)
    assert batch.spec_tokens == ((), (5, 6, 7, 8)) and batch.num_decodes == 1


def test_chunked_prefill_refuses_a_reservation_policy():
    import pytest
    with pytest.raises(ValueError, match="chunk by chunk"):
        make_scheduler(mixed=True, chunked=True, reservation=lambda req: 99)


class SchedulerMachine(RuleBasedStateMachine):
    MIXED = False
    CACHING = False  # prefix caching: prompts then come from a few shared stems
    CHUNKED = False  # chunked prefill: requests may be longer than a step's budget
    SWAP = False  # preemption by swap, into a host pool that may run out
    WINDOWED = False  # a sliding window on every layer: blocks it passed are released

    @initialize(block_size=st.sampled_from([1, 2, 4, 8]), num_blocks=st.integers(2, 40),
                max_num_seqs=st.integers(1, 6), budget=st.integers(4, 64),
                cpu_blocks=st.integers(1, 30))
    def setup(self, block_size, num_blocks, max_num_seqs, budget, cpu_blocks):
        # (drawn from the block geometry so the draws before it keep their meaning)
        self.window = 1 + (num_blocks * 7 + block_size * 3) % 13 if self.WINDOWED else None
        self.sched = Scheduler(KVCacheManager(num_blocks, block_size,
                                              enable_caching=self.CACHING,
                                              num_cpu_blocks=cpu_blocks if self.SWAP else 0,
                                              sliding_window=self.window),
                               max_num_seqs, budget, mixed=self.MIXED, chunked=self.CHUNKED,
                               swap=self.SWAP)
        # Longest request that can always run alone, and be recomputed after a preemption.
        self.max_len = (num_blocks - 1) * block_size
        if not self.CHUNKED:
            self.max_len = min(budget, self.max_len)
        self.added: list[Request] = []
        # What each block holds, as a model of the device's pages: the token whose K/V a
        # step wrote into each slot. Every request must read back its own tokens.
        self.pages: dict[int, list] = {}
        self.host_pages: dict[int, list] = {}  # the same for host blocks (swap)

    @precondition(lambda self: self.max_len >= 2)
    @rule(data=st.data())
    def add(self, data):
        total = data.draw(st.integers(2, self.max_len))
        prompt = data.draw(st.integers(1, total - 1))
        req = make_request(prompt, total - prompt)
        if self.CACHING:  # a stem shared with other requests, then tokens of its own
            stem = data.draw(st.integers(0, 2))
            cut = data.draw(st.integers(0, prompt))
            req.prompt_token_ids = ([100 + stem] * cut
                                    + data.draw(st.lists(st.integers(0, 2), min_size=prompt - cut,
                                                         max_size=prompt - cut)))
        self.sched.add(req)
        self.added.append(req)

    @precondition(lambda self: self.sched.has_unfinished())
    @rule(data=st.data())
    def abort(self, data):
        live = [r for r in self.added if not r.finished]
        self.sched.finish(data.draw(st.sampled_from(live)))

    @rule()
    def step(self):
        self.checked_step()

    def checked_step(self) -> None:
        sched, kv = self.sched, self.sched.kv
        old_running, old_waiting = list(sched.running), list(sched.waiting)
        old_swapped = list(sched.swapped)
        old_tables = {r.request_id: list(kv.block_table(r.request_id)) for r in old_running}
        # Running prompts part-way through a chunked prefill: more than one token to compute.
        partial = [r for r in old_running + old_swapped
                   if r.num_tokens - r.num_computed_tokens > 1]
        assert self.CHUNKED or not partial
        batch = sched.schedule()
        if batch is None:
            assert not old_running and not old_waiting and not old_swapped, \
                "requests waiting but nothing scheduled"
            return
        assert len(sched.running) <= sched.max_num_seqs
        # Swapped-out requests come back oldest first, never in a step that preempts, and no
        # prompt is admitted while any is still out.
        back = [r for r in old_swapped if r.status is Status.RUNNING]
        assert back == old_swapped[:len(back)] and not (back and batch.preempted)
        if not batch.preempted:
            assert list(sched.swapped) == old_swapped[len(back):]
        self.check_swaps(batch, back, old_tables)
        reqs, news, budget = batch.requests, batch.num_new_tokens, sched.max_num_batched_tokens
        # One budget for every row, decodes included.
        assert batch.num_tokens <= budget
        # Layout: one-token decodes of requests already running lead, then every other row
        # in the order the loop granted it (running, swapped back, admitted).
        d = batch.num_decodes if batch.kind == "prefill" else len(reqs)
        assert batch.kind == "decode" or d < len(reqs)
        assert news[:d] == (1,) * d and all(batch.sampling[:d])
        assert all(r in old_running or r in back for r in reqs[:d])
        admitted = [r for r in reqs if r in old_waiting]
        assert list(reqs[len(reqs) - len(admitted):]) == admitted == old_waiting[:len(admitted)]
        # Preemption takes the newest running requests, newest first; a step that preempts
        # swaps nothing in and admits nothing.
        k = len(batch.preempted)
        assert list(reversed(batch.preempted)) == old_running[len(old_running) - k:]
        assert not (k and (back or admitted))
        assert not (admitted and sched.swapped)  # the swapped-out are older: they go first
        ran = [r for r in old_running if r in reqs]
        left_out = [r for r in old_running if r not in reqs and r not in batch.preempted]
        if admitted and left_out:
            # A step of prompts alone: the paper's prefill-first steps, or (mixed, unchunked)
            # a head prompt that fits the budget only alone.
            assert left_out == old_running and not back and not (self.MIXED and self.CHUNKED)
        elif left_out:
            # Old before new: a running request is left out only when the budget is spent,
            # and then every newer one is left out too.
            assert batch.num_tokens == budget
            assert old_running.index(left_out[0]) > max(
                [old_running.index(r) for r in ran], default=-1)
        for i, (r, new) in enumerate(zip(reqs, news)):
            left = r.num_tokens - r.num_computed_tokens
            assert 1 <= new <= left + len(batch.drafts[i])
            table = kv.block_table(r.request_id)
            cut_by_blocks = (kv.pool.num_free == 0
                             and r.num_computed_tokens + new == len(table) * kv.block_size)
            cut_by_budget = i == len(reqs) - 1 and batch.num_tokens == budget
            # All of what is left; with chunked prefill, a chunk cut to the budget (the last
            # row granted) or to the blocks there were (it fills its table).
            assert new == left or (self.CHUNKED and (cut_by_budget or cut_by_blocks))
            if self.CHUNKED:  # blocks for what is computed by the end of this step only
                assert len(table) == cdiv(r.num_computed_tokens + new, kv.block_size)
        for r in admitted:  # a cache hit: whole blocks, and never the last token
            assert r.num_computed_tokens % kv.block_size == 0
            assert r.num_computed_tokens < r.num_tokens
            assert self.CACHING or r.num_computed_tokens == 0
        assert sched.running == [r for r in old_running if r not in batch.preempted] + back \
            + admitted
        if admitted and sched.waiting and len(sched.running) < sched.max_num_seqs:
            nxt = sched.waiting[0]  # admission stopped for budget or blocks, nothing else
            hit = kv.find_cached(nxt.all_token_ids)
            want = 1 if self.CHUNKED else nxt.num_tokens - hit.num_tokens
            assert (batch.num_tokens + want > budget
                    or kv.blocks_needed(nxt.request_id, hit.num_tokens + want
                                        if self.CHUNKED else nxt.num_tokens)
                    - len(hit.blocks)
                    + sum(kv.pool.ref_count(b) == 0 for b in hit.blocks) > kv.pool.num_free)
        recomputed = [r for r in batch.preempted if r.status is Status.WAITING]
        swapped = [r for r in batch.preempted if r.status is Status.SWAPPED]
        assert len(recomputed) + len(swapped) == k and (self.SWAP or not swapped)
        assert list(sched.waiting) == list(reversed(recomputed)) + old_waiting[len(admitted):]
        assert list(sched.swapped) == list(reversed(swapped)) + old_swapped[len(back):]
        for r in batch.preempted:
            assert r.status is Status.SWAPPED or r.num_computed_tokens == 0
            assert kv.block_table(r.request_id) == []
        for r, new in zip(batch.requests, batch.num_new_tokens):
            assert len(kv.block_table(r.request_id)) * kv.block_size \
                >= r.num_computed_tokens + new
        # The step writes its K/V; a token's K/V depend on every token up to it, so a slot
        # holds that whole prefix.
        for r, new in zip(batch.requests, batch.num_new_tokens):
            table, ids = kv.block_table(r.request_id), r.all_token_ids
            for pos in range(r.num_computed_tokens, r.num_computed_tokens + new):
                page = self.pages.setdefault(table[pos // kv.block_size], [None] * kv.block_size)
                page[pos % kv.block_size] = tuple(ids[:pos + 1])
        for r, new in zip(batch.requests, batch.num_new_tokens):  # ... attention reads them
            table, ids = kv.block_table(r.request_id), r.all_token_ids
            first = 0 if self.window is None else max(0, r.num_computed_tokens - self.window + 1)
            assert 0 not in table[first // kv.block_size:], "a block the window reads is gone"
            for pos in range(first, r.num_computed_tokens + new):
                got = self.pages[table[pos // kv.block_size]][pos % kv.block_size]
                assert got == tuple(ids[:pos + 1]), f"{r.request_id} reads another's K/V"
        sampling = [r.num_computed_tokens + new >= r.num_tokens
                    for r, new in zip(batch.requests, batch.num_new_tokens)]
        known = [r.num_tokens for r in batch.requests]
        sched.dispatched(batch)  # as LLMEngine.step
        for r, new in zip(batch.requests, batch.num_new_tokens):
            assert r.num_pending == (r.num_computed_tokens >= r.num_tokens - r.num_pending)
        updated = sched.update_from_output(batch, [[7]] * len(batch.requests))
        # Every row that completed its prompt gets its token; a chunk's sample is dropped.
        assert [r for r, _ in updated] == [r for r, s in zip(batch.requests, sampling) if s]
        for (r, n), k in zip(updated, [k for k, s in zip(known, sampling) if s]):
            assert n == 1 and r.num_tokens == k + 1 and r.num_pending == 0
            assert r.num_computed_tokens == k
            assert r.finished == (r.num_tokens >= r.max_total_tokens)

    def check_swaps(self, batch, back, old_tables) -> None:
        """The copies name exactly the computed blocks of the swapped-out requests' old
        tables and the new tables of those swapped back in; made on the page models, reads
        first, as SwapSpace makes them."""
        kv = self.sched.kv
        out = [(d, h) for d, h in batch.swap_out]
        # A block that several victims share is copied once, their host tables sharing it.
        want_out = {d for r in batch.preempted if r.status is Status.SWAPPED
                    for d in old_tables[r.request_id][:cdiv(r.num_computed_tokens,
                                                            kv.block_size)] if d}
        assert sorted(d for d, _ in out) == sorted(want_out)
        host_of = dict(out) | {0: 0}  # (a released block stays released on the host)
        for r in batch.preempted:
            if r.status is Status.SWAPPED:
                n = cdiv(r.num_computed_tokens, kv.block_size)
                assert kv.host_blocks(r.request_id) == [
                    host_of[d] for d in old_tables[r.request_id][:n]]
        want_in = [d for r in back for d in kv.block_table(r.request_id)[
            :cdiv(r.num_computed_tokens, kv.block_size)] if d]
        assert [d for _, d in batch.swap_in] == want_in
        moved_out = {h: list(self.pages.get(d, [])) for d, h in out}
        moved_in = {d: list(self.host_pages.get(h, [])) for h, d in batch.swap_in}
        self.host_pages.update(moved_out)
        self.pages.update(moved_in)

    @invariant()
    def nothing_lost_nothing_leaked(self):
        sched, kv = self.sched, self.sched.kv
        assert len(sched.running) <= sched.max_num_seqs
        waiting, running, swapped = list(sched.waiting), sched.running, list(sched.swapped)
        everyone = waiting + running + swapped
        assert len(set(map(id, everyone))) == len(everyone)
        for r in self.added:
            places = (r in waiting) + (r in running) + (r in swapped) + r.finished
            assert places == 1, f"{r.request_id} is in {places} places"
        for r in swapped:
            assert r.status is Status.SWAPPED and kv.block_table(r.request_id) == []
        if kv.cpu_pool is not None:
            hosts = [kv.host_blocks(r.request_id) for r in swapped]
            assert [len(h) for h in hosts] == [cdiv(r.num_computed_tokens, kv.block_size)
                                               for r in swapped]
            assert kv.num_swapped_blocks() == len({b for h in hosts for b in h if b})
            for b in {b for h in hosts for b in h if b}:
                assert kv.cpu_pool.ref_count(b) == sum(h.count(b) for h in hosts)
        tables = [kv.block_table(r.request_id) for r in running]
        for r, t in zip(running, tables):  # released entries (0) lead, and only with a window
            n = kv.num_released(r.request_id)
            assert t[:n] == [0] * n and 0 not in t[n:]
            assert n == 0 or (self.window is not None and n * kv.block_size
                              <= r.num_computed_tokens - self.window + 1)
        tables = [t[kv.num_released(r.request_id):] for r, t in zip(running, tables)]
        blocks = [b for t in tables for b in t]
        if not self.CACHING:
            assert len(blocks) == len(set(blocks))  # no block in two tables
        for b in set(blocks):  # one owner per table that holds it, none elsewhere
            assert kv.pool.ref_count(b) == sum(t.count(b) for t in tables)
        assert kv.pool.num_used == len(set(blocks))  # waiting and finished requests hold none
        filled = {}  # token states counted block by block, a shared block once
        for r in running:
            for i, b in enumerate(kv.block_table(r.request_id)):
                n = min(kv.block_size, r.num_computed_tokens - i * kv.block_size)
                if n > 0 and b:
                    filled[b] = max(filled.get(b, 0), n)
        usage = kv.usage({r.request_id: kv.tokens_held(r.request_id, r.num_computed_tokens)
                          for r in running})
        assert usage.token_states == sum(filled.values())
        assert kv.pool.num_free + kv.pool.num_used == kv.pool.num_usable
        for r in running:
            assert r.status is Status.RUNNING
            assert len(kv.block_table(r.request_id)) * kv.block_size >= r.num_computed_tokens
            if self.CHUNKED and r.num_tokens - r.num_computed_tokens > 1:
                # A prompt part-way through holds the blocks of what it computed, no more.
                assert len(kv.block_table(r.request_id)) == cdiv(r.num_computed_tokens,
                                                                 kv.block_size)
        for r in waiting:
            assert r.status is Status.WAITING and r.num_computed_tokens == 0

    def teardown(self):
        if not hasattr(self, "sched"):
            return
        bound = 4 * sum(r.max_total_tokens for r in self.added) + 10
        for _ in range(bound):
            if not self.sched.has_unfinished():
                break
            self.checked_step()
            self.nothing_lost_nothing_leaked()
        assert all(r.finished for r in self.added), "a request never finished"
        assert self.sched.kv.pool.num_free == self.sched.kv.pool.num_usable
        assert self.sched.kv.num_swapped_blocks() == 0


def machine_tests(machine, max_examples: int):
    """The machine as two TestCases: a quarter of the examples in the quick tier, and all of
    them marked slow (CI runs both; `-m "not slow"` keeps the quick tier under 3 minutes)."""
    def case(n: int, suffix: str):
        return type(machine.__name__ + suffix, (machine.TestCase,), dict(settings=settings(
            max_examples=n, stateful_step_count=40, deadline=None)))
    return case(max(10, max_examples // 4), "Quick"), pytest.mark.slow(case(max_examples, ""))


class ChunkedSchedulerMachine(SchedulerMachine):
    MIXED = True
    CACHING = True
    CHUNKED = True

    @initialize(block_size=st.sampled_from([1, 2, 4, 8]), num_blocks=st.integers(2, 40),
                max_num_seqs=st.integers(1, 6), budget=st.integers(1, 24),
                cpu_blocks=st.integers(1, 30))
    def setup(self, block_size, num_blocks, max_num_seqs, budget, cpu_blocks):
        super().setup(block_size, num_blocks, max_num_seqs, budget, cpu_blocks)


def variant(name: str, **flags):
    return type(name, (SchedulerMachine,), flags)


SwapChunkedMachine = type("SwapChunkedMachine", (ChunkedSchedulerMachine,), dict(SWAP=True))
WindowedMachine = type("WindowedMachine", (ChunkedSchedulerMachine,),
                       dict(SWAP=True, WINDOWED=True))
TestSchedulerMachineQuick, TestSchedulerMachine = machine_tests(SchedulerMachine, 70)
TestMixedSchedulerMachineQuick, TestMixedSchedulerMachine = machine_tests(
    variant("MixedSchedulerMachine", MIXED=True), 70)
TestCachingSchedulerMachineQuick, TestCachingSchedulerMachine = machine_tests(
    variant("CachingSchedulerMachine", MIXED=True, CACHING=True), 100)
TestCachingPrefillFirstMachineQuick, TestCachingPrefillFirstMachine = machine_tests(
    variant("CachingPrefillFirstMachine", CACHING=True), 70)
TestChunkedSchedulerMachineQuick, TestChunkedSchedulerMachine = machine_tests(
    ChunkedSchedulerMachine, 100)
TestSwapSchedulerMachineQuick, TestSwapSchedulerMachine = machine_tests(
    variant("SwapSchedulerMachine", SWAP=True), 70)
TestSwapMixedCachingMachineQuick, TestSwapMixedCachingMachine = machine_tests(
    variant("SwapMixedCachingMachine", MIXED=True, CACHING=True, SWAP=True), 70)
TestSwapChunkedMachineQuick, TestSwapChunkedMachine = machine_tests(SwapChunkedMachine, 70)
TestWindowedMachineQuick, TestWindowedMachine = machine_tests(WindowedMachine, 60)
TestWindowedPrefillFirstMachineQuick, TestWindowedPrefillFirstMachine = machine_tests(
    variant("WindowedPrefillFirstMachine", CACHING=True, SWAP=True, WINDOWED=True), 40)


def _token(req: Request, position: int) -> int:
    """The stand-in model's token at a position: a function of the request and position, so a
    token applied to the wrong request or position shows."""
    return 3 + (position * 31 + int(req.request_id[1:]) * 7) % 50


@settings(max_examples=60, deadline=None)
@given(data=st.data(), num_blocks=st.integers(6, 30), budget=st.integers(8, 48),
       mixed=st.booleans(), chunked=st.booleans(), swap=st.booleans(),
       caching=st.booleans())
def test_async_steps_apply_every_token_once_and_in_place(data, num_blocks, budget, mixed,
                                                         chunked, swap, caching):
    """Asynchronous scheduling, as LLMEngine drives it: each step is scheduled and dispatched
    before the previous one's tokens are applied. Every request must end with exactly the
    tokens a synchronous run gives it: its stand-in tokens up to its length limit or its
    first stop token, each once; and every block must come back."""
    chunked = chunked and mixed
    block_size = 4
    kv = KVCacheManager(num_blocks, block_size, enable_caching=caching,
                        num_cpu_blocks=16 if swap else 0)
    sched = Scheduler(kv, 4, budget, mixed=mixed, chunked=chunked, swap=swap)
    max_len = (num_blocks - 1) * block_size if chunked else min(budget, (num_blocks - 1) * 4)
    reqs = []
    for _ in range(data.draw(st.integers(1, 8))):
        total = data.draw(st.integers(2, max_len))
        prompt = data.draw(st.integers(1, total - 1))
        stops = data.draw(st.lists(st.integers(3, 52), max_size=1))
        req = Request(f"r{len(reqs)}", [1 + len(reqs) % 2] * prompt,
                      SamplingParams(max_tokens=total - prompt, stop_token_ids=tuple(stops)),
                      total, seed=0)
        reqs.append(req)
        sched.add(req)
    in_flight = None  # (batch, the positions its sampling rows' tokens take)
    for _ in range(10_000):
        if not sched.has_unfinished() and in_flight is None:
            break
        batch = sched.schedule()
        flight = None
        if batch is not None and batch.requests:
            for r, new in zip(batch.requests, batch.num_new_tokens):
                # Never a row past the request's limit (its last token may still be pending).
                assert r.num_computed_tokens + new <= r.max_total_tokens
                assert r.num_pending <= 1
            sched.dispatched(batch)
            flight = (batch, [r.num_tokens - 1 for r in batch.requests])
        if in_flight is not None:
            done, positions = in_flight
            sched.update_from_output(done, [[_token(r, p)] for r, p in
                                            zip(done.requests, positions)])
        in_flight = flight
    else:
        raise AssertionError("did not finish")
    for req in reqs:
        p = len(req.prompt_token_ids)
        want = []
        for pos in range(p, req.max_total_tokens):
            want.append(_token(req, pos))
            if want[-1] in req.params.stop_token_ids:
                break
        assert req.output_token_ids == want and req.finished and req.num_pending == 0
    assert kv.pool.num_free == kv.pool.num_usable
    if swap:
        assert kv.cpu_pool.num_free == kv.cpu_pool.num_usable
