"""The periodic stats line: throughput since the last line, queues, KV usage and prefix-cache
hit rate every interval while there is work, nothing while idle (captured logs, fed engine
snapshots by hand)."""
from __future__ import annotations

import dataclasses
import logging

import pytest

from paged_jax.kv_cache_manager import KVUsage
from paged_jax.server.stats_logger import StatsLogger
from paged_jax.snapshot import EngineSnapshot

IDLE = EngineSnapshot(
    num_waiting=0, num_running=0, num_swapped=0, kv=KVUsage(0, 100, 0, 0), block_size=16,
    num_free_blocks=100, num_cpu_blocks=0, num_cpu_blocks_used=0, num_preemptions=0,
    num_swapped_out=0, prefix_cache_queries=0, prefix_cache_hits=0, window_released_blocks=0,
    spec_draft_tokens=0,
    spec_accepted_tokens=0, prompt_tokens=0, generation_tokens=0, num_steps=0,
    step_seconds={}, finished={})


def later(snap, **changes):
    return dataclasses.replace(snap, **changes)


def test_a_line_every_interval_while_busy_and_none_while_idle(caplog):
    stats = StatsLogger(interval=5.0)
    caplog.set_level(logging.INFO, logger="paged_jax.stats")
    assert stats.observe(IDLE, now=0.0) is None  # the baseline
    busy = later(IDLE, num_running=3, num_waiting=2, prompt_tokens=400, generation_tokens=100,
                 kv=KVUsage(25, 100, 400, 390), prefix_cache_queries=400,
                 prefix_cache_hits=100)
    assert stats.observe(busy, now=2.0) is None  # before the interval
    line = stats.observe(busy, now=5.0)
    assert line == ("Avg prompt throughput: 80.0 tokens/s, Avg generation throughput: 20.0 "
                    "tokens/s, Running: 3 reqs, Waiting: 2 reqs, Swapped: 0 reqs, KV cache "
                    "usage: 25.0%, Prefix cache hit rate: 25.0%")
    assert caplog.messages == [line]
    # the next line counts only what happened since this one
    more = later(busy, generation_tokens=150, num_waiting=0)
    assert "Avg prompt throughput: 0.0 tokens/s, Avg generation throughput: 10.0" in (
        stats.observe(more, now=10.0))
    # everything finished: one line for the last tokens, then silence
    done = later(more, num_running=0, generation_tokens=160, kv=KVUsage(0, 100, 0, 0))
    assert stats.observe(done, now=15.0) is not None
    assert stats.observe(done, now=20.0) is None and stats.observe(done, now=60.0) is None
    assert len(caplog.messages) == 3


def test_swap_adds_the_host_pool_and_a_bad_interval_is_refused():
    stats = StatsLogger(interval=1.0)
    stats.observe(IDLE, now=0.0)
    swapping = later(IDLE, num_swapped=1, num_cpu_blocks=10, num_cpu_blocks_used=4)
    assert stats.observe(swapping, now=1.0).endswith("Swapped: 1 reqs, KV cache usage: 0.0%, "
                                                     "Prefix cache hit rate: 0.0%, Host KV "
                                                     "usage: 40.0%")
    with pytest.raises(ValueError, match="must be > 0 seconds, got 0"):
        StatsLogger(interval=0)
