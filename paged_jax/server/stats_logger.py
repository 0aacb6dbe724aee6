"""The periodic stats line in the server log, as vLLM prints it: throughput since the last line,
queues, KV usage and the prefix cache's hit rate, every `interval` seconds while there is work,
nothing while the server is idle. Fed one EngineSnapshot after each engine step."""
from __future__ import annotations

import logging

from paged_jax.snapshot import EngineSnapshot

log = logging.getLogger("paged_jax.stats")
DEFAULT_INTERVAL = 10.0  # seconds, vLLM's VLLM_LOG_STATS_INTERVAL


class StatsLogger:
    def __init__(self, interval: float = DEFAULT_INTERVAL):
        if not interval > 0:
            raise ValueError(f"the stats interval must be > 0 seconds, got {interval}")
        self.interval = interval
        self._last: EngineSnapshot | None = None  # at the last line (or the first step)
        self._last_time = 0.0

    def observe(self, snap: EngineSnapshot, now: float) -> str | None:
        """Logs (and returns) the stats line if `interval` has passed since the last one and
        the engine did some work in between; otherwise None."""
        if self._last is None:
            self._last, self._last_time = snap, now
            return None
        elapsed = now - self._last_time
        if elapsed < self.interval:
            return None
        last, self._last, self._last_time = self._last, snap, now
        prompt = snap.prompt_tokens - last.prompt_tokens
        generated = snap.generation_tokens - last.generation_tokens
        if not prompt and not generated and not snap.num_unfinished:
            return None  # idle: silent
        queries = snap.prefix_cache_queries - last.prefix_cache_queries
        hits = snap.prefix_cache_hits - last.prefix_cache_hits
        line = (f"Avg prompt throughput: {prompt / elapsed:.1f} tokens/s, Avg generation "
                f"throughput: {generated / elapsed:.1f} tokens/s, Running: "
                f"{snap.num_running} reqs, Waiting: {snap.num_waiting} reqs, Swapped: "
                f"{snap.num_swapped} reqs, KV cache usage: {snap.kv.usage:.1%}, Prefix cache "
                f"hit rate: {hits / queries if queries else 0.0:.1%}")
        if snap.num_cpu_blocks:
            line += f", Host KV usage: {snap.cpu_usage:.1%}"
        log.info(line)
        return line
