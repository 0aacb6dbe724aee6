"""The tool-call parsers (paged_jax/tool_parsers.py): whole responses, and the same responses
streamed in random pieces, which must give the same content and tool calls."""
from __future__ import annotations

import json
import random
import re

import pytest

from paged_jax.tool_parsers import (
    TOOL_PARSERS,
    ExtractedToolCalls,
    ToolCall,
    ToolCallDelta,
    get_tool_parser,
)

HERMES = get_tool_parser("hermes")
LLAMA = get_tool_parser("llama3_json")


def calls_of(result: ExtractedToolCalls) -> list[tuple[str, dict]]:
    return [(call.name, json.loads(call.arguments)) for call in result.tool_calls]


def block(name: str, arguments) -> str:
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": arguments})}\n</tool_call>'


# --- hermes ----------------------------------------------------------------------------------

def test_hermes_one_call():
    result = HERMES.extract(block("get_weather", {"city": "Paris", "days": 3}))
    assert calls_of(result) == [("get_weather", {"city": "Paris", "days": 3})]
    assert result.content is None


def test_hermes_two_calls():
    text = block("a", {"x": 1}) + "\n" + block("b", {"y": [1, 2]})
    result = HERMES.extract(text)
    assert calls_of(result) == [("a", {"x": 1}), ("b", {"y": [1, 2]})]
    assert result.content is None


def test_hermes_content_before_a_call_and_text_after_it_dropped():
    text = "Let me check.\n" + block("a", {}) + "\nDone."
    result = HERMES.extract(text)
    assert result.content == "Let me check.\n"
    assert calls_of(result) == [("a", {})]


def test_hermes_arguments_as_a_json_string_and_missing_arguments():
    text = ('<tool_call>{"name": "f", "arguments": "{\\"q\\": \\"x\\"}"}</tool_call>'
            '<tool_call>{"name": "g"}</tool_call>')
    assert calls_of(HERMES.extract(text)) == [("f", {"q": "x"}), ("g", {})]


@pytest.mark.parametrize("body", [
    '{"name": "f", "arguments": {"x": 1}',      # cut short
    '{"arguments": {"x": 1}}',                  # no name
    '{"name": 3, "arguments": {}}',             # name not a string
    '{"name": "f", "arguments": "not json"}',   # arguments string that is not JSON
    '{"name": "f", "arguments": [1, 2]}',       # arguments not an object
    '{"name": "f", "arguments": {"x": NaN}}',   # not JSON, though Python reads it
])
def test_hermes_malformed_block_is_left_as_content(body):
    text = f"Hi <tool_call>{body}</tool_call>"
    result = HERMES.extract(text)
    assert result.tool_calls == []
    assert result.content == text


def test_hermes_malformed_block_before_a_good_one_is_content():
    text = "<tool_call>{oops}</tool_call>" + block("a", {"x": 1})
    result = HERMES.extract(text)
    assert calls_of(result) == [("a", {"x": 1})]
    assert result.content == "<tool_call>{oops}</tool_call>"


def test_hermes_no_tool_calls():
    result = HERMES.extract("The answer is 42, since a < b.")
    assert result.tool_calls == []
    assert result.content == "The answer is 42, since a < b."
    assert HERMES.extract("  \n ").content is None


def test_hermes_unicode_arguments_preserved():
    result = HERMES.extract(block("traduire", {"texte": "café ☕ 東京"}))
    assert result.tool_calls[0].arguments == '{"texte": "café ☕ 東京"}'


def test_tool_call_ids_are_unique_and_shaped_like_vllms():
    text = block("a", {}) + block("a", {})
    ids = [call.id for call in HERMES.extract(text).tool_calls]
    ids += [call.id for call in HERMES.extract(text).tool_calls]
    assert len(set(ids)) == 4
    assert all(re.fullmatch(r"chatcmpl-tool-[0-9a-f]{32}", i) for i in ids)


def test_tool_call_is_frozen():
    call = HERMES.extract(block("a", {})).tool_calls[0]
    assert isinstance(call, ToolCall)
    with pytest.raises(AttributeError):
        call.name = "b"


# --- llama3_json -----------------------------------------------------------------------------

def test_llama3_one_call_with_parameters():
    result = LLAMA.extract('{"name": "get_weather", "parameters": {"city": "Oslo"}}')
    assert calls_of(result) == [("get_weather", {"city": "Oslo"})]
    assert result.content is None


def test_llama3_one_call_with_arguments():
    result = LLAMA.extract('  {"name": "f", "arguments": {"n": 2}}\n')
    assert calls_of(result) == [("f", {"n": 2})]


def test_llama3_python_tag():
    result = LLAMA.extract('<|python_tag|> {"name": "f", "parameters": {"s": "é"}}')
    assert calls_of(result) == [("f", {"s": "é"})]
    assert result.tool_calls[0].arguments == '{"s": "é"}'


def test_llama3_two_calls_separated_by_semicolon():
    text = '{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {}}'
    assert calls_of(LLAMA.extract(text)) == [("a", {"x": 1}), ("b", {})]


def test_llama3_plain_text():
    result = LLAMA.extract("Hello! {not a call}")
    assert result.tool_calls == []
    assert result.content == "Hello! {not a call}"


@pytest.mark.parametrize("text", [
    '{"name": "f", "parameters": {"x": 1}',                          # cut short
    '{"name": "f", "parameters": {}} trailing words',                # text after the object
    '{"name": "a", "parameters": {}}; {"name": "b", "parameters"',   # second one broken
    '{"nom": "f"}',                                                  # no name
    '{"name": "a", "parameters": {}}, {"name": "b", "parameters": {}}',  # "," is no separator
    '<|python_tag|>print("hi")',                                     # code, not JSON
])
def test_llama3_invalid_json_is_all_content(text):
    result = LLAMA.extract(text)
    assert result.tool_calls == []
    assert result.content == text


# --- streaming -------------------------------------------------------------------------------

HERMES_TEXTS = [
    block("get_weather", {"city": "Paris"}),
    "Let me look that up.\n\n" + block("a", {"x": "é"}) + "\n" + block("b", {"y": 2}),
    "\n  " + block("a", {}) + " trailing text <tool_c",
    "So a < b and b <tool> c, and <tool_call is not a tag <",
    "<tool_call>{broken}</tool_call> then " + block("a", {"k": [1, {"z": None}]}),
    "Thinking... " + block("a", {}) + " then <tool_call>{broken}</tool_call>" + block("b", {}),
    "Unterminated: <tool_call>{\"name\": \"a\", \"arguments\": {",
    "   \n",
    "",
]
LLAMA_TEXTS = [
    '{"name": "get_weather", "parameters": {"city": "Oslo"}}',
    '\n<|python_tag|>{"name": "a", "arguments": {"x": 1}} ; {"name": "b", "parameters": {}}',
    "Sure, here is a < b comparison.",
    "  <|python_ta is not quite the tag",
    '{"name": "f", "parameters": {"x": 1}',
    "<|python_tag|>print(1)",
    "  ",
    "",
]


def cut(text: str, seed: int) -> list[str]:
    rng = random.Random(seed)
    pieces, i = [], 0
    while i < len(text):
        n = rng.randint(1, 7)
        pieces.append(text[i:i + n])
        i += n
    return pieces


def run_stream(parser, pieces):
    stream = parser.stream()
    deltas = [stream.feed(piece) for piece in pieces] + [stream.finish()]
    content = "".join(d.content or "" for d in deltas)
    indexed = [pair for d in deltas for pair in d.tool_calls]
    assert all(d.content != "" for d in deltas)  # "no content" is None, not ""
    return stream, content, indexed


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(("name", "text"), [("hermes", t) for t in HERMES_TEXTS]
                         + [("llama3_json", t) for t in LLAMA_TEXTS])
def test_stream_matches_extract(name, text, seed):
    parser = get_tool_parser(name)
    expected = parser.extract(text)
    pieces = cut(text, seed) if seed else [text]  # seed 0: the whole text in one piece
    stream, content, indexed = run_stream(parser, pieces)
    assert content == (expected.content or "")
    assert [i for i, _ in indexed] == list(range(len(expected.tool_calls)))
    streamed = ExtractedToolCalls([call for _, call in indexed], None)
    assert calls_of(streamed) == calls_of(expected)
    assert stream.tools_called == bool(expected.tool_calls)


def test_hermes_stream_holds_back_a_possible_tag_until_disambiguated():
    stream = HERMES.stream()
    assert stream.feed("a <").content == "a "
    assert stream.feed(" b").content == "< b"
    assert stream.feed(" <tool").content == " "
    assert stream.feed("box").content == "<toolbox"
    assert stream.feed(" <").content == " "
    assert stream.finish().content == "<"
    assert not stream.tools_called


def test_hermes_stream_emits_content_early_and_a_call_whole():
    stream = HERMES.stream()
    assert stream.feed("Checking").content == "Checking"
    assert stream.feed(" now. <tool_c") == ToolCallDelta(content=" now. ")
    middle = stream.feed('all>{"name": "f", "arguments": {"x"')
    assert middle.content is None and middle.tool_calls == ()
    done = stream.feed(': 1}}</tool_call>')
    assert [(i, c.name, c.arguments) for i, c in done.tool_calls] == [(0, "f", '{"x": 1}')]
    assert stream.tools_called
    assert stream.feed(" more text").content is None  # text after a call is dropped
    assert stream.finish().content is None


def test_llama3_stream_streams_plain_text_and_holds_json():
    stream = LLAMA.stream()
    assert stream.feed("  ").content is None
    assert stream.feed("Hi").content == "  Hi"
    assert stream.feed(" there").content == " there"
    assert stream.finish().content is None

    stream = LLAMA.stream()
    assert stream.feed("<|python").content is None
    assert stream.feed('_tag|>{"name": "f", "parameters": {}}').tool_calls == ()
    done = stream.finish()
    assert [(i, c.name) for i, c in done.tool_calls] == [(0, "f")]
    assert done.content is None and stream.tools_called


# --- lookup ----------------------------------------------------------------------------------

def test_get_tool_parser():
    assert set(TOOL_PARSERS) == {"hermes", "llama3_json"}
    assert isinstance(get_tool_parser("hermes"), TOOL_PARSERS["hermes"])
    with pytest.raises(ValueError, match=r"'nope'.*hermes.*llama3_json"):
        get_tool_parser("nope")
