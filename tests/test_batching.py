"""experiments/batching.py (paper Fig. 12-13) on a tiny model, and its Orca KV view."""
from __future__ import annotations

import json

import pytest

from experiments import batching
from paged_jax.baselines import orca_oracle
from paged_jax.kv_cache_manager import KVCacheManager
from paged_jax.request import Request
from paged_jax.sampling_params import SamplingParams
from paged_jax.scheduler import Scheduler


def test_orca_view_admits_by_buddy_range_and_backs_it_with_blocks():
    kv = KVCacheManager(num_blocks=33, block_size=8)  # 32 usable blocks: 256 slots
    orca = batching.OrcaReservedKV(kv, max_model_len=128)
    sched = Scheduler(orca, max_num_seqs=16, max_num_batched_tokens=512, reservation=orca_oracle())
    for i in range(5):  # prompt 10 + output 30 = 40 slots, a 64-slot range each: 4 fit
        sched.add(Request(f"r{i}", [1] * 10, SamplingParams(max_tokens=30), 40, seed=0))
    batch = sched.schedule()
    assert batch.kind == "prefill" and len(batch.requests) == 4
    assert [len(kv.block_table(f"r{i}")) for i in range(4)] == [5] * 4  # 40 slots in 5 blocks
    assert kv.pool.num_free == 32 - 20  # paged blocks are left, but no 64-slot range is
    sched.finish(batch.requests[0])
    assert not kv.block_table("r0") and "r0" not in orca.contiguous.ranges
    assert sched.schedule().requests[0].request_id == "r4"


def test_scaled_trace_and_sustainable_rate():
    trace = batching.scaled_trace("sharegpt", 200, seed=0, scale=1 / 16, max_model_len=128)
    assert all(p >= 1 and o >= 1 and p + o <= 128 for p, o in trace)
    mean_out = sum(o for _, o in trace) / len(trace)
    assert 15 < mean_out < 30  # 338 / 16 = 21
    assert batching.sustainable_rate([1, 2, 4], [0.1, 0.2, 0.6], 0.4) == pytest.approx(3.0)
    assert batching.sustainable_rate([1, 2], [0.5, 0.6], 0.4) is None
    assert batching.sustainable_rate([1, 2], [0.1, 0.2], 0.4) == 2


def test_main_writes_results_and_paged_batches_more(batching_run):
    proc, tmp_path = batching_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "30.42" in proc.stdout and "paged / orca_oracle" in proc.stdout  # the paper beside ours
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["rates"] == [20.0, 2000.0]
    assert results["config"]["kv_tokens"] == 256 and results["config"]["max_model_len"] == 128
    assert list(results["policies"]) == list(batching.POLICIES)
    for policy, runs in results["policies"].items():
        assert [r["rate"] for r in runs] == [20.0, 2000.0], policy
        for r in runs:
            for key in ("mean_batched_requests", "mean_batched_requests_all_steps",
                        "normalized_latency", "mean_latency", "output_tokens_per_s"):
                assert r[key] > 0, (policy, key)
            assert r["max_batched_requests"] <= 16
            if policy != "paged":
                assert r["preemptions"] == 0  # a reservation never has to grow past its range
    pol = results["policies"]
    assert pol["orca_max"][-1]["max_batched_requests"] <= 2  # 256 slots / 128 reserved
    low, high = ([r["mean_batched_requests"] for r in pol[p]] for p in ("orca_oracle", "paged"))
    assert high[0] >= 0.9 * low[0]  # light load: about the same batches (timing decides)
    assert high[-1] >= 1.3 * low[-1]  # overload: memory decides, and paged fits more
    assert results["summary"]["batch_ratio_paged_over"]["orca_oracle"][-1] == \
        pytest.approx(high[-1] / low[-1])
    assert results["paper"]["fig13_mean_batched_requests"]["paged"] == 30.42
    assert (tmp_path / "batching.png").stat().st_size > 10_000
