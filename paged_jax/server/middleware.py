"""The server's ASGI middleware: request ids, CORS options, the API key check and the count of
refused generation requests. Plain ASGI (not BaseHTTPMiddleware), so streaming responses and
client disconnects pass through untouched."""
from __future__ import annotations

import dataclasses
import secrets
import uuid
from typing import Sequence

from paged_jax.server.errors import error_response
from paged_jax.server.metrics import ServerMetrics

DOCS_PATHS = ("/docs", "/redoc", "/openapi.json")
GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
REQUEST_ID_HEADER = b"x-request-id"


def route_path(scope) -> str:
    """The path the routes see: behind --root-path a request may come with the prefix
    (/api/v1/models) or without it (a proxy that strips it); Starlette routes both, so the
    checks here must see both as /v1/models (else the prefixed one skips the API key)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        return path[len(root):]
    return path


class RequestIdMiddleware:
    """Every response carries X-Request-Id: the request's own, echoed (vLLM's
    --enable-request-id-headers, always on here), or a new random one, which is also put on
    the request so that the routes see the same id the client gets."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = next((v for k, v in scope["headers"] if k == REQUEST_ID_HEADER), None)
        if request_id is None:
            request_id = uuid.uuid4().hex.encode()
            scope = {**scope, "headers": [*scope["headers"], (REQUEST_ID_HEADER, request_id)]}

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", ())
                           if k.lower() != REQUEST_ID_HEADER]
                message = {**message, "headers": [*headers, (REQUEST_ID_HEADER, request_id)]}
            await send(message)
        await self.app(scope, receive, send_with_id)


@dataclasses.dataclass(frozen=True)
class CorsOptions:
    """Starlette's CORSMiddleware settings (the serve flags --allowed-origins and so on; the
    defaults are vLLM's: any origin, method and header, no credentials)."""
    allowed_origins: Sequence[str] = ("*",)
    allowed_methods: Sequence[str] = ("*",)
    allowed_headers: Sequence[str] = ("*",)
    allow_credentials: bool = False

    def middleware_kwargs(self) -> dict:
        return dict(allow_origins=list(self.allowed_origins),
                    allow_methods=list(self.allowed_methods),
                    allow_headers=list(self.allowed_headers),
                    allow_credentials=self.allow_credentials)


class ApiKeyMiddleware:
    """Bearer-token check for /v1/* and the API docs (health, metrics, ping, version and
    (de)tokenize stay open, as vLLM's). Any of the keys is accepted. The scheme is matched
    case-insensitively (RFC 6750, RFC 9110), the key exactly."""

    def __init__(self, app, api_keys: Sequence[str]):
        self.app = app
        self.expected = [key.encode() for key in api_keys]

    async def __call__(self, scope, receive, send):
        path = route_path(scope)
        if scope["type"] == "http" and (path.startswith("/v1") or path in DOCS_PATHS
                                        or path.startswith("/docs/")):
            given = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = given.strip().partition(b" ")
            token = token.strip()
            # Every key compared (a list, not any() over a generator), each in constant time:
            # the answer's timing tells nothing about a key, nor which one came close.
            matches = [secrets.compare_digest(token, key) for key in self.expected]
            if not (scheme.lower() == b"bearer" and any(matches)):
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
        if scope["type"] != "http" or route_path(scope) not in GENERATION_PATHS:
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start" and 400 <= message["status"] < 499:
                self.metrics.refused.inc()
            await send(message)
        await self.app(scope, receive, counting_send)
