"""Automatic prefix caching: the host bookkeeping (hashes, hits, eviction, all-or-nothing
allocation) and the engine, whose outputs with shared blocks must equal a dense run's."""
import numpy as np
import pytest

from paged_jax import SamplingParams
from paged_jax.block_pool import BlockPool
from paged_jax.kv_cache_manager import KVCacheManager
from paged_jax.prefix_cache import block_hashes, hash_block
from test_engine import GREEDY, dense, make_llm, tiny_dir  # noqa: F401 (fixture)

B = 4


def manager(num_blocks=16):
    return KVCacheManager(num_blocks, B, enable_caching=True)


def admit(kv, rid, tokens):
    hit = kv.find_cached(tokens)
    assert kv.allocate(rid, len(tokens), hit)
    kv.cache_blocks(rid, tokens)
    return hit


def test_a_waiting_prompt_is_hashed_once(monkeypatch):
    from paged_jax import prefix_cache
    kv = manager()
    admit(kv, "a", list(range(12)))
    calls = []
    real = prefix_cache.hash_block
    monkeypatch.setattr(prefix_cache, "hash_block", lambda *a: calls.append(1) or real(*a))
    tokens, known = list(range(8)) + [50] * 9, []
    first = kv.find_cached(tokens, known)
    assert len(calls) == 4 and len(known) == 4  # the last token's block is never looked up
    again = kv.find_cached(tokens, known)
    assert len(calls) == 4 and again == first == kv.find_cached(tokens)
    assert again.num_tokens == 8  # blocks 0 and 1 are cached, block 2 differs
    kv.find_cached(tokens + [7] * 4, known)  # tokens only grow: one more block is hashed
    assert len(calls) == 4 + 4 + 1


def test_decode_steps_register_blocks_only_when_they_fill_one(monkeypatch):
    import test_scheduler as ts
    sched = ts.make_scheduler(block_size=4, mixed=True)
    sched.kv.enable_caching = True
    registered = []
    real = sched.kv.cache_blocks
    monkeypatch.setattr(sched.kv, "cache_blocks",
                        lambda rid, toks: registered.append(len(toks)) or real(rid, toks))
    req = ts.make_request(6, 10)
    sched.add(req)
    for _ in range(9):  # the prompt, then decodes at 7, 8, ..., 14 tokens
        ts.engine_step(sched)
    # Registered at admission (6 tokens: block 1) and when tokens 8 and 12 fill blocks 2, 3.
    assert registered == [6, 8, 12]
    hit = sched.kv.find_cached(req.all_token_ids)
    assert hit.num_tokens == 12 and hit.blocks == tuple(sched.kv.block_table(req.request_id)[:3])


def test_hashes_chain_through_the_prefix():
    a = block_hashes([1, 2, 3, 4, 5, 6, 7, 8], B)
    b = block_hashes([9, 9, 9, 9, 5, 6, 7, 8], B)
    assert len(a) == 2 and a[1] != b[1]  # same block, different prefix
    assert a == block_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9], B)  # partial blocks have no hash
    assert block_hashes([1, 2, 3, 4, 5, 6, 7, 8], B, start=a[:1]) == a
    assert hash_block(None, [1, 2, 3, 4]) != hash_block(None, [1, 2, 3, 5])


def test_a_shared_prompt_is_found_block_by_block_leaving_the_last_token():
    kv = manager()
    prompt = list(range(10, 22))  # 12 tokens: 3 full blocks
    assert admit(kv, "a", prompt).num_tokens == 0
    table_a = kv.block_table("a")
    hit = admit(kv, "b", prompt)
    # The third block would cover the last token, whose logits must be computed: not taken.
    assert hit.blocks == tuple(table_a[:2]) and hit.num_tokens == 8
    assert kv.block_table("b")[:2] == table_a[:2] and kv.block_table("b")[2] != table_a[2]
    assert [kv.pool.ref_count(x) for x in table_a] == [2, 2, 1]
    assert kv.find_cached(prompt[:6] + [99] * 6).num_tokens == 4  # diverges in block 2
    assert kv.find_cached([99] + prompt[1:]).num_tokens == 0


def test_freed_blocks_stay_cached_until_evicted_least_recently_freed_first():
    kv = manager(num_blocks=9)  # 8 usable
    admit(kv, "a", list(range(9)))  # 3 blocks, 2 full
    kv.free("a")
    assert kv.pool.num_free == 8 and kv.pool.num_cached == 2
    hit = admit(kv, "b", list(range(9)) + [5])  # taken back off the free list
    assert hit.num_tokens == 8 and kv.pool.num_free == 5
    kv.free("b")
    kv.allocate("c", 4 * B)  # 4 of 8 free: the never-cached blocks go first
    assert kv.pool.num_evicted == 0 and kv.find_cached(list(range(9))).num_tokens == 8
    kv.allocate("d", 4 * B)  # now the cached ones must be evicted
    assert kv.pool.num_evicted == 2 and kv.find_cached(list(range(9))).num_tokens == 0
    kv.free("c")
    kv.free("d")
    assert kv.pool.num_free == kv.pool.num_usable


def test_allocation_with_a_hit_is_all_or_nothing():
    kv = manager(num_blocks=7)  # 6 usable
    prompt = list(range(13))  # 4 blocks, 3 full
    admit(kv, "a", prompt)
    kv.free("a")  # 3 cached blocks on the free list of 6
    kv.allocate("x", 2 * B)  # 4 free left, never-cached blocks taken first
    hit = kv.find_cached(prompt + list(range(11)))  # 24 tokens: 3 hit + 3 new blocks
    assert len(hit.blocks) == 3
    assert not kv.allocate("b", 24, hit)  # 3 reclaimed + 3 new > 4 free
    assert kv.block_table("b") == [] and kv.pool.num_free == 4
    assert all(kv.pool.ref_count(b) == 0 for b in hit.blocks)
    assert kv.allocate("b", 16, hit)  # 3 reclaimed + 1 new
    assert kv.pool.num_free == 0


def test_two_requests_computing_the_same_block_keep_the_first_mapping():
    kv = manager()
    kv.allocate("a", 8)
    kv.allocate("b", 8)
    kv.cache_blocks("a", list(range(8)))
    kv.cache_blocks("b", list(range(8)))
    hit = kv.find_cached(list(range(9)))
    assert hit.blocks == tuple(kv.block_table("a"))
    kv.free("a")
    kv.free("b")
    assert kv.pool.num_cached == 2 and kv.pool.num_free == kv.pool.num_usable


def test_shared_blocks_count_their_tokens_once():
    kv = manager()
    prompt = list(range(10))
    admit(kv, "a", prompt)
    admit(kv, "b", prompt)
    usage = kv.usage({"a": 10, "b": 10})
    assert usage.used_blocks == 4  # 2 shared + one partial block each
    assert usage.token_states == 8 + 2 + 2


def test_caching_off_finds_nothing_and_registers_nothing():
    kv = KVCacheManager(16, B)
    admit(kv, "a", list(range(12)))
    assert kv.find_cached(list(range(12))).num_tokens == 0 and kv.pool.num_cached == 0


def test_a_free_uncached_block_cannot_be_taken_back():
    pool = BlockPool(4)
    a = pool.allocate(1)
    pool.free(a)
    with pytest.raises(ValueError, match="free"):
        pool.share(a)
    with pytest.raises(ValueError, match="free"):
        pool.register(a[0], b"h")


# ---- the engine -----------------------------------------------------------------------------

def shared_prefix_prompts(n, prefix_len, seed):
    rng = np.random.default_rng(seed)
    stem = rng.integers(3, 49152, prefix_len).tolist()
    return [{"prompt_token_ids": stem + rng.integers(3, 49152, int(k)).tolist()}
            for k in rng.integers(1, 20, n)]


@pytest.mark.parametrize("backend", ["auto", "xla"])
def test_prompts_sharing_a_prefix_equal_dense_and_skip_its_blocks(tiny_dir, backend):
    llm = make_llm(tiny_dir, attention_backend=backend)
    engine = llm.llm_engine
    engine.kv.pool = BlockPool(engine.kv.pool.num_blocks, shuffle_seed=5)
    prompts = shared_prefix_prompts(6, 37, seed=0)  # 2 full blocks of 16 shared
    done, shared_seen, modes = {}, False, []
    dispatch = engine.runner.dispatch

    def recording_dispatch(inputs, sampling, prev=None):
        modes.append(inputs.mode)
        return dispatch(inputs, sampling, prev)

    engine.runner.dispatch = recording_dispatch
    # Two together (sharing within one step), then one arrival per step while others decode.
    engine.add_request("0", prompts[0], GREEDY)
    engine.add_request("1", prompts[1], GREEDY)
    for i, prompt in enumerate(prompts[2:], 2):
        for out in engine.step():
            done[out.request_id] = out
        shared_seen |= any(engine.kv.pool.ref_count(b) > 1 for r in engine.scheduler.running
                           for b in engine.kv.block_table(r.request_id))
        engine.add_request(str(i), prompt, GREEDY)
    while engine.has_unfinished_requests():
        for out in engine.step():
            done[out.request_id] = out
    for i, prompt in enumerate(prompts):
        assert done[str(i)].outputs[0].token_ids == dense(llm, prompt, 20)
    assert done["0"].num_cached_tokens == 0
    assert all(done[str(i)].num_cached_tokens == 32 for i in range(1, 6))
    assert shared_seen and "mixed" in modes
    stats = engine.kv.cache_stats
    assert stats.hits == 5 * 32
    assert stats.queries == sum(len(p["prompt_token_ids"]) for p in prompts)
    assert engine.stats.prompt_tokens == stats.queries
    assert engine.kv.pool.num_free == engine.kv.pool.num_usable


def test_parallel_samples_share_the_prompt_and_match_caching_off(tiny_dir):
    # 86 tokens: L + 10 = 96 ends a block, so cdiv(L + 11, 16) would be one more.
    prompt = {"prompt_token_ids": shared_prefix_prompts(1, 86, seed=1)[0]["prompt_token_ids"][:86]}
    params = SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=12, ignore_eos=True)
    outs, peaks = {}, {}
    for caching in (True, False):
        llm = make_llm(tiny_dir, enable_prefix_caching=caching)
        engine = llm.llm_engine
        engine.add_request("p", prompt, params)
        peak = 0
        while engine.has_unfinished_requests():
            for out in engine.step():
                outs[caching] = out
            peak = max(peak, engine.kv.pool.num_used)
        peaks[caching] = peak
        assert engine.kv.pool.num_free == engine.kv.pool.num_usable
    assert [o.token_ids for o in outs[True].outputs] == [o.token_ids for o in outs[False].outputs]
    # Peaks are read between steps, so the last one seen is after the step that computed
    # token L + 10 (the step computing L + 11 also finishes the sample and frees its blocks):
    # cdiv(L + 10, 16) blocks a sample; with caching the prompt's full blocks, all but the
    # one holding its last token, are held once.
    length = len(prompt["prompt_token_ids"])
    each, shared = -(-(length + 10) // 16), (length - 1) // 16
    assert (each, shared) == (6, 5) and peaks[False] == 4 * each
    assert peaks[True] == shared + 4 * (each - shared)
    assert outs[True].num_cached_tokens == shared * 16


def test_preempted_requests_come_back_through_the_cache(tiny_dir):
    prompts = shared_prefix_prompts(8, 20, seed=2)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    llm = make_llm(tiny_dir, num_kv_blocks=12)
    outs = llm.generate(prompts, params, use_tqdm=False)
    engine = llm.llm_engine
    assert engine.scheduler.num_preemptions > 0
    assert engine.kv.cache_stats.hits > 16 * 7  # more than the shared stem: recomputes hit
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == dense(llm, prompt, 40)
    assert engine.kv.pool.num_free == engine.kv.pool.num_usable


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_a_step_that_fails_leaves_no_unwritten_block_in_the_cache(tiny_dir, error):
    """Scheduling registers the blocks a step is to compute; if the step never runs (an
    error, Ctrl-C), a later request with the same prompt must not read them."""
    llm = make_llm(tiny_dir)
    engine = llm.llm_engine
    prompts = shared_prefix_prompts(3, 20, seed=4)
    dispatch = engine.runner.dispatch

    def failing_dispatch(inputs, sampling, prev=None):
        raise error("the device went away")

    engine.runner.dispatch = failing_dispatch
    with pytest.raises(error):
        llm.generate(prompts, GREEDY, use_tqdm=False)
    engine.runner.dispatch = dispatch
    assert engine.kv.pool.num_cached == 0
    assert engine.kv.pool.num_free == engine.kv.pool.num_usable  # generate aborted them
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == dense(llm, prompt, 20)


def test_reset_prefix_cache_forgets_every_block(tiny_dir):
    llm = make_llm(tiny_dir)
    prompts = shared_prefix_prompts(2, 20, seed=5)
    llm.generate(prompts, GREEDY, use_tqdm=False)
    kv = llm.llm_engine.kv
    assert kv.pool.num_cached > 0
    llm.reset_prefix_cache()
    assert kv.pool.num_cached == 0 and kv.find_cached(prompts[0]["prompt_token_ids"]).blocks == ()
    before = kv.cache_stats.hits
    outs = llm.generate(prompts[:1], GREEDY, use_tqdm=False)
    assert kv.cache_stats.hits == before  # nothing found
    assert outs[0].outputs[0].token_ids == dense(llm, prompts[0], 20)
