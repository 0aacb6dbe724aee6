"""EngineSnapshot: what the engine shows of itself, in one frozen value.

Metrics, the server's engine loop, the notebooks and the experiments read the engine through
`LLMEngine.snapshot()` instead of reaching into its scheduler, KV manager and counters, so
that those can change shape without breaking their readers. No JAX here.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

from paged_jax.kv_cache_manager import KVUsage


@dataclasses.dataclass(frozen=True)
class RequestView:
    """One sequence as the scheduler holds it (LLMEngine.snapshot(with_requests=True))."""
    request_id: str
    status: str  # "waiting" | "running" | "swapped"
    num_prompt_tokens: int
    num_tokens: int  # prompt + generated so far
    num_computed_tokens: int  # tokens whose K/V are in the cache
    block_table: tuple[int, ...]  # physical device blocks, logical order ((): none held)
    num_preemptions: int


@dataclasses.dataclass(frozen=True)
class EngineSnapshot:
    # queues
    num_waiting: int
    num_running: int
    num_swapped: int
    # the device KV pool (kv.usage: used / usable blocks; token states vs. allocated slots)
    kv: KVUsage
    block_size: int
    num_free_blocks: int
    # the host pool of swapped-out blocks (0 and 0 without preemption by swap)
    num_cpu_blocks: int
    num_cpu_blocks_used: int
    # running totals since the engine started
    num_preemptions: int  # by recompute or swap
    num_swapped_out: int  # by swap
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache ...
    prefix_cache_hits: int  # ... and those whose K/V it supplied
    window_released_blocks: int  # blocks given back once every layer's window passed them
    spec_draft_tokens: int  # speculative tokens computed ...
    spec_accepted_tokens: int  # ... and kept
    prompt_tokens: int  # of admitted prompts (a preempted request's again), cached included
    generation_tokens: int
    num_steps: int  # steps that ran on the device
    # seconds in each phase of step(), summed: schedule, build, device, update
    step_seconds: Mapping[str, float]
    finished: Mapping[str, int]  # finish reason -> sequences
    requests: tuple[RequestView, ...] = ()  # with_requests=True: every unfinished sequence
    batched_tokens: int = 0  # tokens the steps computed (iteration_tokens_total)

    @property
    def cpu_usage(self) -> float:
        return self.num_cpu_blocks_used / self.num_cpu_blocks if self.num_cpu_blocks else 0.0

    @property
    def num_unfinished(self) -> int:
        return self.num_waiting + self.num_running + self.num_swapped
