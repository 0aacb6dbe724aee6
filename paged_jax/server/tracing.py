"""OpenTelemetry traces of requests, as vLLM exports them.

One span per engine request, named `llm_request` (kind SERVER), made when the request
finishes with its arrival as start time, as a child of the W3C `traceparent` the HTTP request
carried (a new trace without one), with vLLM's attribute names (the gen_ai.* conventions and
vLLM's gen_ai.latency.* additions). Metadata only: no prompt or generated text.

The exporter is opentelemetry's own OTLP exporter (`--otlp-traces-endpoint`, or the standard
OTEL_EXPORTER_OTLP_TRACES_* environment), optional: opentelemetry-sdk and
opentelemetry-exporter-otlp-proto-http come with the `tracing` extra, and the server runs
unchanged without them unless an endpoint is asked for, which is then refused by name.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Mapping

# vLLM's names (vllm/tracing.py SpanAttributes)
USAGE_PROMPT_TOKENS = "gen_ai.usage.prompt_tokens"
USAGE_COMPLETION_TOKENS = "gen_ai.usage.completion_tokens"
USAGE_NUM_SEQUENCES = "gen_ai.usage.num_sequences"
REQUEST_ID = "gen_ai.request.id"
REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
REQUEST_TEMPERATURE = "gen_ai.request.temperature"
REQUEST_TOP_P = "gen_ai.request.top_p"
REQUEST_N = "gen_ai.request.n"
RESPONSE_MODEL = "gen_ai.response.model"
LATENCY_TIME_IN_QUEUE = "gen_ai.latency.time_in_queue"
LATENCY_TIME_TO_FIRST_TOKEN = "gen_ai.latency.time_to_first_token"
LATENCY_E2E = "gen_ai.latency.e2e"
LATENCY_TIME_IN_MODEL_PREFILL = "gen_ai.latency.time_in_model_prefill"
LATENCY_TIME_IN_MODEL_DECODE = "gen_ai.latency.time_in_model_decode"
LATENCY_TIME_IN_MODEL_INFERENCE = "gen_ai.latency.time_in_model_inference"
SPAN_NAME = "llm_request"


@dataclasses.dataclass(frozen=True)
class FinishedRequest:
    """What a finished request's span and per-request metrics are made of. Times are
    time.monotonic() seconds."""
    request_id: str
    prompt_tokens: int
    completion_tokens: int  # over all its sequences
    num_sequences: int
    n: int
    max_tokens: int | None
    temperature: float
    top_p: float
    arrival: float
    scheduled: float  # left the queue
    first_token: float
    finished: float
    finish_reason: str

    @property
    def queue_seconds(self) -> float:
        return max(0.0, self.scheduled - self.arrival)

    @property
    def prefill_seconds(self) -> float:
        return max(0.0, self.first_token - self.scheduled)

    @property
    def decode_seconds(self) -> float:
        return max(0.0, self.finished - self.first_token)

    @property
    def inference_seconds(self) -> float:
        return max(0.0, self.finished - self.scheduled)


def tracing_unavailable() -> str | None:
    """Why traces cannot be exported here (None: they can)."""
    try:
        import opentelemetry.exporter.otlp.proto.http.trace_exporter  # noqa: F401
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError as err:
        return (f"{err.name or err} is not installed (pip install 'paged-jax[tracing]': "
                "opentelemetry-sdk and opentelemetry-exporter-otlp-proto-http)")
    return None


class RequestTracer:
    """Makes the spans of finished requests. provider: an opentelemetry TracerProvider (the
    tests give one with an in-memory exporter); for_endpoint builds the OTLP one."""

    def __init__(self, provider, model_name: str):
        self.provider = provider
        self.model_name = model_name
        self._tracer = provider.get_tracer("paged_jax")

    @classmethod
    def for_endpoint(cls, endpoint: str | None, model_name: str) -> "RequestTracer":
        """endpoint: an OTLP/HTTP traces URL (None: from the OTEL_EXPORTER_OTLP_* environment)."""
        reason = tracing_unavailable()
        if reason is not None:
            raise ValueError(f"--otlp-traces-endpoint {endpoint!r} needs OpenTelemetry: {reason}")
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider = TracerProvider(resource=Resource.create({"service.name": "paged-jax"}))
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        return cls(provider, model_name)

    @staticmethod
    def context_from_headers(headers: Mapping[str, str]):
        """The trace context an HTTP request's traceparent / tracestate carry (None: none)."""
        if "traceparent" not in headers:
            return None
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        carrier = {k: headers[k] for k in ("traceparent", "tracestate") if k in headers}
        return TraceContextTextMapPropagator().extract(carrier)

    def record(self, done: FinishedRequest, context=None) -> None:
        from opentelemetry.trace import SpanKind

        to_ns = _monotonic_to_epoch_ns()
        span = self._tracer.start_span(SPAN_NAME, context=context, kind=SpanKind.SERVER,
                                       start_time=to_ns(done.arrival))
        span.set_attributes({
            RESPONSE_MODEL: self.model_name,
            REQUEST_ID: done.request_id,
            REQUEST_TEMPERATURE: done.temperature,
            REQUEST_TOP_P: done.top_p,
            REQUEST_N: done.n,
            USAGE_NUM_SEQUENCES: done.num_sequences,
            USAGE_PROMPT_TOKENS: done.prompt_tokens,
            USAGE_COMPLETION_TOKENS: done.completion_tokens,
            LATENCY_TIME_IN_QUEUE: done.queue_seconds,
            LATENCY_TIME_TO_FIRST_TOKEN: max(0.0, done.first_token - done.arrival),
            LATENCY_E2E: max(0.0, done.finished - done.arrival),
            LATENCY_TIME_IN_MODEL_PREFILL: done.prefill_seconds,
            LATENCY_TIME_IN_MODEL_DECODE: done.decode_seconds,
            LATENCY_TIME_IN_MODEL_INFERENCE: done.inference_seconds,
            **({REQUEST_MAX_TOKENS: done.max_tokens} if done.max_tokens is not None else {}),
        })
        span.end(end_time=to_ns(done.finished))

    def shutdown(self) -> None:
        self.provider.shutdown()  # flushes what the batch processor holds


def _monotonic_to_epoch_ns():
    offset = time.time() - time.monotonic()
    return lambda t: int((t + offset) * 1e9)
