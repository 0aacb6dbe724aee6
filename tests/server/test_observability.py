"""vLLM's metric series and names, per-request success counts, and OpenTelemetry spans.

On the shared live server: the per-request series after a known set of requests (n = 2
counts one success, as vLLM), and every series the Grafana dashboard in docs/ reads. In
process, an app with an in-memory span exporter and `vllm:` names: a request carrying a W3C
traceparent gives one span under that trace with vLLM's attributes and its token counts."""
from __future__ import annotations

import json
import pathlib
import re

import httpx
import pytest

from paged_jax.server.metrics import ServerMetrics, token_buckets

DASHBOARD = pathlib.Path(__file__).resolve().parents[2] / "docs" / "grafana" / "paged_jax.json"


def _count(metrics: dict, name: str) -> float:
    return sum(v for k, v in metrics.items() if k == name or k.startswith(name + "{"))


def test_per_request_series_after_known_requests(server, client):
    before = server.metrics()
    # one request of n = 2 (one success), one of two prompts (two successes), lengths known
    client.completions.create(model=server.model, prompt="Hello there", max_tokens=5, n=2,
                              temperature=0.8, seed=1, extra_body={"ignore_eos": True})
    client.completions.create(model=server.model, prompt=["One", "Two"], max_tokens=3,
                              temperature=0.0, extra_body={"ignore_eos": True})
    after = server.metrics()

    def delta(name):
        return _count(after, name) - _count(before, name)

    p = "paged_jax:"
    assert delta(p + "request_success_total{length}") == 3
    assert delta(p + "request_params_n_count") == 3
    assert delta(p + "request_params_n_sum") == 2 + 1 + 1
    assert delta(p + "request_params_max_tokens_sum") == 5 + 3 + 3
    assert delta(p + "request_generation_tokens_sum") == 2 * 5 + 3 + 3
    assert delta(p + "request_prompt_tokens_count") == 3
    for name in ("request_prefill_time_seconds", "request_decode_time_seconds",
                 "request_inference_time_seconds"):
        assert delta(p + name + "_count") == 3, name
    assert delta(p + "iteration_tokens_total_count") >= 5  # at least one step per token
    assert delta(p + "iteration_tokens_total_sum") >= 2 * 5 + 3 + 3
    text = httpx.get(server.base_url + "/metrics", timeout=30).text
    info = [line for line in text.splitlines() if line.startswith(p + "cache_config_info{")]
    assert len(info) == 1 and 'block_size="16"' in info[0] and 'num_gpu_blocks="127"' in info[0]
    # the tiny model's K and V x 2 layers x 2 KV heads x 16 dims x 16 tokens x 4 bytes
    assert 'block_bytes="8192"' in info[0]


def test_the_grafana_dashboard_reads_series_the_server_exports(server):
    exported = {re.split(r"[{ ]", k)[0] for k in server.metrics()}
    exprs = [t["expr"] for panel in json.loads(DASHBOARD.read_text())["panels"]
             for t in panel["targets"]]
    names = {n for e in exprs for n in re.findall(r"paged_jax:[a-z0-9_]+", e)}
    assert len(names) >= 15
    for name in names:
        assert any(e == name or e.startswith(name + "_") for e in exported) or (
            name.endswith(("_bucket", "_total")) and name.rsplit("_", 1)[0] + "_count"
            in exported), name


def test_metric_prefixes_are_checked_and_token_buckets_are_vllms():
    assert token_buckets(2048) == (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)
    with pytest.raises(ValueError, match=r"--metrics-prefix '9x:' is not a Prometheus name"):
        ServerMetrics("m", prefix="9x:")
    text = ServerMetrics("m", prefix="vllm:").render()[0].decode()
    assert "vllm:num_requests_running" in text and "paged_jax:" not in text


def test_a_traceparent_request_gives_one_span_under_its_trace(make_tiny_llama_dir):
    pytest.importorskip("opentelemetry.sdk")
    from fastapi.testclient import TestClient
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from paged_jax import LLMEngine
    from paged_jax.config import EngineConfig
    from paged_jax.server import create_app
    from paged_jax.server import tracing

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    engine = LLMEngine(EngineConfig(model=str(make_tiny_llama_dir(tokenizer=True)),
                                    num_kv_blocks=32, max_model_len=64, max_num_seqs=4,
                                    max_num_batched_tokens=64))
    app = create_app(engine, served_model_name="tiny", metrics_prefix="vllm:",
                     tracer=tracing.RequestTracer(provider, "tiny"), log_stats_interval=None)
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    with TestClient(app) as http:
        r = http.post("/v1/completions", json=dict(
            model="tiny", prompt="Hello", max_tokens=4, temperature=0.0,
            ignore_eos=True), headers={"traceparent": f"00-{trace_id}-{parent_id}-01"})
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        http.post("/v1/completions", json=dict(model="tiny", prompt="Hi", max_tokens=2,
                                                 ignore_eos=True))
        metrics = http.get("/metrics").text
    spans = exporter.get_finished_spans()
    assert len(spans) == 2  # one per request; the second starts a trace of its own
    span = next(s for s in spans if format(s.context.trace_id, "032x") == trace_id)
    assert span.name == "llm_request" and format(span.parent.span_id, "016x") == parent_id
    a = span.attributes
    assert a[tracing.USAGE_PROMPT_TOKENS] == usage["prompt_tokens"]
    assert a[tracing.USAGE_COMPLETION_TOKENS] == usage["completion_tokens"] == 4
    assert a[tracing.REQUEST_MAX_TOKENS] == 4 and a[tracing.REQUEST_N] == 1
    assert a[tracing.RESPONSE_MODEL] == "tiny" and a[tracing.REQUEST_TEMPERATURE] == 0.0
    for name in (tracing.LATENCY_TIME_IN_QUEUE, tracing.LATENCY_TIME_TO_FIRST_TOKEN,
                 tracing.LATENCY_E2E, tracing.LATENCY_TIME_IN_MODEL_PREFILL,
                 tracing.LATENCY_TIME_IN_MODEL_DECODE):
        assert 0 <= a[name] <= a[tracing.LATENCY_E2E], name
    assert span.end_time > span.start_time
    other = next(s for s in spans if s is not span)
    assert other.parent is None and format(other.context.trace_id, "032x") != trace_id
    assert 'vllm:request_success_total{finished_reason="length",model_name="tiny"} 2.0' \
        in metrics
