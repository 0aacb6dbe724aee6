"""vLLM's tokenizer routes, outside /v1 (and so outside the API key, as in vLLM):

    POST /tokenize     {"prompt": "...", "add_special_tokens": true}
                       or {"messages": [...], chat template fields (ChatTemplateFields)}
                       -> {"count": n, "max_model_len": L, "tokens": [...], "token_strs": null}
                       ("return_token_strs": true -> the tokens' vocabulary strings)
    POST /detokenize   {"tokens": [...]} -> {"prompt": "..."}

Both take vLLM's optional "model"; any other field is a 400 naming it.
"""
from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, StrictInt, ValidationError

from paged_jax.server.errors import ERROR_RESPONSES, bad_request
from paged_jax.server.protocol import ChatTemplateFields
from paged_jax.server.serving import OpenAIServing

_ERRORS = {status: ERROR_RESPONSES[status] for status in (400, 404, 413)}


class TokenizeCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(ChatTemplateFields):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    # vLLM's field; only false here: the chat template writes the special tokens itself
    add_special_tokens: bool = False
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[StrictInt]  # strict: true or "5" is not a token id


class DetokenizeResponse(BaseModel):
    prompt: str


# The request models /tokenize documents by reference (app.py adds them to the schema's
# components: the route reads its body itself, to pick the model).
SCHEMA_MODELS = (TokenizeCompletionRequest, TokenizeChatRequest)
_TOKENIZE_BODY = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": {"oneOf": [{"$ref": f"#/components/schemas/{m.__name__}"}
                         for m in SCHEMA_MODELS]}}}}}


def add_tokenize_routes(app: FastAPI, serving: OpenAIServing, vocab_size: int) -> None:
    """vocab_size: the model's (ids at or past it are refused by /detokenize)."""

    @app.post("/tokenize", response_model=TokenizeResponse, responses=_ERRORS,
              openapi_extra=_TOKENIZE_BODY)
    async def tokenize(request: Request):
        body = await _tokenize_body(request)
        serving._check_model(body.model)
        if isinstance(body, TokenizeChatRequest):
            if body.add_special_tokens:
                raise bad_request("add_special_tokens must be false with messages: the chat "
                                  "template writes the special tokens itself",
                                  param="add_special_tokens")
            ids = await serving.chat_prompt_ids(body)
        else:
            ids = await serving._on_tokenizer_thread(lambda: list(serving.tokenizer.encode(
                body.prompt, add_special_tokens=body.add_special_tokens)))
        strs = None
        if body.return_token_strs:
            strs = await serving._on_tokenizer_thread(
                lambda: list(serving.tokenizer.convert_ids_to_tokens(ids)))
        return TokenizeResponse(count=len(ids), max_model_len=serving.max_model_len,
                                tokens=ids, token_strs=strs).model_dump()

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=_ERRORS)
    async def detokenize(body: DetokenizeRequest):
        serving._check_model(body.model)
        for i, token in enumerate(body.tokens):
            if not 0 <= token < vocab_size:
                raise bad_request(f"tokens[{i}] = {token} is not a token id: the vocabulary "
                                  f"has {vocab_size} tokens (ids 0 to {vocab_size - 1})",
                                  param="tokens")
        text = await serving._on_tokenizer_thread(lambda: serving.tokenizer.decode(body.tokens))
        return DetokenizeResponse(prompt=text).model_dump()


async def _tokenize_body(request: Request) -> TokenizeCompletionRequest | TokenizeChatRequest:
    """The body as the model its shape names ("messages": a chat), validated here rather than
    by FastAPI: a union there answers an unknown field with both models' errors, neither
    naming the field as the param."""
    if not (await request.body()).strip():
        raise bad_request("the request body is empty; expected a JSON object",
                          code="empty_body")
    data = await request.json()  # app.py's StrictRequest: strict JSON, the size limit
    if not isinstance(data, dict):
        raise bad_request(f"the request body must be a JSON object, not "
                          f"{type(data).__name__}")
    model = TokenizeChatRequest if "messages" in data else TokenizeCompletionRequest
    try:
        return model.model_validate(data)
    except ValidationError as err:
        # The app's handler answers these in OpenAI's shape, param the first field named
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])}
                                      for e in err.errors(include_url=False)]) from err
