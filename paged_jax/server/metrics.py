"""Prometheus metrics named as vLLM's (prefix paged_jax: instead of vllm:), in a registry of
the app's own, plus two KV-waste gauges that come from the paper's memory breakdown:
kv_cache_internal_fragmentation_perc (allocated slots holding no token) and
kv_cache_token_state_perc (allocated slots holding one). Fractions in [0, 1], as vLLM's
kv_cache_usage_perc is.

Only the engine thread writes here (prometheus-client's metrics are thread-safe); /metrics
reads the registry from the event loop.
"""
from __future__ import annotations

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge,
                               Histogram, generate_latest)

from paged_jax.snapshot import EngineSnapshot

PREFIX = "paged_jax:"
# vLLM's buckets (vllm/v1/metrics/loggers.py).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class ServerMetrics:
    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        self.model_name = model_name
        labels = ["model_name"]

        def gauge(name, doc):
            return Gauge(PREFIX + name, doc, labels, registry=self.registry).labels(model_name)

        def counter(name, doc):
            return Counter(PREFIX + name, doc, labels, registry=self.registry).labels(model_name)

        def histogram(name, doc, buckets):
            return Histogram(PREFIX + name, doc, labels, buckets=buckets,
                             registry=self.registry).labels(model_name)

        self.running = gauge("num_requests_running", "Sequences in the running batch.")
        self.waiting = gauge("num_requests_waiting", "Sequences waiting to be scheduled.")
        self.swapped = gauge("num_requests_swapped",
                             "Sequences preempted by swap, their KV blocks in host memory.")
        self.cpu_usage = gauge("cpu_cache_usage_perc",
                               "Share of host (swap) KV blocks in use (0-1; 0 without swap).")
        self.kv_usage = gauge("kv_cache_usage_perc", "Share of KV blocks in use (0-1).")
        self.kv_fragmentation = gauge(
            "kv_cache_internal_fragmentation_perc",
            "Share of allocated KV slots holding no token (0-1): the last blocks' empty tails.")
        self.kv_token_states = gauge(
            "kv_cache_token_state_perc",
            "Share of allocated KV slots holding a token's K/V (0-1; 1 when nothing is held).")
        self.prompt_tokens = counter(
            "prompt_tokens", "Prompt tokens of prefills, cached ones included (as vLLM).")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        self.preemptions = counter("num_preemptions", "Preemptions (by recompute or swap).")
        self.spec_drafts = counter("spec_decode_num_draft_tokens",
                                   "Speculative draft tokens computed.")
        self.spec_accepted = counter("spec_decode_num_accepted_tokens",
                                     "Speculative draft tokens kept.")
        # In tokens, as vLLM V1 counts them: hits / queries is the prefix cache's hit rate.
        self.prefix_queries = counter("prefix_cache_queries",
                                      "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = counter("prefix_cache_hits",
                                   "Prompt tokens whose K/V the prefix cache supplied.")
        self.window_released = counter(
            "kv_blocks_released_by_window",
            "KV blocks given back to the pool once every layer's sliding window had passed "
            "them (models whose layers all attend within a window).")
        self.refused = counter("num_requests_refused",
                               "Generation requests refused as a whole with a 4xx (bad "
                               "parameters, too long, malformed): nothing of them ran.")
        self._success = Counter(PREFIX + "request_success", "Finished sequences by reason.",
                                ["model_name", "finished_reason"], registry=self.registry)
        for reason in ("stop", "length", "abort", "error"):
            self._success.labels(model_name, reason)  # exported at 0 from the start
        self.ttft = histogram("time_to_first_token_seconds", "Time to first token.",
                              TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between two tokens.",
                             ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to finish.",
                             LATENCY_BUCKETS)
        self.queue_time = histogram("request_queue_time_seconds",
                                    "Arrival to first scheduled.", LATENCY_BUCKETS)
        self._seen = {"prompt": 0, "generation": 0, "preemptions": 0, "prefix_queries": 0,
                      "prefix_hits": 0, "window_released": 0, "spec_drafts": 0, "spec_accepted": 0, "finished": {}}

    def update(self, snap: EngineSnapshot) -> None:
        """Gauges from the engine's state and counters from its running totals (engine
        thread, after each step)."""
        self.running.set(snap.num_running)
        self.waiting.set(snap.num_waiting)
        self.swapped.set(snap.num_swapped)
        self.cpu_usage.set(snap.cpu_usage)
        self.kv_usage.set(snap.kv.usage)
        self.kv_fragmentation.set(snap.kv.internal_fragmentation)
        self.kv_token_states.set(snap.kv.token_state_share)
        seen = self._seen
        self._advance(self.prompt_tokens, "prompt", snap.prompt_tokens)
        self._advance(self.generation_tokens, "generation", snap.generation_tokens)
        self._advance(self.preemptions, "preemptions", snap.num_preemptions)
        self._advance(self.spec_drafts, "spec_drafts", snap.spec_draft_tokens)
        self._advance(self.spec_accepted, "spec_accepted", snap.spec_accepted_tokens)
        self._advance(self.prefix_queries, "prefix_queries", snap.prefix_cache_queries)
        self._advance(self.prefix_hits, "prefix_hits", snap.prefix_cache_hits)
        self._advance(self.window_released, "window_released", snap.window_released_blocks)
        for reason, count in snap.finished.items():
            delta = count - seen["finished"].get(reason, 0)
            if delta > 0:
                self._success.labels(self.model_name, reason).inc(delta)
                seen["finished"][reason] = count

    def _advance(self, counter, key: str, total: int) -> None:
        if total > self._seen[key]:
            counter.inc(total - self._seen[key])
            self._seen[key] = total

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
