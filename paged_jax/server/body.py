"""Reading a request's body before FastAPI validates it: a size limit (413 naming the limit)
and strict JSON (400s naming what is wrong), with large bodies parsed off the event loop.

Strict means what Python's json module lets through and the engine cannot use: the
non-standard constants NaN / Infinity, invalid UTF-8, lone surrogates ("\\ud800", which the
tokenizer cannot encode) and nesting deeper than ServerLimits.max_json_depth.

    app.router.route_class = StrictJSONRoute   # before any route is added
    app.state.limits = ServerLimits(max_request_body_bytes=...)   # paged_jax.config
"""
from __future__ import annotations

import asyncio
import json
import re

from fastapi import Request
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

OFF_LOOP_BYTES = 1 << 16  # bodies larger than this are parsed in a worker thread
# Content past the limit that is still read (and dropped) before the 413, so that a client
# that sends its whole body before reading the answer gets the 413 instead of a reset.
DRAIN_BYTES = 64 << 20
_SURROGATE = re.compile("[\ud800-\udfff]")


class BodyError(HTTPException):
    """An HTTPException, so that FastAPI passes it through its body parsing unchanged; the
    app's handler answers it in OpenAI's error shape with this code."""

    def __init__(self, status: int, message: str, code: str):
        super().__init__(status_code=status, detail=message)
        self.code = code


def parse_json(body: bytes, max_depth: int):
    try:
        value = json.loads(body, parse_constant=_refuse_constant)
    except UnicodeDecodeError as err:
        raise BodyError(400, f"the request body is not valid UTF-8: {err}",
                        "invalid_unicode") from err
    except RecursionError as err:
        raise BodyError(400, f"the JSON body is nested deeper than {max_depth} levels",
                        "json_too_deep") from err
    _check_tree(value, max_depth)
    return value


def _refuse_constant(name: str):
    raise BodyError(400, f"the JSON body holds {name}, which is not JSON (RFC 8259 has no "
                         f"NaN or Infinity)", "json_invalid")


def _check_tree(value, max_depth: int) -> None:
    """Depth and lone surrogates, without recursion (a deep body must not overflow here)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, str):
            if _SURROGATE.search(node):
                raise BodyError(400, "the JSON body holds a lone UTF-16 surrogate (such as "
                                     "\\ud800), which is not a Unicode character",
                                "invalid_unicode")
            continue
        if not isinstance(node, (dict, list)):
            continue
        if depth > max_depth:
            raise BodyError(400, f"the JSON body is nested deeper than {max_depth} levels",
                            "json_too_deep")
        items = node.items() if isinstance(node, dict) else ((None, x) for x in node)
        for key, item in items:
            if key is not None:
                stack.append((key, depth))
            if isinstance(item, (str, dict, list)):
                stack.append((item, depth + 1))


def _too_large(size: int, limit: int) -> BodyError:
    return BodyError(413, f"the request body has {size} bytes; the limit is {limit} "
                          f"(--max-request-body-bytes)", "body_too_large")


class StrictRequest(Request):
    async def body(self) -> bytes:
        if not hasattr(self, "_body"):
            limit = self.app.state.limits.max_request_body_bytes
            declared = self.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > limit + DRAIN_BYTES:
                raise _too_large(int(declared), limit)  # not worth reading to the end
            size, chunks = 0, []
            async for chunk in self.stream():
                size += len(chunk)
                if size <= limit:
                    chunks.append(chunk)
                elif size > limit + DRAIN_BYTES:
                    break
            if size > limit or (declared.isdigit() and int(declared) > limit):
                raise _too_large(int(declared) if declared.isdigit() else size, limit)
            self._body = b"".join(chunks)
        return self._body

    async def json(self):
        if not hasattr(self, "_json"):
            body = await self.body()
            depth = self.app.state.limits.max_json_depth
            if len(body) > OFF_LOOP_BYTES:
                self._json = await asyncio.to_thread(parse_json, body, depth)
            else:
                self._json = parse_json(body, depth)
        return self._json


class StrictJSONRoute(APIRoute):
    def get_route_handler(self):
        handler = super().get_route_handler()

        async def strict_handler(request: Request):
            return await handler(StrictRequest(request.scope, request.receive))
        return strict_handler
