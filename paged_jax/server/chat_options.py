"""How the server renders chats and reads tool calls (the serve flags --chat-template,
--trust-request-chat-template, --enable-auto-tool-choice, --tool-call-parser)."""
from __future__ import annotations

import dataclasses
import pathlib

# The tool-call parsers --tool-call-parser names (paged_jax/tool_parsers.py implements them)
TOOL_CALL_PARSERS = ("hermes", "llama3_json")


@dataclasses.dataclass(frozen=True)
class ChatOptions:
    # The Jinja chat template every chat is rendered with instead of the tokenizer's own
    # (None: the tokenizer's)
    chat_template: str | None = None
    # Whether a request's own `chat_template` field is honoured (a template is code the
    # server runs: vLLM refuses it unless the operator trusts the clients)
    trust_request_chat_template: bool = False
    # tool_choice "auto": the model decides, and its text is parsed for tool calls by
    # tool_call_parser (both needed, as in vLLM)
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None

    def __post_init__(self):
        if self.tool_call_parser is not None and self.tool_call_parser not in TOOL_CALL_PARSERS:
            raise ValueError(f"tool_call_parser {self.tool_call_parser!r} is not one of "
                             f"{', '.join(TOOL_CALL_PARSERS)}")
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError("enable_auto_tool_choice needs a tool_call_parser "
                             f"({', '.join(TOOL_CALL_PARSERS)})")


def load_chat_template(value: str | None) -> str | None:
    """--chat-template's value: a file holding the template, or the template itself (as
    vLLM takes it: a value with Jinja markup in it is a template, else a path)."""
    if value is None:
        return None
    if any(mark in value for mark in ("{{", "{%")):
        return value
    path = pathlib.Path(value).expanduser()
    if not path.is_file():
        raise ValueError(f"chat template {value!r} is neither a file nor a Jinja template")
    return path.read_text()
