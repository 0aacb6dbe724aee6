"""The OpenAI-compatible HTTP server: a FastAPI app around one LLMEngine.

    engine = LLMEngine(EngineConfig(model=path, ...))
    app = create_app(engine, served_model_name="my-model", api_key=None)
    paged_jax.server.uvicorn_server.serve(app, host="127.0.0.1", port=8000)

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, and the API docs
(/docs, /openapi.json; off with disable_docs), behind the API key when one is set; GET or
HEAD /health and GET /metrics (Prometheus text), open to probes and scrapers.
"""
from __future__ import annotations

import contextlib
import secrets

from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic.json_schema import models_json_schema

from paged_jax.config import ServerLimits
from paged_jax.server import protocol
from paged_jax.server.body import StrictJSONRoute
from paged_jax.server.engine_loop import EngineLoop
from paged_jax.server.errors import ERROR_RESPONSES, error_response, install_handlers
from paged_jax.server.metrics import ServerMetrics
from paged_jax.server.stats_logger import DEFAULT_INTERVAL as DEFAULT_STATS_INTERVAL
from paged_jax.server.stats_logger import StatsLogger
from paged_jax.server.serving import OpenAIServing
from paged_jax.structured_outputs import GrammarCompiler
from paged_jax.tokenizer import load_tokenizer

DOCS_PATHS = ("/docs", "/redoc", "/openapi.json")
GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")


def create_app(engine, served_model_name: str | None = None, api_key: str | None = None,
               limits: ServerLimits = ServerLimits(), disable_docs: bool = False,
               log_stats_interval: float | None = DEFAULT_STATS_INTERVAL) -> FastAPI:
    """log_stats_interval: seconds between the stats lines in the log (None: no lines)."""
    model_name = served_model_name or engine.model_name
    metrics = ServerMetrics(model_name)
    # The process that runs the app sets app.state.on_engine_death (uvicorn_server.py): a
    # dead engine loop stops the server, which exits non-zero for a supervisor to restart.
    engine_loop = EngineLoop(engine, metrics, on_death=lambda: app.state.on_engine_death(),
                             stats=StatsLogger(log_stats_interval) if log_stats_interval
                             else None)
    tokenizer = load_tokenizer(engine.model_path)
    if engine.grammars is not None:
        # Structured outputs compile on the server's tokenizer thread, with the server's
        # tokenizer (a Rust tokenizer is not shared across threads), never on the engine's:
        # the engine copies the compiled matchers from the shared cache.
        engine.grammars = GrammarCompiler(tokenizer, engine.grammars.vocab_size,
                                          engine.grammars.disable_any_whitespace)
    serving = OpenAIServing(engine_loop, tokenizer, model_name,
                            engine.max_model_len, limits.max_sequences_per_request,
                            engine.sampling_defaults, engine.grammars)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        engine_loop.start()
        try:
            yield
        finally:
            engine_loop.stop()
            serving.close()

    docs = {} if not disable_docs else dict(docs_url=None, redoc_url=None, openapi_url=None)
    app = FastAPI(title="paged-jax", lifespan=lifespan, **docs)
    app.router.route_class = StrictJSONRoute  # size limit and strict JSON for every body
    app.state.engine_loop, app.state.metrics, app.state.serving = engine_loop, metrics, serving
    app.state.limits = limits
    app.state.on_engine_death = lambda: None
    install_handlers(app)
    app.add_middleware(RefusalCounter, metrics=metrics)
    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)

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

    @app.api_route("/health", methods=["GET", "HEAD"], response_class=Response, responses={
        200: {"description": "The engine is running and the server accepts requests."},
        503: ERROR_RESPONSES[503]})
    async def health():
        if serving.draining:
            return error_response(503, "the server is shutting down", type="server_error",
                                  code="server_shutting_down")
        if engine_loop.healthy:
            return Response(status_code=200)
        return error_response(503, f"the engine is not running: {engine_loop.error!r}",
                              type="server_error", code="engine_dead")

    @app.get("/metrics", include_in_schema=False)
    async def prometheus():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    def openapi():  # adds the chat stream's chunk model, which no route returns as JSON
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            _, defs = models_json_schema([(protocol.ChatCompletionChunk, "serialization")],
                                         ref_template="#/components/schemas/{model}")
            for name, definition in defs["$defs"].items():
                schema["components"]["schemas"].setdefault(name, definition)
        return app.openapi_schema
    app.openapi = openapi
    return app


class ApiKeyMiddleware:
    """Bearer-token check for /v1/* and the API docs (health and metrics stay open, as
    vLLM's). The scheme is matched case-insensitively (RFC 6750, RFC 9110), the key exactly.
    Plain ASGI, so streaming responses and disconnects pass through untouched."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = api_key.encode()

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] == "http" and (path.startswith("/v1") or path in DOCS_PATHS
                                        or path.startswith("/docs/")):
            given = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = given.strip().partition(b" ")
            if not (scheme.lower() == b"bearer"
                    and secrets.compare_digest(token.strip(), self.expected)):
                response = error_response(401, "Incorrect API key provided.",
                                          code="invalid_api_key")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class RefusalCounter:
    """Counts generation requests answered with a 4xx (refused as a whole, nothing queued)
    in paged_jax:num_requests_refused, apart from the aborts of requests that had started."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") not in GENERATION_PATHS:
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start" and 400 <= message["status"] < 499:
                self.metrics.refused.inc()
            await send(message)
        await self.app(scope, receive, counting_send)
