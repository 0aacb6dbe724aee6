"""The OpenAI-compatible HTTP server: a FastAPI app around one LLMEngine.

    engine = LLMEngine(EngineConfig(model=path, ...))
    app = create_app(engine, served_model_name="my-model", api_key=None)
    paged_jax.server.uvicorn_server.serve(app, host="127.0.0.1", port=8000)

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, and the API docs
(/docs, /openapi.json; off with disable_docs), behind the API key when one is set; GET or
HEAD /health, GET or POST /ping (the same check, vLLM's and SageMaker's liveness route),
GET /metrics (Prometheus text), GET /version, POST /tokenize and POST /detokenize
(tokenize_routes.py), open as in vLLM. Every response carries an X-Request-Id header.
"""
from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import importlib.resources
import time
from typing import Sequence

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, Response
from pydantic.json_schema import models_json_schema

from paged_jax.kv_cache import block_bytes
from paged_jax.config import ServerLimits
from paged_jax.server import protocol
from paged_jax.server.body import StrictJSONRoute
from paged_jax.server.chat_options import ChatOptions
from paged_jax.server.engine_loop import EngineLoop
from paged_jax.server.errors import ERROR_RESPONSES, error_response, install_handlers
from paged_jax.server.metrics import PREFIX as METRICS_PREFIX
from paged_jax.server.metrics import ServerMetrics
# ApiKeyMiddleware, RefusalCounter and the path tuples lived here first: still importable
from paged_jax.server.middleware import (DOCS_PATHS, GENERATION_PATHS,  # noqa: F401
                                         ApiKeyMiddleware, CorsOptions, RefusalCounter,
                                         RequestIdMiddleware)
from paged_jax.server.stats_logger import DEFAULT_INTERVAL as DEFAULT_STATS_INTERVAL
from paged_jax.server.stats_logger import StatsLogger
from paged_jax.server.serving import OpenAIServing
from paged_jax.server.tokenize_routes import SCHEMA_MODELS, add_tokenize_routes
from paged_jax.structured_outputs import GrammarCompiler
from paged_jax.tokenizer import load_tokenizer


def create_app(engine, served_model_name: str | None = None,
               api_key: str | Sequence[str] | None = None,
               limits: ServerLimits = ServerLimits(), disable_docs: bool = False,
               log_stats_interval: float | None = DEFAULT_STATS_INTERVAL,
               chat_options: ChatOptions = ChatOptions(), cors: CorsOptions | None = None,
               root_path: str = "", metrics_prefix: str = METRICS_PREFIX,
               tracer=None) -> FastAPI:
    """api_key: one key or several, any of which is accepted (None: no key).
    log_stats_interval: seconds between the stats lines in the log (None: no lines).
    chat_options: the chat template and tool calling (the serve flags). cors: the CORS
    headers (None: none). root_path: the path prefix of a proxy in front (--root-path).
    metrics_prefix: of the Prometheus series (vllm: for vLLM's dashboards). tracer: a
    tracing.RequestTracer that gets a span per request (None: no traces)."""
    api_keys = [api_key] if isinstance(api_key, str) else list(api_key or ())
    model_name = served_model_name or engine.model_name
    kv = engine.kv
    metrics = ServerMetrics(model_name, metrics_prefix, engine.max_model_len, cache_config=dict(
        block_size=kv.block_size, num_gpu_blocks=kv.pool.num_usable,
        num_cpu_blocks=kv.cpu_pool.num_usable if kv.cpu_pool is not None else 0,
        enable_prefix_caching=kv.enable_caching,
        cache_dtype=(engine.config.kv_cache_dtype if engine.config.kv_cache_dtype != "auto"
                     else engine.model.config.dtype),
        # the bytes one block holds on each device, as stored (int8: with its scales)
        block_bytes=block_bytes(engine.model.config, kv.block_size,
                                engine.config.kv_cache_dtype)
        // engine.config.tensor_parallel_size,
        sliding_window=kv.sliding_window))
    # The process that runs the app sets app.state.on_engine_death (uvicorn_server.py): a
    # dead engine loop stops the server, which exits non-zero for a supervisor to restart.
    engine_loop = EngineLoop(engine, metrics, on_death=lambda: app.state.on_engine_death(),
                             stats=StatsLogger(log_stats_interval) if log_stats_interval
                             else None, tracer=tracer)
    tokenizer = load_tokenizer(engine.model_path)
    if engine.grammars is not None:
        # Structured outputs compile on the server's tokenizer thread, with the server's
        # tokenizer (a Rust tokenizer is not shared across threads), never on the engine's:
        # the engine copies the compiled matchers from the shared cache.
        engine.grammars = GrammarCompiler(tokenizer, engine.grammars.vocab_size,
                                          engine.grammars.disable_any_whitespace)
    serving = OpenAIServing(engine_loop, tokenizer, model_name,
                            engine.max_model_len, limits.max_sequences_per_request,
                            engine.sampling_defaults, engine.grammars,
                            chat_options=chat_options)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        engine_loop.start()
        try:
            yield
        finally:
            engine_loop.stop()
            serving.close()
            if tracer is not None:
                tracer.shutdown()  # exports what is still batched

    docs = {} if not disable_docs else dict(docs_url=None, redoc_url=None, openapi_url=None)
    app = _App(title="paged-jax", lifespan=lifespan, root_path=root_path, **docs)
    app.router.route_class = StrictJSONRoute  # size limit and strict JSON for every body
    app.state.engine_loop, app.state.metrics, app.state.serving = engine_loop, metrics, serving
    app.state.limits = limits
    app.state.on_engine_death = lambda: None
    install_handlers(app)
    # The last added is the outermost: CORS answers a browser's preflight before the API
    # key is asked for (a preflight carries none), and adds its headers to a 401 too.
    app.add_middleware(RefusalCounter, metrics=metrics)
    if api_keys:
        app.add_middleware(ApiKeyMiddleware, api_keys=api_keys)
    if cors is not None:
        app.add_middleware(CORSMiddleware, **cors.middleware_kwargs())

    @app.post("/v1/completions", response_model=protocol.CompletionResponse,
              responses=protocol.streamed(ERROR_RESPONSES, "CompletionResponse"))
    async def completions(body: protocol.CompletionRequest, request: Request):
        return await serving.completions(body, request)

    @app.post("/v1/chat/completions", response_model=protocol.ChatCompletionResponse,
              responses=protocol.streamed(ERROR_RESPONSES, "ChatCompletionChunk"))
    async def chat_completions(body: protocol.ChatCompletionRequest, request: Request):
        return await serving.chat(body, request)

    @app.get("/v1/models", response_model=protocol.ModelList,
             responses={401: ERROR_RESPONSES[401]})
    async def models():
        card = protocol.ModelCard(id=model_name, root=engine.model_path,
                                  max_model_len=engine.max_model_len)
        return protocol.ModelList(data=[card]).model_dump()

    health_responses = {
        200: {"description": "The engine is running and the server accepts requests."},
        503: ERROR_RESPONSES[503]}

    @app.api_route("/health", methods=["GET", "HEAD"], response_class=Response,
                   responses=health_responses)
    async def health():
        if serving.draining:
            return error_response(503, "the server is shutting down", type="server_error",
                                  code="server_shutting_down")
        if engine_loop.healthy:
            return Response(status_code=200)
        return error_response(503, f"the engine is not running: {engine_loop.error!r}",
                              type="server_error", code="engine_dead")

    @app.api_route("/ping", methods=["GET", "POST"], response_class=Response,
                   responses=health_responses)
    async def ping():
        return await health()

    @app.get("/v1/kv_cache", responses={401: ERROR_RESPONSES[401]})
    async def kv_cache():
        """The block pool (kv_view.py): each block's holder, shared and cached blocks, the
        host pool, the queues with each request's block table, KV usage and waste. Built
        on the engine's thread a few times a second while someone asks."""
        deadline = time.monotonic() + 5.0
        while (view := engine_loop.kv_cache_view()) is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if view is None:
            return error_response(503, "the engine has not answered", type="server_error",
                                  code="engine_busy")
        return view

    @app.get("/dashboard", include_in_schema=False)
    async def dashboard():
        # Static: the data comes from /v1/kv_cache, behind the API key.
        return HTMLResponse(_DASHBOARD.read_text(encoding="utf-8"))

    @app.get("/version")
    async def version():
        return {"version": package_version()}

    add_tokenize_routes(app, serving, engine.model.config.vocab_size)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    def openapi():  # adds the chat stream's chunk model, which no route returns as JSON, and
        # /tokenize's request models, which its route validates itself
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            models = [(protocol.ChatCompletionChunk, "serialization"),
                      *((model, "validation") for model in SCHEMA_MODELS)]
            _, defs = models_json_schema(models, ref_template="#/components/schemas/{model}")
            for name, definition in defs["$defs"].items():
                schema["components"]["schemas"].setdefault(name, definition)
        return app.openapi_schema
    app.openapi = openapi
    return app


_DASHBOARD = importlib.resources.files("paged_jax.server") / "static" / "dashboard.html"


def package_version() -> str:
    try:
        return importlib.metadata.version("paged-jax")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout, not installed
        import paged_jax

        return getattr(paged_jax, "__version__", "unknown")


class _App(FastAPI):
    """A FastAPI whose request ids wrap even its error middleware, so that a 500 from an
    unhandled exception (answered outside the user middleware) carries X-Request-Id too."""

    def build_middleware_stack(self):
        return RequestIdMiddleware(super().build_middleware_stack())
