"""What a chat request's tools and tool_choice ask of the generation, as vLLM's server reads
them.

- "none" (or no tools): plain text; the tools are still shown to the chat template.
- "auto" (the default when tools are given): the model decides; its text is parsed for tool
  calls by the --tool-call-parser (needs --enable-auto-tool-choice, as in vLLM).
- "required": at least one call (one with parallel_tool_calls false). The output is held to
  a JSON array of {"name", "parameters"} objects, each naming a tool and matching its
  parameters' schema, through structured outputs.
- a named function: the output is held to that function's parameters schema and is the
  call's arguments.

The constraint is what makes the arguments always parse: a random or small model obeys it
as well as a large one.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

from paged_jax.server.chat_options import ChatOptions
from paged_jax.structured_outputs import StructuredOutputsParams

_ANY_OBJECT = {"type": "object"}  # a tool without a parameters schema takes any object


class ToolChoiceError(ValueError):
    """A 400: `param` names the request field at fault."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclasses.dataclass(frozen=True)
class ToolPlan:
    mode: str  # "none" | "auto" | "required" | "named"
    function: str | None = None  # the named function
    constraint: StructuredOutputsParams | None = None  # required / named
    parser: str | None = None  # auto: the tool-call parser's name
    parallel: bool = True  # more than one call may be returned

    @property
    def calls_tools(self) -> bool:
        return self.mode != "none"


def plan_tools(tools, tool_choice, parallel_tool_calls: bool,
               options: ChatOptions) -> ToolPlan:
    """tools: the request's ChatTool models (or None); tool_choice: "none" / "auto" /
    "required" / a NamedToolChoice / None. Raises ToolChoiceError."""
    tools = list(tools or ())
    if tool_choice is None:
        tool_choice = "auto" if tools else "none"
    if tool_choice == "none":
        return ToolPlan("none")
    if not tools:
        raise ToolChoiceError(f"tool_choice {_shown(tool_choice)} needs tools; the request "
                              "gives none", "tool_choice")
    schemas = {t.function.name: t.function.parameters or _ANY_OBJECT for t in tools}
    if len(schemas) < len(tools):
        raise ToolChoiceError("tools holds two functions of the same name", "tools")
    if tool_choice == "auto":
        if not (options.enable_auto_tool_choice and options.tool_call_parser):
            raise ToolChoiceError('"auto" tool choice requires --enable-auto-tool-choice and '
                                  "--tool-call-parser to be set", "tool_choice")
        strict = [t.function.name for t in tools if t.function.strict]
        if strict:  # the parser reads what the model wrote; nothing holds it to a schema
            raise ToolChoiceError(f"strict function {strict[0]!r}: arguments are held to a "
                                  'schema only with tool_choice "required" or a named '
                                  'function, not "auto"', "tools")
        return ToolPlan("auto", parser=options.tool_call_parser,
                        parallel=parallel_tool_calls)
    if tool_choice == "required":
        call = [{"type": "object", "properties": {"name": {"enum": [name]},
                                                  "parameters": schema},
                 "required": ["name", "parameters"], "additionalProperties": False}
                for name, schema in schemas.items()]
        array = {"type": "array", "minItems": 1,
                 "items": call[0] if len(call) == 1 else {"anyOf": call}}
        if not parallel_tool_calls:
            array["maxItems"] = 1
        return ToolPlan("required", constraint=StructuredOutputsParams(json=array),
                        parallel=parallel_tool_calls)
    name = tool_choice.function.name
    if name not in schemas:
        raise ToolChoiceError(f"tool_choice names the function {name!r}, which is not among "
                              f"the tools ({', '.join(schemas)})", "tool_choice")
    return ToolPlan("named", function=name,
                    constraint=StructuredOutputsParams(json=schemas[name]), parallel=False)


def required_calls(text: str) -> list[tuple[str, str]] | None:
    """(name, arguments as JSON text) of each call in a "required" output (a JSON array of
    {"name", "parameters"}), or None when the text is not one (cut short by max_tokens)."""
    try:
        calls = json.loads(text)
    except ValueError:
        return None
    if not isinstance(calls, list) or not all(
            isinstance(c, dict) and isinstance(c.get("name"), str) for c in calls):
        return None
    return [(c["name"], json.dumps(c.get("parameters", {}), ensure_ascii=False))
            for c in calls]


def _shown(choice: Any) -> str:
    return json.dumps(choice) if isinstance(choice, str) else f"function {choice.function.name!r}"
