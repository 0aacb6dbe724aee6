"""Asynchronous scheduling (EngineConfig.async_scheduling): step N+1 is scheduled and
dispatched before step N's tokens reach the host. It must give exactly the tokens of
synchronous steps, whatever the batch does (preemption both ways, prefix caching, chunked
prefill, n > 1, beam search, drafts), waste at most a row per late stop, and leak nothing."""
import logging

import numpy as np
import pytest

from paged_jax import BeamSearchParams, SamplingParams

from test_engine import make_llm, random_prompts, tiny_dir  # noqa: F401


def seeded(i: int, **kw) -> SamplingParams:
    """Odd requests greedy, even ones sampled with their own seed (and a top-k/top-p)."""
    if i % 2:
        return SamplingParams(temperature=0.0, max_tokens=10 + i % 4, ignore_eos=True, **kw)
    return SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=100 + i,
                          max_tokens=10 + i % 4, ignore_eos=True, **kw)


def record_order(engine) -> list[str]:
    """'d' for each dispatch, 'f' for each fetch of a step's results, in order."""
    order = []
    dispatch, fetch = engine.runner.dispatch, engine.runner.fetch

    def recording_dispatch(*args, **kw):
        order.append("d")
        return dispatch(*args, **kw)

    def recording_fetch(*args, **kw):
        order.append("f")
        return fetch(*args, **kw)

    engine.runner.dispatch, engine.runner.fetch = recording_dispatch, recording_fetch
    return order


def overlapped(order: list[str]) -> int:
    """Dispatches made while an earlier step was still in flight (its results not fetched)."""
    count = in_flight = 0
    for event in order:
        if event == "d":
            count += in_flight > 0
            in_flight += 1
        else:
            in_flight -= 1
    return count


def run(llm, prompts, params, n=1):
    engine = llm.llm_engine
    for i, prompt in enumerate(prompts):
        p = params[i] if isinstance(params, list) else params
        if n > 1:
            p = SamplingParams(**{**vars(p), "n": n})
        engine.add_request(str(i), prompt, p)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            done[out.request_id] = out
    return [done[str(i)] for i in range(len(prompts))]


def summary(outs):
    return [[(c.token_ids, c.finish_reason, c.stop_reason, c.text) for c in o.outputs]
            for o in outs]


def assert_nothing_held(engine):
    assert engine.kv.pool.num_free == engine.kv.pool.num_usable
    assert not engine.has_unfinished_requests() and engine._inflight is None
    if engine.kv.cpu_pool is not None:
        assert engine.kv.cpu_pool.num_free == engine.kv.cpu_pool.num_usable


@pytest.mark.parametrize("opts", [
    dict(),
    # preemption by recompute, and prompts in chunks
    dict(num_kv_blocks=9, enable_chunked_prefill=True, max_num_batched_tokens=24),
    # (swap under asynchronous steps: the full tier, for CI's time; swap alone and
    # asynchronous steps under recompute run in CI)
    pytest.param(dict(num_kv_blocks=9, preemption_mode="swap", num_cpu_blocks=64),
                 marks=pytest.mark.full),
    # (prefill-first steps: the paper's baseline, not the default; in the full tier)
    pytest.param(dict(mixed_batches=False), marks=pytest.mark.full),
], ids=["default", "recompute-chunked", "swap", "prefill-first"])
def test_async_steps_give_the_tokens_of_synchronous_ones(tiny_dir, opts):
    # Prompts sharing a stem, so that prefix-cache hits and a preempted request's blocks
    # come into play.
    rng = np.random.default_rng(3)
    stem = rng.integers(3, 49152, 20).tolist()
    prompts = [{"prompt_token_ids": (stem if i % 3 == 0 else []) + p["prompt_token_ids"]}
               for i, p in enumerate(random_prompts(8, 4, 3, 30))]
    params = [seeded(i, logprobs=1 if i == 3 else None) for i in range(len(prompts))]
    want = run(make_llm(tiny_dir, **opts), prompts, params)
    llm = make_llm(tiny_dir, async_scheduling=True, **opts)
    order = record_order(llm.llm_engine)
    got = run(llm, prompts, params)
    assert summary(got) == summary(want)
    np.testing.assert_allclose([lp[t].logprob for t, lp in zip(got[3].outputs[0].token_ids,
                                                               got[3].outputs[0].logprobs)],
                               [lp[t].logprob for t, lp in zip(want[3].outputs[0].token_ids,
                                                               want[3].outputs[0].logprobs)],
                               rtol=1e-5)
    # The steps really overlapped: most were dispatched while the one before was in flight.
    assert overlapped(order) >= order.count("d") // 2, order
    engine = llm.llm_engine
    if "num_kv_blocks" in opts:
        assert engine.scheduler.num_preemptions > 0
    if opts.get("preemption_mode") == "swap":
        assert engine.scheduler.num_swapped_out > 0
    assert_nothing_held(engine)


def test_parallel_samples_and_beam_search_match_synchronous_steps(tiny_dir):
    prompts = random_prompts(4, 7, 5, 30)
    params = [seeded(i) for i in range(4)]
    want = run(make_llm(tiny_dir), prompts, params, n=3)
    llm = make_llm(tiny_dir, async_scheduling=True)
    assert summary(run(llm, prompts, params, n=3)) == summary(want)
    beams = BeamSearchParams(3, 6, ignore_eos=True)
    want_beams = make_llm(tiny_dir).beam_search(prompts[:2], beams)
    got_beams = llm.beam_search(prompts[:2], beams)
    assert ([[s.tokens for s in o.sequences] for o in got_beams]
            == [[s.tokens for s in o.sequences] for o in want_beams])
    assert_nothing_held(llm.llm_engine)


def test_a_stop_seen_late_wastes_a_row_never_changes_the_output(tiny_dir):
    """A stop token or string is found when a step's tokens reach the host, after the next
    step was dispatched with a row for that request: the row's token is dropped."""
    prompts = random_prompts(6, 11, 3, 20)
    free_run = run(make_llm(tiny_dir), prompts, seeded(1))
    outs = [o.outputs[0] for o in free_run]
    # Each request stops at a token (or the text of one) from the middle of its free run.
    params = []
    for i, out in enumerate(outs):
        mid = out.token_ids[len(out.token_ids) // 2]
        if i % 2 and out.text:
            params.append(SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True,
                                         stop=[out.text[len(out.text) // 2:][:3]]))
        else:
            params.append(SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True,
                                         stop_token_ids=[mid]))
    sync = make_llm(tiny_dir)
    rows = {}
    for name, llm in (("sync", sync), ("async", make_llm(tiny_dir, async_scheduling=True))):
        count, dispatch = [], llm.llm_engine.runner.dispatch

        def counting(inputs, *args, count=count, dispatch=dispatch):
            count.append(inputs.num_seqs)
            return dispatch(inputs, *args)

        llm.llm_engine.runner.dispatch = counting
        got = run(llm, prompts, params)
        if name == "sync":
            want = got
        rows[name] = sum(count)
        assert_nothing_held(llm.llm_engine)
    assert summary(got) == summary(want)
    assert all(o.outputs[0].finish_reason == "stop" for o in want)
    # At most one wasted row a request that stopped early.
    assert rows["sync"] <= rows["async"] <= rows["sync"] + len(prompts)


def test_penalties_and_drafts_run_synchronously_and_say_so(tiny_dir, caplog):
    prompts = random_prompts(4, 12, 3, 20)
    params = [seeded(i) for i in range(4)]
    params[2] = SamplingParams(temperature=0.0, max_tokens=4, repetition_penalty=1.3,
                               ignore_eos=True)
    want = run(make_llm(tiny_dir), prompts, params)
    caplog.set_level(logging.INFO, logger="paged_jax.engine")
    llm = make_llm(tiny_dir, async_scheduling=True)
    order = record_order(llm.llm_engine)
    assert summary(run(llm, prompts, params)) == summary(want)
    assert "asynchronous scheduling paused: request '2' uses penalties" in caplog.text
    assert "asynchronous scheduling resumed" in caplog.text  # once it finished
    assert overlapped(order) > 0  # the steps after it overlapped again
    caplog.set_level(logging.WARNING, logger="paged_jax.plan")
    spec = dict(speculative_method="ngram", num_speculative_tokens=3)
    want = run(make_llm(tiny_dir, **spec), prompts, seeded(1))
    llm = make_llm(tiny_dir, async_scheduling=True, **spec)
    assert "async_scheduling: off with speculative decoding" in caplog.text
    assert not llm.llm_engine.plan.async_scheduling
    assert summary(run(llm, prompts, seeded(1))) == summary(want)


def test_an_abort_between_async_steps_frees_everything(tiny_dir):
    prompts = random_prompts(5, 13, 3, 30)
    llm = make_llm(tiny_dir, async_scheduling=True)
    engine = llm.llm_engine
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, seeded(i))
    for _ in range(4):
        engine.step()
    assert engine._inflight is not None
    engine.abort_request(["1", "3"])  # while a step holding them is on the device
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            done[out.request_id] = out
    assert "1" not in done and "3" not in done
    want = run(make_llm(tiny_dir), [prompts[i] for i in (0, 2, 4)],
               [seeded(i) for i in (0, 2, 4)])
    assert summary([done[k] for k in ("0", "2", "4")]) == summary(want)
    assert_nothing_held(engine)


def test_a_failure_applying_a_step_fails_the_requests_of_both_steps_in_play(tiny_dir):
    """A step's results fail to arrive while the next step is already dispatched: the
    requests of both are failed (either may be half-advanced), nothing leaks, and the
    engine serves the next request."""
    from paged_jax.engine import StepError

    llm = make_llm(tiny_dir, async_scheduling=True)
    engine = llm.llm_engine
    for i, prompt in enumerate(random_prompts(3, 14, 3, 20)):
        engine.add_request(str(i), prompt, seeded(i))
    engine.step()
    engine.step()
    fetch = engine.runner.fetch

    def failing(*args):
        raise RuntimeError("the results went missing")

    engine.runner.fetch = failing
    with pytest.raises(StepError) as info:
        engine.step()
    engine.runner.fetch = fetch
    assert sorted(info.value.request_ids) == ["0", "1", "2"]
    assert_nothing_held(engine)
    want = run(make_llm(tiny_dir), random_prompts(1, 15), [seeded(1)])
    assert summary(run(llm, random_prompts(1, 15), [seeded(1)])) == summary(want)
