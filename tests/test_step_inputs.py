"""step_inputs: a decode step's numpy fast path (build_decode) gives exactly the arrays of the
general row-by-row path (build_rows), on batches a scheduler really makes: random requests,
prefix caching, a sliding window, preemption, and pending tokens of asynchronous steps. Both
fill block tables with table_array, checked here against a row-by-row fill."""
from __future__ import annotations

import dataclasses

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from paged_jax.kv_cache_manager import KVCacheManager
from paged_jax.request import Request
from paged_jax.sampling_params import SamplingParams
from paged_jax.scheduler import Scheduler
from paged_jax.step_inputs import Buckets, build, build_decode, build_rows, table_array


def assert_same(a, b) -> None:
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, np.ndarray):
            assert x.dtype == y.dtype and np.array_equal(x, y), f.name
        else:
            assert x == y, f.name


@settings(max_examples=40, deadline=None)
@given(data=st.data(), num_blocks=st.integers(4, 40), block_size=st.sampled_from([1, 4, 16]),
       caching=st.booleans(), window=st.sampled_from([None, 5]), overlap=st.booleans())
def test_decode_fast_path_equals_the_general_path(data, num_blocks, block_size, caching,
                                                   window, overlap):
    kv = KVCacheManager(num_blocks, block_size, enable_caching=caching, sliding_window=window)
    sched = Scheduler(kv, 8, 256, mixed=True)
    buckets = Buckets.make(8, 256, 256, block_size)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    cap = (num_blocks - 1) * block_size  # (a longer request could never run alone)
    for i in range(data.draw(st.integers(1, 10))):
        prompt = rng.integers(0, 3, data.draw(st.integers(1, min(20, cap - 2)))).tolist()
        out = min(30, cap - len(prompt))
        sched.add(Request(f"r{i}", prompt, SamplingParams(max_tokens=out), len(prompt) + out,
                          seed=i))
    decodes, in_flight = 0, None  # (batch, its sampled rows) not yet applied
    for _ in range(200):
        if not sched.has_unfinished() and in_flight is None:
            break
        batch = sched.schedule()
        flight = None
        if batch is not None and batch.requests:
            prev = ({r.request_id: row for row, r in enumerate(in_flight[0].requests)}
                    if in_flight is not None else None)
            if batch.kind == "decode":
                decodes += 1
                assert_same(build_decode(batch, kv, buckets, prev),
                            build_rows(batch, kv, buckets, prev))
            else:
                assert build(batch, kv, buckets, prev).mode != "decode"
            sched.dispatched(batch)
            flight = (batch,)
        if overlap:  # asynchronous: the step before is applied after this one went out
            flight, in_flight = in_flight, flight
        if flight is not None:
            done = flight[0]
            sched.update_from_output(done, [[int(t)] for t in rng.integers(3, 50, len(
                done.requests))])
    assert decodes > 0


@settings(max_examples=60, deadline=None)
@given(lens=st.lists(st.integers(0, 40), min_size=1, max_size=12), extra_rows=st.integers(0, 5),
       seed=st.integers(0, 2**16))
def test_table_array_is_a_row_by_row_fill(lens, extra_rows, seed):
    rng = np.random.default_rng(seed)
    tables = [rng.integers(1, 1000, n).tolist() for n in lens]
    buckets = Buckets.make(8, 256, 256, 4)
    got = table_array(tables, len(tables) + extra_rows, buckets)
    want = np.zeros((len(tables) + extra_rows, got.shape[1]), np.int32)
    for i, t in enumerate(tables):
        want[i, :len(t)] = t
    assert got.dtype == np.int32 and got.shape[1] >= max(lens)
    assert got.shape[1] in buckets.blocks
    np.testing.assert_array_equal(got, want)
