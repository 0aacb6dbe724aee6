"""Request fields the server does not implement: refused by name, never accepted and ignored.

A client that asks for JSON (`response_format`) or tool calls (`tools`) and gets a plain 200
has no way to know its request was not honoured, so every field of a request body that the
endpoint's model does not declare is a 400 naming it (`param` set, code
`unsupported_parameter`), whether it is one of OpenAI's or vLLM's fields not built here yet or
a name neither knows. A field whose value asks for nothing (null, false, an empty list or
object, `response_format: {"type": "text"}`) is let through: honouring it and ignoring it are
the same.

Fields declared and deliberately without effect are listed in NO_EFFECT, each with why.
"""
from __future__ import annotations

from typing import Any

# The request fields of vLLM's OpenAI-compatible server (vLLM 0.34.0, commit 62d4bc3c7:
# vllm/entrypoints/openai/chat_completion/protocol.py and completion/protocol.py), in their
# order there, plus the guided_* fields older vLLMs took (0.34.0 drops them with a warning).
# A test walks these lists: each is declared by paged-jax's request models or refused.
VLLM_CHAT_FIELDS = (
    "messages", "model", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs",
    "max_tokens", "max_completion_tokens", "n", "presence_penalty", "response_format", "seed",
    "stop", "stream", "stream_options", "temperature", "top_p", "tools", "tool_choice",
    "reasoning_effort", "thinking_token_budget", "include_reasoning", "parallel_tool_calls",
    "user", "use_beam_search", "top_k", "min_p", "repetition_penalty", "watermarking",
    "length_penalty", "stop_token_ids", "include_stop_str_in_output", "ignore_eos",
    "min_tokens", "skip_special_tokens", "spaces_between_special_tokens",
    "truncate_prompt_tokens", "truncation_side", "prompt_logprobs", "logprob_token_ids",
    "allowed_token_ids", "bad_words", "echo", "add_generation_prompt",
    "continue_final_message", "add_special_tokens", "documents", "chat_template",
    "chat_template_kwargs", "media_io_kwargs", "mm_processor_kwargs", "structured_outputs",
    "priority", "request_id", "session_id", "return_tokens_as_token_ids", "return_token_ids",
    "return_weight_versions", "routed_experts_prompt_start", "return_token_offsets",
    "return_prompt_text", "mm_payload", "return_mm_kwargs", "cache_salt", "kv_transfer_params",
    "ec_transfer_params", "vllm_xargs", "repetition_detection", "stream_interval",
)
VLLM_COMPLETION_FIELDS = (
    "model", "prompt", "echo", "frequency_penalty", "logit_bias", "logprobs", "max_tokens",
    "n", "presence_penalty", "seed", "stop", "stream", "stream_options", "suffix",
    "temperature", "top_p", "user", "use_beam_search", "top_k", "min_p", "repetition_penalty",
    "watermarking", "length_penalty", "stop_token_ids", "include_stop_str_in_output",
    "ignore_eos", "min_tokens", "skip_special_tokens", "spaces_between_special_tokens",
    "truncate_prompt_tokens", "truncation_side", "allowed_token_ids", "prompt_logprobs",
    "logprob_token_ids", "bad_words", "prompt_embeds", "add_special_tokens", "response_format",
    "structured_outputs", "priority", "request_id", "session_id", "return_tokens_as_token_ids",
    "return_token_ids", "return_weight_versions", "routed_experts_prompt_start",
    "return_token_offsets", "mm_payload", "return_mm_kwargs", "cache_salt",
    "kv_transfer_params", "ec_transfer_params", "vllm_xargs", "repetition_detection",
    "thinking_token_budget", "stream_interval",
)
VLLM_REMOVED_FIELDS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar",
                       "guided_decoding_backend", "guided_whitespace_pattern")
# vLLM's StreamOptions (include_usage is implemented here)
VLLM_STREAM_OPTIONS = ("include_usage", "continuous_usage_stats")
VLLM_FIELDS = frozenset(VLLM_CHAT_FIELDS + VLLM_COMPLETION_FIELDS + VLLM_REMOVED_FIELDS
                        + tuple(f"stream_options.{o}" for o in VLLM_STREAM_OPTIONS))

# Declared by the request models and accepted, but with nothing to do here.
NO_EFFECT = {
    "user": "OpenAI's end-user id, for the provider's abuse monitoring; nothing here monitors "
            "users, and vLLM ignores it too",
}


def asks_for_nothing(field: str, value: Any) -> bool:
    if value is None or value is False or value == [] or value == {}:
        return True
    return field == "response_format" and value == {"type": "text"}  # the default: text


def unsupported_fields(extra: dict[str, Any] | None) -> list[str]:
    """The undeclared fields of a request body (pydantic's model_extra) that ask for
    something, in the order the body gave them."""
    return [name for name, value in (extra or {}).items()
            if not asks_for_nothing(name, value)]


def unsupported_message(names: list[str], endpoint: str) -> str:
    known = [n for n in names if n in VLLM_FIELDS]
    unknown = [n for n in names if n not in known]
    parts = []
    if known:
        parts.append(f"{_quote(known)} {'is' if len(known) == 1 else 'are'} not implemented "
                     "by this server")
    if unknown:
        parts.append(f"{_quote(unknown)} {'is' if len(unknown) == 1 else 'are'} not "
                     f"{'a field' if len(unknown) == 1 else 'fields'} of {endpoint} in "
                     "OpenAI's or vLLM's API")
    return ("; ".join(parts) + ". A field the server cannot honour is refused rather than "
            "ignored; leave it out (or null) to go on without it.")


def _quote(names: list[str]) -> str:
    return ", ".join(f"`{n}`" for n in names)
