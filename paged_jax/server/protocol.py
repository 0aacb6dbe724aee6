"""The OpenAI API's request and response bodies (the subset this server speaks, with vLLM's
extensions), as pydantic models. Unknown request fields are kept to be refused by name
(server/unsupported.py)."""
from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, Strict

from paged_jax.sampling_params import SamplingParams
from paged_jax.structured_outputs import StructuredOutputsParams


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def streamed(responses: dict, chunk: str) -> dict:
    """OpenAPI responses of a route that answers JSON, or server-sent events when the
    request says stream: true. The event schema describes one event, as OpenAPI 3.1 reads
    it: data is a `chunk` (a component schema's name) or an error as JSON, or [DONE]."""
    event = {"type": "object", "required": ["data"], "properties": {
        "event": {"type": "string"},
        "data": {"anyOf": [
            {"const": "[DONE]"},
            {"type": "string", "contentMediaType": "application/json",
             "contentSchema": {"anyOf": [{"$ref": f"#/components/schemas/{chunk}"},
                                         {"$ref": "#/components/schemas/ErrorResponse"}]}}]}}}
    return {**responses, 200: {
        "description": "The response; with stream: true, server-sent events (data: <chunk "
                       "JSON>, ... then data: [DONE]).",
        "content": {"text/event-stream": {"schema": event}}}}


TokenId = Annotated[int, Strict()]  # not a bool, not a numeric string
NonEmpty = Field(min_length=1)


class StreamOptions(BaseModel):
    # Undeclared options are kept to be refused by name (server/unsupported.py).
    model_config = ConfigDict(extra="allow")

    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    """response_format.json_schema, as OpenAI's structured outputs send it."""
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(max_length=256)
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None  # the output always matches the schema here, strict or not


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class _SamplingFields(BaseModel):
    """Fields shared by completions and chat completions, with OpenAI's defaults. Undeclared
    fields are kept (model_extra) so that the server refuses them by name
    (server/unsupported.py) instead of ignoring them."""
    model_config = ConfigDict(extra="allow")
    # max_tokens when neither the request nor the model's generation config gives it (None:
    # the rest of the context)
    default_max_tokens: ClassVar[int | None] = None

    model: str | None = None
    n: int = Field(1, ge=1, le=128)
    temperature: float | None = None  # None: 1.0, as OpenAI
    top_p: float | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = None
    # vLLM's extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    truncate_prompt_tokens: int | None = None  # keep the prompt's last k tokens (-1: all fit)
    include_stop_str_in_output: bool = False
    # Structured outputs: OpenAI's response_format, or vLLM's structured_outputs (the fields
    # of StructuredOutputsParams: json, regex, choice, grammar, json_object,
    # disable_any_whitespace)
    response_format: ResponseFormat | None = None
    structured_outputs: dict[str, Any] | None = None
    # vLLM's older names of structured_outputs' forms (dropped in vLLM 0.34; clients still
    # send them)
    guided_json: Union[dict[str, Any], str, None] = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # vLLM's: each prompt token's logprob with this many alternatives (prompt_logprobs in
    # the response)
    prompt_logprobs: int | None = Field(None, ge=0)  # (at most the engine's max_logprobs)
    logit_bias: dict[str, float] | None = None  # OpenAI's: token id (as a string) -> bias
    min_tokens: int = 0
    allowed_token_ids: list[TokenId] | None = None
    bad_words: list[str] | None = None

    def structured(self) -> StructuredOutputsParams | None:
        """The request's output constraint, if any; ValueError naming the field."""
        rf = self.response_format
        asks = rf is not None and rf.type != "text"
        guided = {kind: value for kind, value in (
            ("json", self.guided_json), ("regex", self.guided_regex),
            ("choice", self.guided_choice), ("grammar", self.guided_grammar))
            if value is not None}
        given = [name for name, on in (("response_format", asks),
                                       ("structured_outputs", bool(self.structured_outputs)),
                                       ("guided_*", bool(guided))) if on]
        if len(given) > 1:
            raise ValueError(f"{given[0]} and {given[1]} both constrain the output; give one")
        if guided:
            try:
                return StructuredOutputsParams(**guided)
            except ValueError as err:  # named by the field the client sent
                raise ValueError(str(err).replace("structured_outputs.", "guided_")
                                 .replace("structured_outputs", "guided_*")) from None
        if self.structured_outputs:
            unknown = sorted(set(self.structured_outputs) - set(
                StructuredOutputsParams.__dataclass_fields__))
            if unknown:
                raise ValueError(f"structured_outputs.{unknown[0]} is not implemented by this "
                                 f"server (it takes json, regex, choice, grammar, json_object "
                                 f"and disable_any_whitespace)")
            return StructuredOutputsParams(**self.structured_outputs)
        if not asks:
            return None
        if rf.type == "json_object":
            return StructuredOutputsParams(json_object=True)
        if rf.json_schema is None:
            raise ValueError("response_format of type json_schema needs a json_schema")
        return StructuredOutputsParams(json=rf.json_schema.schema_)

    def sampling_params(self, max_tokens: int | None, logprobs: int | None,
                        defaults: dict | None = None) -> SamplingParams:
        """defaults: the model's generation-config values, for each field the request leaves
        unset (before OpenAI's and vLLM's own). Raises ValueError (naming the parameter) for
        values out of range."""
        defaults = defaults or {}

        def given(name, value, default):
            return defaults.get(name, default) if value is None else value

        return SamplingParams(
            n=self.n, temperature=given("temperature", self.temperature, 1.0),
            top_p=given("top_p", self.top_p, 1.0),
            top_k=given("top_k", self.top_k, -1) or -1,
            min_p=given("min_p", self.min_p, 0.0),
            presence_penalty=given("presence_penalty", self.presence_penalty, 0.0),
            frequency_penalty=given("frequency_penalty", self.frequency_penalty, 0.0),
            repetition_penalty=given("repetition_penalty", self.repetition_penalty, 1.0),
            seed=self.seed, stop=self.stop, stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos,
            max_tokens=given("max_tokens", max_tokens, self.default_max_tokens),
            logprobs=logprobs, skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
            truncate_prompt_tokens=self.truncate_prompt_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            structured_outputs=self.structured(), min_tokens=self.min_tokens,
            allowed_token_ids=self.allowed_token_ids, bad_words=self.bad_words,
            logit_bias=self.logit_bias, prompt_logprobs=self.prompt_logprobs)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingFields):
    default_max_tokens: ClassVar[int | None] = 16  # OpenAI's and vLLM's, unless the model's
    # "" passes here, as in OpenAI's API: a tokenizer that adds a BOS token makes a prompt of
    # it; the engine refuses a prompt of no tokens.
    prompt: Union[str, Annotated[list[str], NonEmpty], Annotated[list[TokenId], NonEmpty],
                  Annotated[list[Annotated[list[TokenId], NonEmpty]], NonEmpty]]
    max_tokens: int | None = None
    logprobs: int | None = Field(None, ge=0)  # (at most the engine's max_logprobs)
    # The prompt before the completion in each choice's text (and logprobs); with
    # max_tokens 0 only the prompt (the loglikelihood request lm-eval sends)
    echo: bool = False
    suffix: str | None = None  # refused when given: no fill-in-the-middle here

    @property
    def echo_only(self) -> bool:
        return self.echo and self.max_tokens == 0

    def prompts(self) -> list[str | list[int]]:
        """The batch: one string or token-id list per prompt."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: Union[str, list[dict[str, Any]], None] = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise ValueError(f"content part type {part.get('type')!r} is not supported; "
                                 f"only text")
            parts.append(part.get("text", ""))
        return "\n".join(parts)


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=256)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object
    strict: bool | None = None  # the arguments always match the schema here when enforced


class ChatTool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"] = "function"
    function: FunctionDefinition


class FunctionName(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str


class NamedToolChoice(BaseModel):
    """tool_choice naming the one function the model must call."""
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"] = "function"
    function: FunctionName


class ChatTemplateFields(BaseModel):
    """What a chat is rendered with (vLLM's fields; /v1/chat/completions and /tokenize)."""
    model_config = ConfigDict(extra="allow")
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    # The last (assistant) message is left open for the model to go on writing
    continue_final_message: bool = False
    # A Jinja template for this request (only with --trust-request-chat-template)
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # more template variables
    tools: list[ChatTool] | None = None

    def conversation(self) -> list[dict]:
        return [{**(m.model_extra or {}), "role": m.role, "content": m.text()}
                for m in self.messages]


class ChatCompletionRequest(ChatTemplateFields, _SamplingFields):
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)  # (at most the engine's max_logprobs)
    # "none", "auto" (the default when tools are given, as OpenAI's), "required", or a
    # named function
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: bool = True
    # vLLM's: a reply continuing an assistant message (continue_final_message) starts with
    # that message's text
    echo: bool = False

    @property
    def echo_text(self) -> str:
        last = self.messages[-1]
        return last.text() if self.echo and last.role == "assistant" else ""

    @property
    def requested_max_tokens(self) -> int | None:
        return (self.max_completion_tokens if self.max_completion_tokens is not None
                else self.max_tokens)


# ---- responses -------------------------------------------------------------------------------

class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens whose K/V the prefix cache supplied


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class PromptLogprob(BaseModel):
    """vLLM's Logprob, as its prompt_logprobs send it (keyed by token id)."""
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


PromptLogprobs = list[dict[int, PromptLogprob] | None]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: PromptLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatLogprob] | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str  # a JSON object, as text


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: str = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    prompt_logprobs: PromptLogprobs | None = None


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    """A piece of a streamed tool call: the first of a call carries its id and name."""
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class DeltaMessage(BaseModel):
    role: str | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "paged-jax"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
