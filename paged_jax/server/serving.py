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
import json
import math
import time
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from paged_jax.request import CompletionOutput, Logprob, RequestOutput
from paged_jax.sampling_params import SamplingParams
from paged_jax.server import protocol as p
from paged_jax.server.engine_loop import (ClientDisconnected, EngineDeadError, EngineLoop,
                                          GenerationHandle, RequestFailedError)
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
                 sampling_defaults: dict | None = None, grammars=None):
        """grammars: the engine's GrammarCompiler (structured outputs compile on the
        tokenizer thread), or None if it has none."""
        self.loop = engine_loop
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
        if body.echo or body.suffix:
            raise bad_request("echo and suffix are not supported", param="echo"
                              if body.echo else "suffix")
        params = self._params(body, body.max_tokens, body.logprobs)
        asked = self._asked_max_tokens(body.max_tokens, params)
        await self._compile_constraint(body, params)
        texts = body.prompts()
        if not texts:
            raise bad_request("prompt must not be empty", param="prompt")
        if len(texts) * params.n > self.max_sequences_per_request:
            raise bad_request(f"the request holds {len(texts)} prompts x n={params.n} = "
                              f"{len(texts) * params.n} sequences; the limit is "
                              f"{self.max_sequences_per_request} (--max-sequences-per-request)",
                              param="prompt", code="too_many_sequences")
        for text in texts:
            if isinstance(text, str):
                self._check_text_length(text, asked)
        prompts = await self._on_tokenizer_thread(
            lambda: [self._completion_prompt(x) for x in texts])
        for prompt in prompts:
            self._check_context(len(prompt["prompt_token_ids"]), asked, "prompt")
        return await self._serve(body, request, prompts, params, "cmpl", _CompletionFormat(
            self.model_name, body.logprobs))

    async def chat(self, body: p.ChatCompletionRequest, request: Request) -> Response:
        self._check_open()
        self._refuse_unsupported(body, "/v1/chat/completions")
        self._check_model(body.model)
        if body.top_logprobs and not body.logprobs:
            raise bad_request("top_logprobs needs logprobs to be true", param="top_logprobs")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = self._params(body, body.requested_max_tokens, logprobs)
        asked = self._asked_max_tokens(body.requested_max_tokens, params)
        await self._compile_constraint(body, params)

        def render():
            try:
                text = render_chat(self.tokenizer, body.conversation(),
                                   add_generation_prompt=body.add_generation_prompt)
            except Exception as err:  # no template, roles it rejects, non-text content
                raise bad_request(f"the chat template could not be applied: {err}",
                                  param="messages") from err
            self._check_text_length(text, asked, "messages")
            return list(self.tokenizer.encode(text, add_special_tokens=False))

        ids = await self._on_tokenizer_thread(render)
        self._check_context(len(ids), asked, "messages")
        return await self._serve(body, request, [{"prompt_token_ids": ids}], params, "chatcmpl",
                                 _ChatFormat(self.model_name, logprobs))

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

    async def _compile_constraint(self, body, params: SamplingParams) -> None:
        """Compiles a structured-output constraint here, on the tokenizer thread, so that the
        engine thread finds it compiled; one that cannot compile is a 400 naming why."""
        so = params.structured_outputs
        if so is None:
            return
        param = ("structured_outputs" if body.structured_outputs
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

    def _completion_prompt(self, prompt) -> dict:
        if isinstance(prompt, str):
            return {"prompt": prompt, "prompt_token_ids": list(self.tokenizer.encode(prompt))}
        return {"prompt_token_ids": [int(t) for t in prompt]}

    def _check_context(self, prompt_len: int, max_tokens: int | None, param: str) -> None:
        if prompt_len + (max_tokens or 0) > self.max_model_len or (
                max_tokens is None and prompt_len >= self.max_model_len):
            raise context_length_error(self.max_model_len, prompt_len, max_tokens, param)

    async def _serve(self, body, request: Request, prompts: list[dict], params: SamplingParams,
                     prefix: str, fmt: "_Format") -> Response:
        request_id = p.random_id(prefix)
        self._check_open()
        try:
            handle = await self.loop.submit(prompts, params, request_id)
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
        choices = [(index * params.n + c.index, c) for index in sorted(finals)
                   for c in finals[index].outputs]
        completion_tokens = sum(len(c.token_ids) for _, c in choices)
        usage = p.UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                            total_tokens=prompt_tokens + completion_tokens)
        return JSONResponse(fmt.response(request_id, choices, usage).model_dump())

    async def _stream(self, handle: GenerationHandle, fmt: "_Format", request_id: str,
                      params: SamplingParams, prompt_tokens: int,
                      include_usage: bool) -> AsyncIterator[str]:
        created = int(time.time())
        deltas: dict[int, _Delta] = {}
        try:
            async for index, out in handle:
                for comp in out.outputs:
                    choice = index * params.n + comp.index
                    if choice not in deltas:
                        deltas[choice] = _Delta(params)
                        first = fmt.first_chunk(request_id, created, choice)
                        if first is not None:
                            yield _sse(first)
                    step = deltas[choice].advance(comp)
                    if step is not None:
                        yield _sse(fmt.chunk(request_id, created, choice, *step))
            if include_usage:
                completion_tokens = sum(d.num_tokens for d in deltas.values())
                usage = p.UsageInfo(prompt_tokens=prompt_tokens,
                                    completion_tokens=completion_tokens,
                                    total_tokens=prompt_tokens + completion_tokens)
                yield _sse(fmt.usage_chunk(request_id, created, usage))
            yield "data: [DONE]\n\n"
        except ClientDisconnected:
            return
        except tuple(_FAILURES) as err:
            code = _FAILURES[type(err)][1]
            yield f"data: {json.dumps(error_body(str(err), 'server_error', code=code))}\n\n"
            yield "data: [DONE]\n\n"


def _sse(model) -> str:
    return f"data: {model.model_dump_json()}\n\n"


class _Delta:
    """What one choice has streamed so far; advance() gives the new part of its output.

    Text that may still change is held back: the tail that could be the start of a stop
    string (it is cut from the output if the stop string completes) and trailing U+FFFD
    (a character whose remaining bytes are in tokens not generated yet)."""

    def __init__(self, params: SamplingParams):
        self.hold = max((len(s) for s in params.stop), default=1) - 1
        if params.include_stop_str_in_output:
            self.hold = 0
        self.sent_chars = 0
        self.num_tokens = 0
        self.done = False

    def advance(self, comp: CompletionOutput):
        """(text, token ids, logprobs, finish reason, stop reason) new since the last call,
        or None when there is nothing to send."""
        if self.done:
            return None
        text, finished = comp.text, comp.finish_reason is not None
        end = len(text)
        if not finished:
            end = max(self.sent_chars, end - self.hold)
            while end > self.sent_chars and text[end - 1] == "\ufffd":
                end -= 1
        new_text = text[self.sent_chars:end]
        ids = comp.token_ids[self.num_tokens:]
        lps = comp.logprobs[self.num_tokens:] if comp.logprobs is not None else None
        self.sent_chars = max(self.sent_chars, end)
        self.num_tokens = len(comp.token_ids)
        self.done = finished
        if not new_text and not finished and not lps:
            return None
        return new_text, ids, lps, comp.finish_reason, comp.stop_reason


def _top(entry: dict[int, Logprob], k: int, chosen: int) -> list[tuple[int, Logprob]]:
    """The top-k alternatives by rank, then the chosen token if it is not among them."""
    top = sorted((x for x in entry.items() if x[1].rank <= k), key=lambda x: x[1].rank)
    if chosen not in {t for t, _ in top}:
        top.append((chosen, entry[chosen]))
    return top


class _Format:
    def __init__(self, model_name: str, top: int | None):
        self.model_name = model_name
        self.top = top  # logprobs asked for: None, or how many alternatives

    def first_chunk(self, request_id, created, index):
        return None


class _CompletionFormat(_Format):
    def __init__(self, model_name: str, top: int | None):
        super().__init__(model_name, top)
        self._offsets: dict[int, int] = {}  # choice -> text offset of its next token

    def logprobs(self, index: int, ids: list[int], lps) -> p.CompletionLogprobs | None:
        if self.top is None or lps is None:
            return None
        out = p.CompletionLogprobs()
        offset = self._offsets.get(index, 0)
        for token, entry in zip(ids, lps):
            chosen = entry[token]
            text = chosen.decoded_token or ""
            out.tokens.append(text)
            out.token_logprobs.append(chosen.logprob)
            out.top_logprobs.append({lp.decoded_token or "": lp.logprob
                                     for _, lp in _top(entry, self.top, token)})
            out.text_offset.append(offset)
            offset += len(text)
        self._offsets[index] = offset
        return out

    def response(self, request_id, choices: list[tuple[int, CompletionOutput]], usage):
        return p.CompletionResponse(id=request_id, model=self.model_name, usage=usage, choices=[
            p.CompletionChoice(index=i, text=c.text, finish_reason=c.finish_reason,
                               stop_reason=c.stop_reason,
                               logprobs=self.logprobs(i, c.token_ids, c.logprobs))
            for i, c in choices])

    def chunk(self, request_id, created, index, text, ids, lps, finish, stop):
        return p.CompletionResponse(id=request_id, created=created, model=self.model_name,
                                    choices=[p.CompletionChoice(
                                        index=index, text=text, finish_reason=finish,
                                        stop_reason=stop,
                                        logprobs=self.logprobs(index, ids, lps))])

    def usage_chunk(self, request_id, created, usage):
        return p.CompletionResponse(id=request_id, created=created, model=self.model_name,
                                    choices=[], usage=usage)


class _ChatFormat(_Format):
    def logprobs(self, ids: list[int], lps) -> p.ChatLogprobs | None:
        if self.top is None or lps is None:
            return None

        def entry(lp: Logprob) -> dict:
            token = lp.decoded_token or ""
            return dict(token=token, logprob=lp.logprob, bytes=list(token.encode("utf-8")))

        return p.ChatLogprobs(content=[
            p.ChatLogprob(**entry(e[t]), top_logprobs=[  # the chosen token only by rank
                p.TopLogprob(**entry(lp))
                for _, lp in sorted(e.items(), key=lambda x: x[1].rank) if lp.rank <= self.top])
            for t, e in zip(ids, lps)])

    def response(self, request_id, choices: list[tuple[int, CompletionOutput]], usage):
        return p.ChatCompletionResponse(id=request_id, model=self.model_name, usage=usage,
                                        choices=[p.ChatChoice(
                                            index=i, message=p.AssistantMessage(content=c.text),
                                            finish_reason=c.finish_reason,
                                            stop_reason=c.stop_reason,
                                            logprobs=self.logprobs(c.token_ids, c.logprobs))
                                            for i, c in choices])

    def first_chunk(self, request_id, created, index):
        return p.ChatCompletionChunk(id=request_id, created=created, model=self.model_name,
                                     choices=[p.ChatStreamChoice(
                                         index=index,
                                         delta=p.DeltaMessage(role="assistant", content=""))])

    def chunk(self, request_id, created, index, text, ids, lps, finish, stop):
        return p.ChatCompletionChunk(id=request_id, created=created, model=self.model_name,
                                     choices=[p.ChatStreamChoice(
                                         index=index, delta=p.DeltaMessage(content=text),
                                         finish_reason=finish, stop_reason=stop,
                                         logprobs=self.logprobs(ids, lps))])

    def usage_chunk(self, request_id, created, usage):
        return p.ChatCompletionChunk(id=request_id, created=created, model=self.model_name,
                                     choices=[], usage=usage)

