"""Engine outputs as OpenAI responses: whole, or streamed chunk by chunk.

CompletionFormat writes /v1/completions (with echo: the prompt, and its logprobs, before
each choice's text); ChatFormat writes /v1/chat/completions (with tools: the calls parsed or
constrained out of the text, tool_choice.py). Delta tracks what one streamed choice has
sent.
"""
from __future__ import annotations

import dataclasses
import uuid

from paged_jax.request import CompletionOutput, Logprob, RequestOutput
from paged_jax.sampling_params import SamplingParams
from paged_jax.server import protocol as p
from paged_jax.server.tool_choice import ToolPlan, required_calls
from paged_jax.tool_parsers import get_tool_parser


class Delta:
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


def top_alternatives(entry: dict[int, Logprob], k: int, chosen: int
                     ) -> list[tuple[int, Logprob]]:
    """The top-k alternatives by rank, then the chosen token if it is not among them."""
    top = sorted((x for x in entry.items() if x[1].rank <= k), key=lambda x: x[1].rank)
    if chosen not in {t for t, _ in top}:
        top.append((chosen, entry[chosen]))
    return top


def prompt_logprobs(out: RequestOutput) -> p.PromptLogprobs | None:
    if out.prompt_logprobs is None:
        return None
    return [None if e is None else {t: p.PromptLogprob(**dataclasses.asdict(lp))
                                    for t, lp in e.items()}
            for e in out.prompt_logprobs]


class Format:
    def __init__(self, model_name: str, top: int | None):
        self.model_name = model_name
        self.top = top  # logprobs asked for: None, or how many alternatives

    def output(self, comp: CompletionOutput) -> CompletionOutput:
        """The part of an engine output the client sees."""
        return comp

    def first_chunk(self, request_id, created, index, out: RequestOutput):
        return None


class CompletionFormat(Format):
    def __init__(self, model_name: str, top: int | None, echo: bool = False,
                 echo_only: bool = False, first_token_texts: list[str] = (), n: int = 1):
        """echo: each choice starts with its prompt (text, and logprobs from the prompt
        logprobs); echo_only (max_tokens 0): nothing else (the engine sampled a token,
        which is dropped). first_token_texts: per prompt, its first token's text (which
        has no logprob entry to carry it); n: choices per prompt."""
        super().__init__(model_name, top)
        self.echo = echo
        self.echo_only = echo_only
        self.first_token_texts = list(first_token_texts)
        self.n = n
        self._offsets: dict[int, int] = {}  # choice -> text offset of its next token

    def output(self, comp: CompletionOutput) -> CompletionOutput:
        if not self.echo_only:
            return comp
        return dataclasses.replace(comp, text="", token_ids=[],
                                   logprobs=[] if comp.logprobs is not None else None,
                                   finish_reason=comp.finish_reason and "length",
                                   stop_reason=None)

    def logprobs(self, index: int, ids: list[int], lps) -> p.CompletionLogprobs | None:
        if self.top is None or lps is None:
            return None
        out = p.CompletionLogprobs()
        offset = self._offsets.get(index, 0)
        for token, entry in zip(ids, lps):
            if entry is None:  # the prompt's first token: nothing before it to score it
                texts = self.first_token_texts
                text = texts[index // self.n] if index // self.n < len(texts) else ""
                chosen = top = None
            else:
                text = entry[token].decoded_token
                chosen = entry[token].logprob
                top = {lp.decoded_token or "": lp.logprob
                       for _, lp in top_alternatives(entry, self.top, token)}
            out.tokens.append(text if text is not None else "")
            out.token_logprobs.append(chosen)
            out.top_logprobs.append(top)
            out.text_offset.append(offset)
            offset += len(text or "")
        self._offsets[index] = offset
        return out

    def _prompt_part(self, out: RequestOutput):
        """(text, ids, logprobs) of the echoed prompt."""
        lps = out.prompt_logprobs if self.top is not None else None
        return out.prompt or "", list(out.prompt_token_ids), lps

    def response(self, request_id, choices: list[tuple[int, CompletionOutput, RequestOutput]],
                 usage):
        out_choices = []
        for i, c, out in choices:
            text, ids, lps = c.text, c.token_ids, c.logprobs
            if self.echo:
                ptext, pids, plps = self._prompt_part(out)
                text, ids = ptext + text, pids + ids
                if lps is not None and plps is not None:
                    lps = plps + lps
            out_choices.append(p.CompletionChoice(
                index=i, text=text, finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                logprobs=self.logprobs(i, ids, lps), prompt_logprobs=prompt_logprobs(out)))
        return p.CompletionResponse(id=request_id, model=self.model_name, usage=usage,
                                    choices=out_choices)

    def first_chunk(self, request_id, created, index, out: RequestOutput):
        """With echo, the prompt (and its logprobs) before the first generated text."""
        if not self.echo and out.prompt_logprobs is None:
            return None
        text, ids, lps = self._prompt_part(out) if self.echo else ("", [], None)
        return p.CompletionResponse(id=request_id, created=created, model=self.model_name,
                                    choices=[p.CompletionChoice(
                                        index=index, text=text,
                                        logprobs=self.logprobs(index, ids, lps),
                                        prompt_logprobs=prompt_logprobs(out))])

    def chunk(self, request_id, created, index, text, ids, lps, finish, stop):
        return p.CompletionResponse(id=request_id, created=created, model=self.model_name,
                                    choices=[p.CompletionChoice(
                                        index=index, text=text, finish_reason=finish,
                                        stop_reason=stop,
                                        logprobs=self.logprobs(index, ids, lps))])

    def usage_chunk(self, request_id, created, usage):
        return p.CompletionResponse(id=request_id, created=created, model=self.model_name,
                                    choices=[], usage=usage)


def _tool_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


class ChatFormat(Format):
    def __init__(self, model_name: str, top: int | None, tools: ToolPlan = ToolPlan("none"),
                 echo: str = ""):
        """echo: text every choice's content starts with (the assistant message the reply
        continues, vLLM's chat echo)."""
        super().__init__(model_name, top)
        self.tools = tools
        self.echo = echo
        self.parser = get_tool_parser(tools.parser) if tools.mode == "auto" else None
        self._streams: dict[int, object] = {}  # choice -> its ToolStream (auto)
        self._held: dict[int, str] = {}  # choice -> text held until the end (required)
        self._num_calls: dict[int, int] = {}  # choice -> tool calls streamed

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

    def _message(self, c: CompletionOutput) -> tuple[p.AssistantMessage, str | None]:
        """The assistant message of a whole choice, and its finish reason (vLLM's: a choice
        that called tools by "auto" or "required" finishes with "tool_calls"; by a named
        function, as it stopped)."""
        mode, finish = self.tools.mode, c.finish_reason
        calls: list[tuple[str, str]] | None = None
        content = self.echo + c.text
        if mode == "named":
            calls, content = [(self.tools.function, c.text)], None
        elif mode == "required":
            calls = required_calls(c.text)
            if calls is not None:
                content = None
        elif mode == "auto":
            found = self.parser.extract(c.text)
            if found.tool_calls:
                calls = [(t.name, t.arguments) for t in found.tool_calls]
                content = found.content
        if calls and not self.tools.parallel:
            calls = calls[:1]
        if calls and mode != "named" and finish == "stop":
            finish = "tool_calls"
        return p.AssistantMessage(content=content, tool_calls=[
            p.ToolCall(id=_tool_id(), function=p.FunctionCall(name=n, arguments=a))
            for n, a in calls or ()]), finish

    def response(self, request_id, choices: list[tuple[int, CompletionOutput, RequestOutput]],
                 usage):
        out_choices = []
        for i, c, _ in choices:
            message, finish = self._message(c)
            out_choices.append(p.ChatChoice(index=i, message=message, finish_reason=finish,
                                            stop_reason=c.stop_reason,
                                            logprobs=self.logprobs(c.token_ids, c.logprobs)))
        first = choices[0][2] if choices else None
        return p.ChatCompletionResponse(id=request_id, model=self.model_name, usage=usage,
                                        choices=out_choices,
                                        prompt_logprobs=prompt_logprobs(first) if first
                                        else None)

    def first_chunk(self, request_id, created, index, out: RequestOutput):
        return p.ChatCompletionChunk(id=request_id, created=created, model=self.model_name,
                                     choices=[p.ChatStreamChoice(
                                         index=index,
                                         delta=p.DeltaMessage(role="assistant",
                                                              content=self.echo))])

    def _tool_delta(self, index: int, text: str, finish: str | None):
        """(content, [DeltaToolCall], finish reason) of a streamed piece under tools."""
        mode = self.tools.mode
        if mode == "named":  # the text is the arguments, as it comes
            n = self._num_calls.get(index, 0)
            self._num_calls[index] = 1
            call = p.DeltaToolCall(index=0, function=p.DeltaFunctionCall(arguments=text))
            if n == 0:
                call = p.DeltaToolCall(index=0, id=_tool_id(), type="function",
                                       function=p.DeltaFunctionCall(name=self.tools.function,
                                                                    arguments=text))
            return None, ([call] if text or n == 0 else []), finish
        if mode == "required":  # a JSON array: whole calls once it is complete
            self._held[index] = self._held.get(index, "") + text
            if finish is None:
                return None, [], None
            held = self._held.pop(index)
            calls = required_calls(held)
            if calls is None:  # cut short: what was written, as content
                return held or None, [], finish
            return None, self._calls(index, calls), "tool_calls" if finish == "stop" else finish
        stream = self._streams.get(index)
        if stream is None:
            stream = self._streams[index] = self.parser.stream()
        piece = stream.feed(text)
        content, found = piece.content or "", list(piece.tool_calls)
        if finish is not None:
            last = stream.finish()
            content += last.content or ""
            found += list(last.tool_calls)
        calls = self._calls(index, [(t.name, t.arguments) for _, t in found])
        if finish == "stop" and stream.tools_called:
            finish = "tool_calls"
        return content or None, calls, finish

    def _calls(self, index: int, calls: list[tuple[str, str]]) -> list[p.DeltaToolCall]:
        out = []
        for name, arguments in calls:
            n = self._num_calls.get(index, 0)
            if n and not self.tools.parallel:
                break
            self._num_calls[index] = n + 1
            out.append(p.DeltaToolCall(index=n, id=_tool_id(), type="function",
                                       function=p.DeltaFunctionCall(name=name,
                                                                    arguments=arguments)))
        return out

    def chunk(self, request_id, created, index, text, ids, lps, finish, stop):
        calls = None
        if self.tools.calls_tools:
            text, calls, finish = self._tool_delta(index, text, finish)
            if text is None and not calls and finish is None and not lps:
                return None  # held back
        return p.ChatCompletionChunk(id=request_id, created=created, model=self.model_name,
                                     choices=[p.ChatStreamChoice(
                                         index=index,
                                         delta=p.DeltaMessage(content=text,
                                                              tool_calls=calls or None),
                                         finish_reason=finish, stop_reason=stop,
                                         logprobs=self.logprobs(ids, lps))])

    def usage_chunk(self, request_id, created, usage):
        return p.ChatCompletionChunk(id=request_id, created=created, model=self.model_name,
                                     choices=[], usage=usage)
