"""The OpenAI-compatible HTTP server: a FastAPI app around one LLMEngine.

    engine = LLMEngine(EngineConfig(model=path, ...))
    app = create_app(engine, served_model_name="my-model", api_key=None)
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models (behind the API key
when one is set), GET /health, GET /metrics (Prometheus text).
"""
from __future__ import annotations

import contextlib
import secrets

from fastapi import FastAPI, Request
from fastapi.responses import Response

from paged_jax.server import protocol
from paged_jax.server.engine_loop import EngineLoop
from paged_jax.server.errors import error_response, install_handlers
from paged_jax.server.metrics import ServerMetrics
from paged_jax.server.serving import OpenAIServing
from paged_jax.tokenizer import load_tokenizer

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def create_app(engine, served_model_name: str | None = None,
               api_key: str | None = None) -> FastAPI:
    model_name = served_model_name or engine.config.model or DEFAULT_MODEL_NAME
    metrics = ServerMetrics(model_name)
    engine_loop = EngineLoop(engine, metrics)
    serving = OpenAIServing(engine_loop, load_tokenizer(engine.model.path), model_name,
                            engine.max_model_len)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        engine_loop.start()
        try:
            yield
        finally:
            engine_loop.stop()

    app = FastAPI(title="paged-jax", lifespan=lifespan)
    app.state.engine_loop, app.state.metrics = engine_loop, metrics
    install_handlers(app)
    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)

    @app.post("/v1/completions")
    async def completions(body: protocol.CompletionRequest, request: Request):
        return await serving.completions(body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: protocol.ChatCompletionRequest, request: Request):
        return await serving.chat(body, request)

    @app.get("/v1/models")
    async def models():
        card = protocol.ModelCard(id=model_name, root=engine.model.path,
                                  max_model_len=engine.max_model_len)
        return protocol.ModelList(data=[card]).model_dump()

    @app.get("/health")
    async def health():
        if engine_loop.healthy:
            return Response(status_code=200)
        return error_response(503, f"the engine is not running: {engine_loop.error!r}",
                              type="server_error", code="engine_dead")

    @app.get("/metrics")
    async def prometheus():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    return app


class ApiKeyMiddleware:
    """Bearer-token check for /v1/* (health and metrics stay open, as vLLM's). Plain ASGI, so
    streaming responses and disconnects pass through untouched."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                response = error_response(401, "Incorrect API key provided.",
                                          code="invalid_api_key")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

