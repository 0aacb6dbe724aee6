"""Tool calling through the live server and the openai client: a named function and
"required" held to the tools' schemas by structured outputs, "auto" read by the hermes
parser (the shared server runs with --enable-auto-tool-choice --tool-call-parser hermes),
whole and streamed; the refusals vLLM gives, by field (auto without those flags:
tests/test_tool_choice.py)."""
from __future__ import annotations

import json
from typing import Literal

import openai
import pytest
from pydantic import BaseModel, ConfigDict, Field

from test_server_errors import assert_error

MESSAGES = [{"role": "user", "content": "What is the weather in Paris for three days?"}]


class Weather(BaseModel):
    model_config = ConfigDict(extra="forbid")
    city: Literal["Paris", "Rome", "Oslo"]
    days: int = Field(ge=1, le=7)


class Time(BaseModel):
    model_config = ConfigDict(extra="forbid")
    zone: Literal["UTC", "CET"]


def tool(name: str, model: type[BaseModel]) -> dict:
    return {"type": "function", "function": {"name": name, "description": f"{name} tool",
                                             "parameters": model.model_json_schema()}}


TOOLS = [tool("get_weather", Weather), tool("get_time", Time)]
MODELS = {"get_weather": Weather, "get_time": Time}


def check_call(call) -> BaseModel:
    assert call.type == "function" and call.id.startswith("chatcmpl-tool-")
    return MODELS[call.function.name].model_validate_json(call.function.arguments)


def accumulate(chunks) -> tuple[str, dict[int, dict], str | None]:
    """(content, index -> {id, name, arguments}, finish reason) of a streamed reply, as
    OpenAI clients put the deltas together."""
    content, calls, finish = "", {}, None
    for chunk in chunks:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for d in choice.delta.tool_calls or ():
            call = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = call["id"] or d.id
            call["name"] += d.function.name or ""
            call["arguments"] += d.function.arguments or ""
        finish = choice.finish_reason or finish
    return content, calls, finish


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_named_function_always_gets_arguments_of_its_schema(client, server, temperature):
    out = client.chat.completions.create(
        model=server.model, messages=MESSAGES, tools=TOOLS, max_tokens=60, seed=5,
        temperature=temperature, n=2,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    for choice in out.choices:
        assert choice.finish_reason == "stop" and choice.message.content is None
        (call,) = choice.message.tool_calls
        assert call.function.name == "get_weather"
        check_call(call)
    chunks = client.chat.completions.create(
        model=server.model, messages=MESSAGES, tools=TOOLS, max_tokens=60, seed=5,
        temperature=temperature, stream=True,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    content, calls, finish = accumulate(chunks)
    assert content == "" and finish == "stop" and list(calls) == [0]
    assert calls[0]["name"] == "get_weather" and calls[0]["id"].startswith("chatcmpl-tool-")
    Weather.model_validate_json(calls[0]["arguments"])


def test_the_openai_clients_parse_with_a_pydantic_function_tool(client, server):
    out = client.chat.completions.parse(
        model=server.model, messages=MESSAGES, max_tokens=60,
        tools=[openai.pydantic_function_tool(Weather, name="get_weather")],
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = out.choices[0].message.tool_calls[0]
    assert isinstance(call.function.parsed_arguments, Weather)


@pytest.mark.parametrize("parallel", [True, False])
def test_required_gets_calls_to_the_tools_only(client, server, parallel):
    for seed in range(3):
        out = client.chat.completions.create(
            model=server.model, messages=MESSAGES, tools=TOOLS, tool_choice="required",
            parallel_tool_calls=parallel, max_tokens=120, temperature=1.0, seed=seed)
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.content is None and choice.message.tool_calls
        assert parallel or len(choice.message.tool_calls) == 1
        for call in choice.message.tool_calls:
            check_call(call)
        assert len({c.id for c in choice.message.tool_calls}) == len(choice.message.tool_calls)
    content, calls, finish = accumulate(client.chat.completions.create(
        model=server.model, messages=MESSAGES, tools=TOOLS, tool_choice="required",
        max_tokens=120, temperature=1.0, seed=0, stream=True))
    assert finish == "tool_calls" and calls and content == ""
    for call in calls.values():
        MODELS[call["name"]].model_validate_json(call["arguments"])


def test_none_writes_text_and_a_tool_conversation_renders(client, server):
    out = client.chat.completions.create(model=server.model, messages=MESSAGES, tools=TOOLS,
                                         tool_choice="none", max_tokens=8)
    assert out.choices[0].message.tool_calls in (None, [])
    assert out.choices[0].message.content
    # The turn after a call: the assistant's call and the tool's answer go to the template.
    turn = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 3}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    again = client.chat.completions.create(model=server.model, messages=turn, tools=TOOLS,
                                           tool_choice="none", max_tokens=8)
    assert again.usage.prompt_tokens > out.usage.prompt_tokens


@pytest.mark.parametrize("extra, param, words", [
    (dict(tool_choice="required"), "tool_choice", "needs tools"),
    (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}),
     "tool_choice", "'nope'"),
    (dict(tools=TOOLS, tool_choice="required",
          response_format={"type": "json_object"}), "tool_choice", "response_format"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "frobnicate"}}}}}],
        tool_choice="required"), "tools", None),
])
def test_tool_requests_that_cannot_be_honoured_are_400s(client, server, extra, param, words):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=server.model, messages=MESSAGES, max_tokens=8,
                                       **extra)
    err = assert_error(info.value.body, param)
    assert words is None or words in err["message"]


# The random model never writes a tool call by itself: a regex makes it write hermes's
# format (text, then one call), which the parser must then find.
HERMES = (r'I will check\.<tool_call>\{"name": "get_weather", "arguments": '
          r'\{"city": "(Paris|Rome)", "days": [1-7]\}\}</tool_call>')


def test_auto_reads_hermes_tool_calls_whole_and_streamed(server):
    with server.client() as c:
        out = c.chat.completions.create(
            model=server.model, messages=MESSAGES, tools=TOOLS, max_tokens=60,
            temperature=0, extra_body={"structured_outputs": {"regex": HERMES}})
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content == "I will check."
        (call,) = choice.message.tool_calls
        assert call.function.name == "get_weather"
        assert check_call(call).city in ("Paris", "Rome")
        content, calls, finish = accumulate(c.chat.completions.create(
            model=server.model, messages=MESSAGES, tools=TOOLS, max_tokens=60,
            temperature=0, stream=True, extra_body={"structured_outputs": {"regex": HERMES}}))
        assert finish == "tool_calls" and content == "I will check."
        assert calls[0]["name"] == "get_weather"
        assert json.loads(calls[0]["arguments"]) == json.loads(call.function.arguments)
        # Text without a call stays text, finishing as it stopped.
        plain = c.chat.completions.create(
            model=server.model, messages=MESSAGES, tools=TOOLS, max_tokens=20,
            extra_body={"structured_outputs": {"choice": ["sunny", "rainy"]}})
        assert plain.choices[0].message.content in ("sunny", "rainy")
        assert not plain.choices[0].message.tool_calls
        assert plain.choices[0].finish_reason == "stop"
