"""Preemption by swap: the host-block bookkeeping, the device<->host copies against numpy, and
the engine under a small cache against a run with no preemption at all."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paged_jax import LLM, SamplingParams
from paged_jax.kv_cache_manager import KVCacheManager
from paged_jax.server.metrics import ServerMetrics
from paged_jax.swap import SwapSpace

from test_engine import dense, make_llm, random_prompts, tiny_dir, token_ids  # noqa: F401


# ---- the copies ----------------------------------------------------------------------------

def random_caches(rng, layers=3, hkv=2, n=12, b=4, d=8, dtype=np.float32):
    return [tuple(jnp.asarray(rng.standard_normal((hkv, n, b, d)).astype(dtype))
                  for _ in range(2)) for _ in range(layers)]


def pages(caches, ids):
    """numpy [L, 2, Hkv, len(ids), B, D]"""
    return np.stack([np.stack([np.asarray(k)[:, ids], np.asarray(v)[:, ids]])
                     for k, v in caches])


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_swap_out_then_in_moves_pages_and_touches_nothing_else(dtype):
    rng = np.random.default_rng(0)
    caches = random_caches(rng, dtype=dtype)
    space = SwapSpace(9, caches)
    before = pages(caches, list(range(12)))
    out = [(5, 3), (2, 7), (11, 1)]  # 3 blocks: padded to a bucket of 4
    caches = space.apply(caches, out, [])
    np.testing.assert_array_equal(space.host[:, :, :, [3, 7, 1]], before[:, :, :, [5, 2, 11]])
    # Back into other device blocks, in another order.
    back = [(7, 9), (1, 4), (3, 10)]
    caches = space.apply(caches, [], back)
    after = pages(caches, list(range(12)))
    np.testing.assert_array_equal(after[:, :, :, [9, 4, 10]], before[:, :, :, [2, 11, 5]])
    untouched = [i for i in range(1, 12) if i not in (9, 4, 10)]  # block 0 takes the padding
    np.testing.assert_array_equal(after[:, :, :, untouched], before[:, :, :, untouched])
    assert (space.num_blocks_out, space.num_blocks_in) == (3, 3)
    assert space.num_compiled == 2  # one bucket (4) of each copy


def test_a_step_reads_before_it_writes_on_both_sides():
    """One step swaps block 4 out to host block 2 while another request comes back into
    device block 4 from host block 5; the two copies must not see each other's writes."""
    rng = np.random.default_rng(1)
    caches = random_caches(rng)
    space = SwapSpace(6, caches)
    space.host[:] = rng.standard_normal(space.host.shape)
    dev4, host5 = pages(caches, [4]), space.host[:, :, :, [5]].copy()
    caches = space.apply(caches, [(4, 2)], [(5, 4)])
    np.testing.assert_array_equal(space.host[:, :, :, [2]], dev4)
    np.testing.assert_array_equal(pages(caches, [4]), host5)
    # And a host block freed by a swap-in taken by a swap-out of the same step.
    host3, dev6 = space.host[:, :, :, [3]].copy(), pages(caches, [6])
    caches = space.apply(caches, [(6, 3)], [(3, 7)])
    np.testing.assert_array_equal(pages(caches, [7]), host3)
    np.testing.assert_array_equal(space.host[:, :, :, [3]], dev6)


def test_the_copies_keep_the_caches_sharding():
    mesh = jax.make_mesh((1,), ("tp",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("tp"))
    caches = [tuple(jax.device_put(x, sharding) for x in kv)
              for kv in random_caches(np.random.default_rng(2))]
    space = SwapSpace(4, caches)
    caches = space.apply(caches, [(3, 1)], [])
    caches = space.apply(caches, [], [(1, 5)])
    assert all(x.sharding == sharding for kv in caches for x in kv)
    np.testing.assert_array_equal(pages(caches, [5]), pages(caches, [3]))


# ---- the bookkeeping -----------------------------------------------------------------------

def test_swap_out_keeps_computed_blocks_only_and_swap_in_gives_a_new_table():
    kv = KVCacheManager(10, 4, num_cpu_blocks=4)
    assert kv.allocate("a", 11)  # 3 blocks
    table = kv.block_table("a")
    copies = kv.swap_out("a", 6)  # 6 computed tokens: 2 blocks go to the host
    assert [d for d, _ in copies] == table[:2]
    assert kv.block_table("a") == [] and kv.pool.num_used == 0
    assert kv.num_swapped_blocks() == 2
    assert kv.allocate("b", 4 * 8)  # the device fills up meanwhile
    assert kv.swap_in("a", 7) is None  # no room: nothing changes
    assert kv.num_swapped_blocks() == 2 and kv.block_table("a") == []
    kv.free("b")
    back = kv.swap_in("a", 7)
    assert [h for h, _ in back] == [h for _, h in copies]
    assert [d for _, d in back] == kv.block_table("a")  # 2 blocks hold 7 tokens
    assert kv.num_swapped_blocks() == 0


def test_swap_out_needs_room_on_the_host_and_free_releases_host_blocks():
    kv = KVCacheManager(10, 4, num_cpu_blocks=2)
    assert kv.allocate("a", 12) and kv.allocate("b", 8)
    assert kv.swap_out("a", 12) is None  # 3 blocks, 2 on the host
    assert len(kv.block_table("a")) == 3
    assert kv.swap_out("b", 8) is not None
    kv.free("b")  # an abort while swapped out
    assert kv.num_swapped_blocks() == 0 and kv.cpu_pool.num_free == 2


# ---- the engine ----------------------------------------------------------------------------

# Greedy, with each chosen token's log-probability: these must match the unpreempted run's to
# float tolerance after every swap. (Seeded sampling is not compared: a draw that lands within
# rounding of a CDF boundary may pick the neighbouring token in any other batch composition.)
PARAMS = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, logprobs=0)


def run(llm, prompts, params):
    outs = llm.generate(prompts, params, use_tqdm=False)
    return token_ids(outs), outs


def assert_nothing_held(engine):
    assert engine.kv.pool.num_free == engine.kv.pool.num_usable
    assert engine.kv.num_swapped_blocks() == 0
    assert not engine.scheduler.swapped


@pytest.mark.parametrize("opts", [
    dict(), dict(attention_backend="xla"), dict(mixed_batches=False),
    dict(enable_chunked_prefill=True, max_num_batched_tokens=24),
    dict(enable_prefix_caching=False)])
def test_swapping_under_a_small_cache_gives_the_outputs_of_a_large_one(tiny_dir, opts):
    prompts = random_prompts(10, 3, 20, 40)
    big = make_llm(tiny_dir, **opts)
    small = make_llm(tiny_dir, num_kv_blocks=9, preemption_mode="swap", num_cpu_blocks=64,
                     **opts)  # 8 usable device blocks: 128 token slots for 10 requests
    want, want_outs = run(big, prompts, PARAMS)
    got, outs = run(small, prompts, PARAMS)
    assert got == want
    np.testing.assert_allclose([o.outputs[0].cumulative_logprob for o in outs],
                               [o.outputs[0].cumulative_logprob for o in want_outs], rtol=1e-5)
    engine = small.llm_engine
    sched = engine.scheduler
    assert sched.num_swapped_out > 0 and sched.num_swapped_out == sched.num_preemptions
    assert sum(o.num_preemptions for o in outs) > 0
    space = engine.runner.swap_space
    assert space.num_blocks_out == space.num_blocks_in > 0
    # Nothing was recomputed: every prompt was admitted once.
    assert engine.stats.prompt_tokens == sum(len(p["prompt_token_ids"]) for p in prompts)
    assert_nothing_held(engine)


def test_samples_sharing_their_prompt_swap_it_out_once_a_step(tiny_dir):
    """n = 3 greedy samples share their prompt's blocks (and, being equal, their outputs'
    full blocks); under a small cache they are preempted together, and each shared block
    goes to the host once."""
    prompts = random_prompts(3, 6, 40, 60)
    params = SamplingParams(n=3, temperature=0.0, max_tokens=40, ignore_eos=True)
    small = make_llm(tiny_dir, num_kv_blocks=12, preemption_mode="swap", num_cpu_blocks=64)
    outs = small.generate(prompts, params, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        want = dense(small, prompt, 40)
        assert [c.token_ids for c in out.outputs] == [want] * 3
    engine = small.llm_engine
    assert engine.scheduler.num_swapped_out > 0
    space = engine.runner.swap_space
    assert space.num_blocks_out < space.num_blocks_in  # shared blocks went out once
    assert_nothing_held(engine)


def test_too_few_host_blocks_falls_back_to_recompute(tiny_dir):
    prompts = random_prompts(10, 4, 20, 40)
    want, _ = run(make_llm(tiny_dir), prompts, PARAMS)
    llm = make_llm(tiny_dir, num_kv_blocks=9, preemption_mode="swap", num_cpu_blocks=3)
    got, _ = run(llm, prompts, PARAMS)
    assert got == want
    sched = llm.llm_engine.scheduler
    assert 0 < sched.num_swapped_out < sched.num_preemptions
    assert_nothing_held(llm.llm_engine)


def test_aborting_a_swapped_out_request_frees_its_host_blocks(tiny_dir):
    llm = make_llm(tiny_dir, num_kv_blocks=9, preemption_mode="swap", num_cpu_blocks=64)
    engine = llm.llm_engine
    for i, p in enumerate(random_prompts(10, 5, 20, 40)):
        engine.add_request(str(i), p, PARAMS)
    while not engine.scheduler.swapped:
        engine.step()
    victim = engine.scheduler.swapped[0]
    assert engine.kv.num_swapped_blocks() > 0
    metrics = ServerMetrics("m")  # what the server exports meanwhile
    metrics.update(engine.snapshot())
    sample = lambda name: metrics.registry.get_sample_value(  # noqa: E731
        "paged_jax:" + name, {"model_name": "m"})
    assert sample("num_requests_swapped") == len(engine.scheduler.swapped)
    assert sample("cpu_cache_usage_perc") == engine.kv.num_swapped_blocks() / 64
    assert sample("num_preemptions_total") == engine.scheduler.num_preemptions
    engine.abort_request(victim.request_id)
    assert victim.finish_reason == "abort" and victim not in engine.scheduler.swapped
    while engine.has_unfinished_requests():
        engine.step()
    assert_nothing_held(engine)


@pytest.mark.parametrize("opts, message", [
    (dict(preemption_mode="move"), "preemption_mode must be one of"),
    (dict(preemption_mode="swap", swap_space_bytes=100), "swap_space_bytes 100 holds no block"),
    (dict(num_cpu_blocks=0), "num_cpu_blocks must be >= 1"),
    (dict(swap_space_bytes=-1), "swap_space_bytes must be >= 0")])
def test_bad_swap_options_name_the_value(tiny_dir, opts, message):
    with pytest.raises(ValueError, match=message):
        LLM(str(tiny_dir), num_kv_blocks=16, max_model_len=64, **opts)
