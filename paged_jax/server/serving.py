"""/v1/completions and /v1/chat/completions: requests to engine prompts, engine outputs to
OpenAI responses, whole or streamed as server-sent events.

Heavy work stays off the event loop: tokenizing and chat templating run on one tokenizer
thread (a Rust tokenizer must not be used from two threads at once), detokenizing on the
engine thread. A text that is surely over the context length (more characters than
max_model_len tokens can stand for) is refused before it is tokenized at all. (Pydantic
validates a body on the loop; the body limit bounds that.)
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import math
import time
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from paged_jax.request import RequestOutput
from paged_jax.sampling_params import SamplingParams
from paged_jax.server import protocol as p
from paged_jax.server.chat_options import ChatOptions
from paged_jax.server.engine_loop import (ClientDisconnected, EngineDeadError, EngineLoop,
                                          GenerationHandle, RequestFailedError)
from paged_jax.server.formats import ChatFormat, CompletionFormat, Delta, Format
from paged_jax.server.tool_choice import ToolChoiceError, plan_tools
from paged_jax.server.errors import (OpenAIError, bad_request, context_length_error,
                                     error_body, from_value_error)
from paged_jax.server.unsupported import unsupported_fields, unsupported_message
from paged_jax.config import ServerLimits
from paged_jax.tokenizer import max_bytes_per_token, render_chat

CLIENT_CLOSED = 499  # nginx's code; the client is gone and never sees it


class ServerShuttingDownError(RuntimeError):
    pass


# How a request that was accepted and then failed is answered: (status of a whole response,
# code in the error object, which a stream sends as its last event before [DONE]).
_FAILURES = {EngineDeadError: (500, "engine_dead"), RequestFailedError: (500, "step_failed"),
             ServerShuttingDownError: (503, "server_shutting_down")}


class OpenAIServing:
    def __init__(self, engine_loop: EngineLoop, tokenizer, model_name: str, max_model_len: int,
                 max_sequences_per_request: int = ServerLimits.max_sequences_per_request,
                 sampling_defaults: dict | None = None, grammars=None,
                 chat_options: ChatOptions = ChatOptions()):
        """grammars: the engine's GrammarCompiler (structured outputs compile on the
        tokenizer thread), or None if it has none. chat_options: the chat template and tool
        calling (the serve flags)."""
        self.loop = engine_loop
        self.chat_options = chat_options
        self.grammars = grammars
        # The model's generation-config values, for the fields a request leaves unset.
        self.sampling_defaults = dict(sampling_defaults or {})
        self.max_sequences_per_request = max_sequences_per_request
        # The server's own tokenizer, used only on its own thread: the engine thread decodes
        # with the engine's at the same time, and a Rust-backed tokenizer must not be shared
        # across threads.
        self.tokenizer = tokenizer
        self._tokenizer_thread = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="tokenizer")
        self.max_bytes_per_token = max_bytes_per_token(tokenizer)
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.draining = False  # set at shutdown: new requests get a 503
        self._drained = False  # set once drain() ended what was open: later ones end at once
        self._open: set[GenerationHandle] = set()

    def close(self) -> None:
        self._tokenizer_thread.shutdown(wait=False, cancel_futures=True)

    async def drain(self, timeout: float) -> None:
        """Graceful shutdown: refuse new requests, give the running ones `timeout` seconds,
        then end each that is left (a stream with an error event and [DONE], a whole
        response with a 503) and abort it in the engine."""
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while any(not h.done for h in self._open) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        self._shutdown_error = ServerShuttingDownError(
            f"the server is shutting down and this request did not finish within the "
            f"shutdown timeout ({timeout:g} s)")
        self._drained = True
        for handle in list(self._open):
            if not handle.done:
                handle.end(self._shutdown_error)

    # ---- endpoints -------------------------------------------------------------------------

    async def completions(self, body: p.CompletionRequest, request: Request) -> Response:
        self._check_open()
        self._refuse_unsupported(body, "/v1/completions")
        self._check_model(body.model)
        if body.suffix:
            raise bad_request("suffix (text after the completion, fill-in-the-middle) is not "
                              "implemented by this server", param="suffix",
                              code="unsupported_parameter")
        # echo with max_tokens 0: the prompt alone (lm-eval's loglikelihood requests). The
        # engine samples one token, which is dropped, as vLLM does.
        params = self._params(body, 1 if body.echo_only else body.max_tokens, body.logprobs)
        if body.echo and body.logprobs is not None:  # the prompt's tokens need logprobs too
            params = dataclasses.replace(params, prompt_logprobs=max(
                params.prompt_logprobs or 0, body.logprobs))
        asked = self._asked_max_tokens(1 if body.echo_only else body.max_tokens, params)
        await self._compile_constraint(body, params)
        texts = body.prompts()
        if not texts:
            raise bad_request("prompt must not be empty", param="prompt")
        if len(texts) * params.n > self.max_sequences_per_request:
            raise bad_request(f"the request holds {len(texts)} prompts x n={params.n} = "
                              f"{len(texts) * params.n} sequences; the limit is "
                              f"{self.max_sequences_per_request} (--max-sequences-per-request)",
                              param="prompt", code="too_many_sequences")
        keep = self._kept_prompt_tokens(params)
        for text in texts:
            if isinstance(text, str) and keep is None:  # (a truncated text may be long)
                self._check_text_length(text, asked)
        prompts = await self._on_tokenizer_thread(
            lambda: [self._completion_prompt(x, body.echo, keep) for x in texts])
        for prompt in prompts:
            self._check_context(len(prompt["prompt_token_ids"]), asked, "prompt")
        firsts = []
        if body.echo and body.logprobs is not None:
            firsts = await self._on_tokenizer_thread(lambda: [
                self.tokenizer.decode(x["prompt_token_ids"][:1]) for x in prompts])
        return await self._serve(body, request, prompts, params, "cmpl", CompletionFormat(
            self.model_name, body.logprobs, body.echo, body.echo_only, firsts, params.n))

    async def chat(self, body: p.ChatCompletionRequest, request: Request) -> Response:
        self._check_open()
        self._refuse_unsupported(body, "/v1/chat/completions")
        self._check_model(body.model)
        if body.top_logprobs and not body.logprobs:
            raise bad_request("top_logprobs needs logprobs to be true", param="top_logprobs")
        limit = getattr(getattr(self.loop.engine, "config", None), "max_logprobs", None)
        if body.top_logprobs and limit is not None and body.top_logprobs > limit:
            # (the engine would name its own field, logprobs)
            raise bad_request(f"top_logprobs must be at most max_logprobs ({limit}), got "
                              f"{body.top_logprobs}", param="top_logprobs")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = self._params(body, body.requested_max_tokens, logprobs)
        asked = self._asked_max_tokens(body.requested_max_tokens, params)
        try:
            tools = plan_tools(body.tools, body.tool_choice, body.parallel_tool_calls,
                               self.chat_options)
        except ToolChoiceError as err:
            raise bad_request(str(err), param=err.param) from err
        if tools.constraint is not None:  # "required" or a named function
            if params.structured_outputs is not None:
                raise bad_request("tool_choice (required, or a named function) constrains "
                                  "the output already; it cannot take a response_format or "
                                  "structured_outputs too", param="tool_choice")
            params = dataclasses.replace(params, structured_outputs=tools.constraint)
        await self._compile_constraint(body, params, "tools" if tools.constraint else None)

        keep = self._kept_prompt_tokens(params)
        ids = await self.chat_prompt_ids(body, asked, check_length=keep is None)
        ids = ids[-keep:] if keep is not None else ids
        self._check_context(len(ids), asked, "messages")
        return await self._serve(body, request, [{"prompt_token_ids": ids}], params, "chatcmpl",
                                 ChatFormat(self.model_name, logprobs, tools, body.echo_text))

    async def chat_prompt_ids(self, body, max_tokens: int | None = None,
                              check_length: bool = True) -> list[int]:
        """The token ids of a chat request's messages rendered with the chat template (the
        server's --chat-template, a trusted request's own, or the tokenizer's), on the
        tokenizer thread. body: a ChatCompletionRequest, or any model with its template
        fields (messages, add_generation_prompt, continue_final_message, tools,
        chat_template, chat_template_kwargs). 400 naming the field for what cannot render.
        check_length: refuse a text surely over the context before tokenizing it."""
        template = self.chat_options.chat_template
        if getattr(body, "chat_template", None) is not None:
            if not self.chat_options.trust_request_chat_template:
                raise bad_request("a request's own chat_template is refused: the server "
                                  "was not started with --trust-request-chat-template",
                                  param="chat_template")
            template = body.chat_template
        tools = [t.model_dump(exclude_none=True) if hasattr(t, "model_dump") else t
                 for t in getattr(body, "tools", None) or ()]

        def render():
            try:
                text = render_chat(
                    self.tokenizer, body.conversation(),
                    add_generation_prompt=body.add_generation_prompt,
                    tools=tools or None, chat_template=template,
                    continue_final_message=getattr(body, "continue_final_message", False),
                    chat_template_kwargs=getattr(body, "chat_template_kwargs", None))
            except Exception as err:  # no template, roles it rejects, non-text content
                raise bad_request(f"the chat template could not be applied: {err}",
                                  param="messages") from err
            if check_length:
                self._check_text_length(text, max_tokens, "messages")
            return list(self.tokenizer.encode(text, add_special_tokens=False))

        return await self._on_tokenizer_thread(render)

    # ---- shared ----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self.draining:
            raise OpenAIError(503, "the server is shutting down", type="server_error",
                              code="server_shutting_down")

    async def _on_tokenizer_thread(self, fn):
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer_thread, fn)

    def _check_text_length(self, text: str, max_tokens: int | None,
                           param: str = "prompt") -> None:
        """Refuses a text (a prompt, or rendered messages) that has more characters than
        max_model_len tokens can stand for: it is surely too long, and tokenizing megabytes
        takes seconds."""
        if self.max_bytes_per_token is None:
            return
        at_least = math.ceil(len(text) / self.max_bytes_per_token)  # characters <= bytes
        if at_least + (max_tokens or 0) <= self.max_model_len and at_least < self.max_model_len:
            return
        asked = "" if max_tokens is None else f", and {max_tokens} more in the completion"
        raise OpenAIError(
            400, f"This model's maximum context length is {self.max_model_len} tokens. However, "
            f"your {param} of {len(text)} characters take at least {at_least} tokens (a token "
            f"stands for at most {self.max_bytes_per_token} bytes){asked}. Please reduce the "
            f"length of the {param}.", param=param, code="context_length_exceeded")

    @staticmethod
    def _refuse_unsupported(body, endpoint: str) -> None:
        """A 400 naming the first field of the body that this server does not implement."""
        names = unsupported_fields(body.model_extra)
        if body.stream_options is not None:
            names += [f"stream_options.{n}"
                      for n in unsupported_fields(body.stream_options.model_extra)]
        if names:
            raise bad_request(unsupported_message(names, endpoint), param=names[0],
                              code="unsupported_parameter")

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise OpenAIError(404, f"The model `{model}` does not exist.", param="model",
                              code="model_not_found")

    def _asked_max_tokens(self, requested: int | None, params: SamplingParams) -> int | None:
        """The max_tokens a prompt must leave room for: the request's own, or OpenAI's 16 for
        completions. A default from the model's generation config is capped to the context
        left instead (the engine does), as in vLLM, so it never refuses a prompt."""
        return requested if requested is not None or "max_tokens" in self.sampling_defaults \
            else params.max_tokens

    async def _compile_constraint(self, body, params: SamplingParams,
                                  param: str | None = None) -> None:
        """Compiles a structured-output constraint here, on the tokenizer thread, so that the
        engine thread finds it compiled; one that cannot compile is a 400 naming why (and
        param, or the field that asked for it)."""
        so = params.structured_outputs
        if so is None:
            return
        param = param or ("structured_outputs" if body.structured_outputs
                          else f"guided_{so.kind}" if getattr(body, f"guided_{so.kind}", None)
                          else "response_format")
        if self.grammars is None:
            raise bad_request("structured outputs need a tokenizer; this model has none",
                              param=param)
        try:
            await self._on_tokenizer_thread(lambda: self.grammars.template(so))
        except ValueError as err:
            raise bad_request(str(err), param=param) from err

    def _params(self, body, max_tokens, logprobs) -> SamplingParams:
        try:
            return body.sampling_params(max_tokens, logprobs, self.sampling_defaults)
        except ValueError as err:
            raise from_value_error(err) from err

    def _completion_prompt(self, prompt, with_text: bool = False,
                           keep: int | None = None) -> dict:
        """with_text: a prompt given as token ids gets its text too (echo shows it). keep:
        truncate_prompt_tokens (the last `keep` tokens; the text then is theirs)."""
        text = prompt if isinstance(prompt, str) else None
        ids = list(self.tokenizer.encode(prompt)) if text is not None else [
            int(t) for t in prompt]
        if keep is not None and len(ids) > keep:
            ids = ids[-keep:]
            text = self.tokenizer.decode(ids) if text is not None else None
        if text is None and with_text:
            text = self.tokenizer.decode(ids)
        return {"prompt": text, "prompt_token_ids": ids} if text is not None else {
            "prompt_token_ids": ids}

    def _kept_prompt_tokens(self, params: SamplingParams) -> int | None:
        """truncate_prompt_tokens as a count (-1: max_model_len), or None."""
        k = params.truncate_prompt_tokens
        if k is None:
            return None
        k = self.max_model_len if k == -1 else k
        if k > self.max_model_len:
            raise bad_request(f"truncate_prompt_tokens must be at most max_model_len "
                              f"({self.max_model_len}), got {k}",
                              param="truncate_prompt_tokens")
        return k

    def _check_context(self, prompt_len: int, max_tokens: int | None, param: str) -> None:
        if prompt_len + (max_tokens or 0) > self.max_model_len or (
                max_tokens is None and prompt_len >= self.max_model_len):
            raise context_length_error(self.max_model_len, prompt_len, max_tokens, param)

    async def _serve(self, body, request: Request, prompts: list[dict], params: SamplingParams,
                     prefix: str, fmt: Format) -> Response:
        request_id = p.random_id(prefix)
        self._check_open()
        try:
            trace = (self.loop.tracer.context_from_headers(request.headers)
                     if self.loop.tracer is not None else None)
            handle = await self.loop.submit(prompts, params, request_id, trace_context=trace)
        except ValueError as err:
            raise from_value_error(err) from err
        except EngineDeadError as err:
            raise OpenAIError(503, str(err), type="server_error", code="engine_dead") from err
        self._open = {h for h in self._open if not h.done}
        self._open.add(handle)
        if self._drained:  # submitted while drain() ended the others: end it the same way
            handle.end(self._shutdown_error)
        handle.watch_disconnect(request.receive)
        prompt_tokens = sum(len(x["prompt_token_ids"]) for x in prompts)
        if body.stream:
            events = self._stream(handle, fmt, request_id, params, prompt_tokens,
                                  body.include_usage)
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        finals: dict[int, RequestOutput] = {}
        try:
            async for index, out in handle:
                if out.finished:
                    finals[index] = out
        except ClientDisconnected:
            return Response(status_code=CLIENT_CLOSED)
        except tuple(_FAILURES) as err:
            status, code = _FAILURES[type(err)]
            raise OpenAIError(status, str(err), type="server_error", code=code) from err
        choices = [(index * params.n + c.index, fmt.output(c), finals[index])
                   for index in sorted(finals) for c in finals[index].outputs]
        completion_tokens = sum(len(c.token_ids) for _, c, _ in choices)
        usage = _usage(prompt_tokens, completion_tokens,
                       sum(out.num_cached_tokens for out in finals.values()))
        return JSONResponse(fmt.response(request_id, choices, usage).model_dump())

    async def _stream(self, handle: GenerationHandle, fmt: Format, request_id: str,
                      params: SamplingParams, prompt_tokens: int,
                      include_usage: bool) -> AsyncIterator[str]:
        created = int(time.time())
        deltas: dict[int, Delta] = {}
        cached: dict[int, int] = {}  # prompt -> its tokens from the prefix cache
        try:
            async for index, out in handle:
                cached[index] = out.num_cached_tokens
                for comp in out.outputs:
                    choice = index * params.n + comp.index
                    if choice not in deltas:
                        deltas[choice] = Delta(params)
                        first = fmt.first_chunk(request_id, created, choice, out)
                        if first is not None:
                            yield _sse(first)
                    step = deltas[choice].advance(fmt.output(comp))
                    chunk = (fmt.chunk(request_id, created, choice, *step)
                             if step is not None else None)
                    if chunk is not None:  # (None: held back, as a tool call being written)
                        yield _sse(chunk)
            if include_usage:
                completion_tokens = sum(d.num_tokens for d in deltas.values())
                usage = _usage(prompt_tokens, completion_tokens, sum(cached.values()))
                yield _sse(fmt.usage_chunk(request_id, created, usage))
            yield "data: [DONE]\n\n"
        except ClientDisconnected:
            return
        except tuple(_FAILURES) as err:
            code = _FAILURES[type(err)][1]
            yield f"data: {json.dumps(error_body(str(err), 'server_error', code=code))}\n\n"
            yield "data: [DONE]\n\n"


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> p.UsageInfo:
    return p.UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                       total_tokens=prompt_tokens + completion_tokens,
                       prompt_tokens_details=p.PromptTokensDetails(cached_tokens=cached_tokens))


def _sse(model) -> str:
    return f"data: {model.model_dump_json()}\n\n"
