"""Prometheus metrics named as vLLM's (prefix paged_jax:, or vllm: with --metrics-prefix for
dashboards built for vLLM), in a registry of the app's own, with a model_name label; plus
two KV-waste gauges that come from the paper's memory breakdown:
kv_cache_internal_fragmentation_perc (allocated slots holding no token) and
kv_cache_token_state_perc (allocated slots holding one). Fractions in [0, 1], as vLLM's
kv_cache_usage_perc is.

Only the engine thread writes here (prometheus-client's metrics are thread-safe); /metrics
reads the registry from the event loop.
"""
from __future__ import annotations

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge,
                               Histogram, generate_latest)

import re

from paged_jax.server.tracing import FinishedRequest
from paged_jax.snapshot import EngineSnapshot

PREFIX = "paged_jax:"
_PREFIX_RE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
# vLLM's buckets (vllm/v1/metrics/loggers.py).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


def token_buckets(max_model_len: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to max_model_len (vLLM's build_1_2_5_buckets)."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_model_len:
                return tuple(out)
            out.append(m * scale)
        scale *= 10


ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
N_BUCKETS = (1, 2, 5, 10, 20)


def check_prefix(prefix: str) -> None:
    if not _PREFIX_RE.fullmatch(prefix):
        raise ValueError(f"--metrics-prefix {prefix!r} is not a Prometheus name prefix "
                         "(letters, digits, '_' and ':', not starting with a digit)")


class ServerMetrics:
    def __init__(self, model_name: str, prefix: str = PREFIX, max_model_len: int = 2048,
                 cache_config: dict | None = None):
        """prefix: of every series' name (vLLM's dashboards read "vllm:"); cache_config:
        the labels of cache_config_info (block size, block counts, ...)."""
        check_prefix(prefix)
        self.registry = CollectorRegistry()
        self.model_name = model_name
        self.prefix = prefix
        labels = ["model_name"]

        def gauge(name, doc):
            return Gauge(prefix + name, doc, labels, registry=self.registry).labels(model_name)

        def counter(name, doc):
            return Counter(prefix + name, doc, labels, registry=self.registry).labels(model_name)

        def histogram(name, doc, buckets):
            return Histogram(prefix + name, doc, labels, buckets=buckets,
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
        # Per request, as vLLM counts it (n > 1 samples: one), by the reason it ended.
        self._success = Counter(prefix + "request_success", "Finished requests by reason.",
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
        tokens = token_buckets(max_model_len)
        self.request_prompt_tokens = histogram(
            "request_prompt_tokens", "Prompt tokens of finished requests.", tokens)
        self.request_generation_tokens = histogram(
            "request_generation_tokens", "Generated tokens of finished requests (all samples).",
            tokens)
        self.iteration_tokens = histogram(
            "iteration_tokens_total", "Tokens computed by each engine step.",
            ITERATION_TOKEN_BUCKETS)
        self.prefill_time = histogram("request_prefill_time_seconds",
                                      "First scheduled to first token.", LATENCY_BUCKETS)
        self.decode_time = histogram("request_decode_time_seconds",
                                     "First token to finish.", LATENCY_BUCKETS)
        self.inference_time = histogram("request_inference_time_seconds",
                                        "First scheduled to finish.", LATENCY_BUCKETS)
        self.params_n = histogram("request_params_n", "The n of finished requests.", N_BUCKETS)
        self.params_max_tokens = histogram("request_params_max_tokens",
                                           "The max_tokens of finished requests.", tokens)
        info = {k: str(v) for k, v in (cache_config or {}).items()}
        config_info = Gauge(prefix + "cache_config_info", "The KV cache's configuration "
                            "(labels).", sorted(info), registry=self.registry)
        (config_info.labels(**info) if info else config_info).set(1)
        self._seen = {"prompt": 0, "generation": 0, "preemptions": 0, "prefix_queries": 0,
                      "prefix_hits": 0, "window_released": 0, "spec_drafts": 0, "spec_accepted": 0, "batched": 0, "steps": 0}

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
        steps = snap.num_steps - seen["steps"]
        if steps > 0:  # (one update per step from the engine loop)
            per_step = (snap.batched_tokens - seen["batched"]) / steps
            for _ in range(steps):
                self.iteration_tokens.observe(per_step)
            seen["steps"], seen["batched"] = snap.num_steps, snap.batched_tokens

    def request_finished(self, done: FinishedRequest) -> None:
        """A request ended (its last sequence done, aborted or failed): the per-request
        series, as vLLM observes them."""
        self._success.labels(self.model_name, done.finish_reason).inc()
        if done.finish_reason in ("abort", "error"):
            return  # (its timings and sizes are not a finished request's)
        self.request_prompt_tokens.observe(done.prompt_tokens)
        self.request_generation_tokens.observe(done.completion_tokens)
        self.prefill_time.observe(done.prefill_seconds)
        self.decode_time.observe(done.decode_seconds)
        self.inference_time.observe(done.inference_seconds)
        self.params_n.observe(done.n)
        if done.max_tokens is not None:
            self.params_max_tokens.observe(done.max_tokens)

    def _advance(self, counter, key: str, total: int) -> None:
        if total > self._seen[key]:
            counter.inc(total - self._seen[key])
            self._seen[key] = total

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
