"""What tools / tool_choice ask of a generation (paged_jax/server/tool_choice.py): the
refusals vLLM gives, and the constraints "required" and a named function are held to."""
import json

import pytest

from paged_jax.server import protocol as p
from paged_jax.server.chat_options import ChatOptions
from paged_jax.server.tool_choice import ToolChoiceError, plan_tools, required_calls

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [p.ChatTool(function=p.FunctionDefinition(name="get_weather", parameters=WEATHER)),
         p.ChatTool(function=p.FunctionDefinition(name="noop"))]
AUTO = ChatOptions(enable_auto_tool_choice=True, tool_call_parser="hermes")


@pytest.mark.parametrize("choice", [None, "auto"])
def test_auto_needs_the_servers_flags(choice):
    with pytest.raises(ToolChoiceError, match="--enable-auto-tool-choice and "
                                              "--tool-call-parser") as info:
        plan_tools(TOOLS, choice, True, ChatOptions())
    assert info.value.param == "tool_choice"
    plan = plan_tools(TOOLS, choice, False, AUTO)
    assert (plan.mode, plan.parser, plan.parallel, plan.constraint) == (
        "auto", "hermes", False, None)
    # strict asks for schema-held arguments, which auto cannot give: refused, not ignored
    strict = [p.ChatTool(function=p.FunctionDefinition(name="s", parameters=WEATHER,
                                                        strict=True))]
    with pytest.raises(ToolChoiceError, match="strict function 's'") as info:
        plan_tools(strict, choice, True, AUTO)
    assert info.value.param == "tools"
    assert plan_tools(strict, "required", True, AUTO).constraint is not None


def test_none_and_no_tools_ask_nothing():
    assert plan_tools(TOOLS, "none", True, ChatOptions()).mode == "none"
    assert plan_tools(None, None, True, ChatOptions()).mode == "none"
    with pytest.raises(ToolChoiceError, match="needs tools"):
        plan_tools(None, "required", True, AUTO)


def test_required_is_an_array_of_calls_to_the_tools():
    plan = plan_tools(TOOLS, "required", False, ChatOptions())
    schema = plan.constraint.json if isinstance(plan.constraint.json, dict) else json.loads(
        plan.constraint.json)
    assert schema["type"] == "array" and schema["minItems"] == 1 and schema["maxItems"] == 1
    names = [c["properties"]["name"]["enum"] for c in schema["items"]["anyOf"]]
    assert names == [["get_weather"], ["noop"]]
    assert schema["items"]["anyOf"][0]["properties"]["parameters"] == WEATHER
    assert "maxItems" not in plan_tools(TOOLS, "required", True, ChatOptions()).constraint.json


def test_a_named_function_is_held_to_its_parameters():
    named = p.NamedToolChoice(function=p.FunctionName(name="get_weather"))
    plan = plan_tools(TOOLS, named, True, ChatOptions())
    assert (plan.mode, plan.function, plan.constraint.json) == ("named", "get_weather", WEATHER)
    noop = plan_tools(TOOLS, p.NamedToolChoice(function=p.FunctionName(name="noop")), True,
                      ChatOptions())
    assert noop.constraint.json == {"type": "object"}  # no schema: any object
    with pytest.raises(ToolChoiceError, match="'nope', which is not among the tools"):
        plan_tools(TOOLS, p.NamedToolChoice(function=p.FunctionName(name="nope")), True,
                   ChatOptions())
    with pytest.raises(ToolChoiceError, match="two functions of the same name") as info:
        plan_tools(TOOLS + TOOLS[:1], named, True, ChatOptions())
    assert info.value.param == "tools"


def test_required_calls_reads_the_array_or_says_it_is_not_one():
    assert required_calls('[{"name": "a", "parameters": {"x": "é"}}, {"name": "b"}]') == [
        ("a", '{"x": "é"}'), ("b", "{}")]
    assert required_calls('[{"name": "a", "parameters": {"x"') is None  # cut short
    assert required_calls('{"name": "a"}') is None
    assert required_calls('[{"parameters": {}}]') is None
