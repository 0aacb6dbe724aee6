"""Tool-call parsers for the OpenAI-compatible chat server (`--tool-call-parser`).

Two of vLLM's parsers, under vLLM's names:

- "hermes" (Hermes 2 Pro, Qwen 2.5): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
  blocks, possibly after some plain text.
- "llama3_json" (Llama 3.1/3.2): the whole response, optionally after `<|python_tag|>`, is one
  JSON object `{"name": ..., "parameters": {...}}`, or several joined by `;`.

`ToolParser.extract` parses a whole response; `ToolParser.stream` gives a `ToolStream` that is
fed a streamed response piece by piece. Content rule, shared by both: `extract().content` is the
text as the model wrote it (not stripped), or None when it is empty or whitespace only; the
content pieces a stream emits (feed() then finish()) join to exactly that text, or to "" when
it is None. A stream emits each tool call whole (name and full arguments in one delta), with the
same names and arguments extract() finds; only the random ids differ. Parsing never raises:
what does not parse as a tool call is content.

Pure Python: the server imports this without JAX.
"""
from __future__ import annotations

import dataclasses
import json
import re
import uuid
from typing import Any


@dataclasses.dataclass(frozen=True)
class ToolCall:
    id: str  # "chatcmpl-tool-" + uuid4().hex, the shape vLLM gives
    name: str
    arguments: str  # a JSON object as text


@dataclasses.dataclass(frozen=True)
class ExtractedToolCalls:
    tool_calls: list[ToolCall]
    content: str | None  # the text outside the tool calls; None if empty or whitespace only


@dataclasses.dataclass(frozen=True)
class ToolCallDelta:
    """One piece of a streamed response: content text, then the tool calls completed in it."""
    content: str | None = None
    tool_calls: tuple[tuple[int, ToolCall], ...] = ()  # (index in this response, call)


def _reject_constant(name: str) -> Any:
    # NaN and Infinity parse in Python but json.dumps would write them back as invalid JSON.
    raise ValueError(f"{name} is not JSON")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def _make_call(obj: Any, argument_keys: tuple[str, ...]) -> ToolCall | None:
    """The ToolCall that `obj` describes, or None if it is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    arguments = next((obj[key] for key in argument_keys if key in obj), None)
    if arguments is None:
        arguments = {}
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = _DECODER.decode(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(id=f"chatcmpl-tool-{uuid.uuid4().hex}", name=obj["name"],
                    arguments=json.dumps(arguments, ensure_ascii=False))


def _content(text: str) -> str | None:
    return text if text.strip() else None


class ToolStream:
    """An incremental parser for one streamed response."""

    def __init__(self) -> None:
        self._num_calls = 0

    @property
    def tools_called(self) -> bool:
        return self._num_calls > 0

    def feed(self, delta_text: str) -> ToolCallDelta:
        raise NotImplementedError

    def finish(self) -> ToolCallDelta:
        raise NotImplementedError

    def _delta(self, content: str, calls: list[ToolCall]) -> ToolCallDelta:
        indexed = tuple(enumerate(calls, start=self._num_calls))
        self._num_calls += len(calls)
        return ToolCallDelta(content=content or None, tool_calls=indexed)


class ToolParser:
    def extract(self, text: str) -> ExtractedToolCalls:
        raise NotImplementedError

    def stream(self) -> ToolStream:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# hermes

_START, _END = "<tool_call>", "</tool_call>"
# Non-greedy, so a block ends at the first </tool_call>; the stream cuts blocks the same way.
_BLOCK = re.compile(re.escape(_START) + "(.*?)" + re.escape(_END), re.DOTALL)


def _hermes_call(body: str) -> ToolCall | None:
    try:
        return _make_call(_DECODER.decode(body.strip()), ("arguments",))
    except ValueError:
        return None


def _partial_start(text: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of <tool_call>."""
    for n in range(min(len(text), len(_START) - 1), 0, -1):
        if _START.startswith(text[-n:]):
            return n
    return 0


class HermesToolParser(ToolParser):
    def extract(self, text: str) -> ExtractedToolCalls:
        calls: list[ToolCall] = []
        content_end = len(text)
        for match in _BLOCK.finditer(text):
            call = _hermes_call(match.group(1))
            if call is None:  # a malformed block stays in the content, as written
                continue
            if not calls:
                content_end = match.start()
            calls.append(call)
        # Like vLLM, the content is only the text before the first tool call; what the model
        # writes between or after calls is dropped.
        return ExtractedToolCalls(calls, _content(text[:content_end]))

    def stream(self) -> HermesToolStream:
        return HermesToolStream()


class HermesToolStream(ToolStream):
    def __init__(self) -> None:
        super().__init__()
        self._buf = ""  # text not yet emitted nor dropped
        self._in_block = False  # _buf starts with <tool_call> and its </tool_call> is not here
        self._held_space = ""  # leading whitespace: content only if some text follows it
        self._text_emitted = False
        self._content_over = False  # a call was found: later text is dropped (see extract)

    def _emit(self, text: str, out: list[str]) -> None:
        if self._content_over:
            return
        if not self._text_emitted:
            text = self._held_space + text
            if not text.strip():
                self._held_space = text
                return
            self._text_emitted, self._held_space = True, ""
        out.append(text)

    def feed(self, delta_text: str) -> ToolCallDelta:
        self._buf += delta_text
        out: list[str] = []
        calls: list[ToolCall] = []
        while True:
            if not self._in_block:
                start = self._buf.find(_START)
                if start < 0:
                    # Hold back a tail that may grow into <tool_call>; the rest is content.
                    cut = len(self._buf) - _partial_start(self._buf)
                    self._emit(self._buf[:cut], out)
                    self._buf = self._buf[cut:]
                    break
                self._emit(self._buf[:start], out)
                self._buf, self._in_block = self._buf[start:], True
            end = self._buf.find(_END, len(_START))
            if end < 0:
                break  # hold the block until it is complete
            end += len(_END)
            block, self._buf, self._in_block = self._buf[:end], self._buf[end:], False
            call = _hermes_call(block[len(_START):-len(_END)])
            if call is None:
                self._emit(block, out)
            else:
                calls.append(call)
                self._content_over = True
        return self._delta("".join(out), calls)

    def finish(self) -> ToolCallDelta:
        # An unterminated block, or a held-back partial tag, is content as the model wrote it.
        out: list[str] = []
        self._emit(self._buf, out)
        self._buf, self._in_block = "", False
        return self._delta("".join(out), [])


# ---------------------------------------------------------------------------------------------
# llama3_json

_PYTHON_TAG = "<|python_tag|>"


class Llama3JsonToolParser(ToolParser):
    def extract(self, text: str) -> ExtractedToolCalls:
        plain = ExtractedToolCalls([], _content(text))
        body = text.strip()
        if body.startswith(_PYTHON_TAG):
            body = body[len(_PYTHON_TAG):].lstrip()
        if not body.startswith("{"):
            return plain
        calls: list[ToolCall] = []
        pos = 0
        while True:  # objects joined by ";", as vLLM accepts
            try:
                obj, pos = _DECODER.raw_decode(body, pos)
            except ValueError:
                return plain  # any invalid part makes the whole text content
            call = _make_call(obj, ("parameters", "arguments"))
            if call is None:
                return plain
            calls.append(call)
            pos = len(body) - len(body[pos:].lstrip())
            if pos == len(body):
                return ExtractedToolCalls(calls, None)
            if body[pos] != ";":
                return plain
            pos = len(body) - len(body[pos + 1:].lstrip())

    def stream(self) -> Llama3JsonToolStream:
        return Llama3JsonToolStream(self)


class Llama3JsonToolStream(ToolStream):
    def __init__(self, parser: Llama3JsonToolParser) -> None:
        super().__init__()
        self._parser = parser
        self._buf = ""
        self._mode: str | None = None  # None: undecided; "json": held to the end; "text"

    def feed(self, delta_text: str) -> ToolCallDelta:
        if self._mode == "text":
            return self._delta(delta_text, [])
        self._buf += delta_text
        if self._mode == "json":
            return ToolCallDelta()
        head = self._buf.lstrip()
        if not head or _PYTHON_TAG.startswith(head):
            return ToolCallDelta()  # whitespace or a partial tag: wait for more
        if head.startswith("{") or head.startswith(_PYTHON_TAG):
            # A call is parsed only at the end: an invalid later part turns the whole text
            # into content, and calls emitted early could not be taken back.
            self._mode = "json"
            return ToolCallDelta()
        self._mode, text, self._buf = "text", self._buf, ""
        return self._delta(text, [])

    def finish(self) -> ToolCallDelta:
        if self._mode == "text":
            return ToolCallDelta()
        result = self._parser.extract(self._buf)
        self._buf = ""
        return self._delta(result.content or "", result.tool_calls)


TOOL_PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesToolParser,
    "llama3_json": Llama3JsonToolParser,
}


def get_tool_parser(name: str) -> ToolParser:
    if name not in TOOL_PARSERS:
        raise ValueError(f"unknown tool call parser {name!r}; choices: "
                         f"{', '.join(sorted(TOOL_PARSERS))}")
    return TOOL_PARSERS[name]()
