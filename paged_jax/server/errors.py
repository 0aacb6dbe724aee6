"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}, and the handlers
that turn every failure (bad parameters, malformed JSON, unknown routes) into one."""
from __future__ import annotations

import json
import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type, param, code)

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(status: int, message: str, type: str = "invalid_request_error",
                   param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type, param, code), status_code=status,
                        headers=headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


def from_value_error(err: ValueError) -> OpenAIError:
    """The engine's and SamplingParams' messages start with the offending name ("top_p must
    be in (0, 1], got 2.0"), which becomes the error's param."""
    message = str(err)
    match = (re.match(r"(response_format|structured_outputs|guided_[a-z]+)\b", message)
             or re.match(r"([a-z_]+) must ", message))
    return bad_request(message, param=match.group(1) if match else None)


def context_length_error(max_model_len: int, prompt_len: int, max_tokens: int | None,
                         param: str) -> OpenAIError:
    """param: "prompt" (completions) or "messages" (chat), which the message speaks of."""
    if max_tokens is None:
        message = (f"This model's maximum context length is {max_model_len} tokens. However, "
                   f"your {param} resulted in {prompt_len} tokens. Please reduce the length "
                   f"of the {param}.")
    else:
        message = (f"This model's maximum context length is {max_model_len} tokens. However, "
                   f"you requested {prompt_len + max_tokens} tokens ({prompt_len} in the "
                   f"{param}, {max_tokens} in the completion). Please reduce the length of "
                   f"the {param} or completion.")
    return bad_request(message, param=param, code="context_length_exceeded")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def _documented(description: str) -> dict:
    return {"model": ErrorResponse, "description": description}


# The error statuses the generation routes answer with, for the OpenAPI schema.
ERROR_RESPONSES = {
    400: _documented("Invalid request: a parameter out of range, malformed or non-standard "
                     "JSON, invalid Unicode, a prompt over the context length."),
    401: _documented("Missing or wrong API key."),
    404: _documented("Unknown model."),
    413: _documented("The request body exceeds --max-request-body-bytes."),
    422: _documented("The body is not the request object the route expects."),
    500: _documented("The engine step that computed this request failed; other requests go "
                     "on."),
    503: _documented("The engine is not running, or the server is shutting down."),
}


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def _openai(_: Request, exc: OpenAIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            return error_response(400, f"Malformed JSON body: {first.get('msg', '')}",
                                  code="json_invalid")
        if first.get("type") == "missing" and tuple(first.get("loc", ())) == ("body",):
            return error_response(400, "the request body is empty; expected a JSON object",
                                  code="empty_body")

        def where(e: dict) -> str:
            return ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"

        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = loc[0] if loc else None
        message = "; ".join(f"{where(e)}: {e.get('msg', '')}" for e in errors[:5])
        return error_response(400, message or "invalid request", param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(exc.status_code, str(exc.detail), type=kind,
                              code=getattr(exc, "code", None), headers=exc.headers)

    @app.exception_handler(json.JSONDecodeError)
    async def _json(_: Request, exc: json.JSONDecodeError):
        return error_response(400, f"Malformed JSON body: {exc}", code="json_invalid")

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception):
        log.exception("unhandled error")
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}",
                              type="server_error", code="internal_error")
