"""Structured outputs through the live server: OpenAI's response_format (json_schema, through
the openai client's own `parse` with a pydantic model) and vLLM's structured_outputs field;
constraints that cannot compile, or that conflict, are a 400 naming the field."""
from __future__ import annotations

import re
from typing import Literal

import openai
import pytest
from pydantic import BaseModel, Field

PROMPT = "Describe a small item."


class Item(BaseModel):
    name: str = Field(max_length=8)
    ok: bool
    size: Literal["small", "large"]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_openai_parse_with_a_pydantic_response_format(client, server, temperature):
    """The client sends response_format json_schema (strict) built from the model, and
    parses the reply into it."""
    out = client.chat.completions.parse(
        model=server.model, messages=[{"role": "user", "content": PROMPT}],
        response_format=Item, max_tokens=60, temperature=temperature, seed=3)
    choice = out.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Item)
    assert Item.model_validate_json(choice.message.content) == choice.message.parsed


def test_structured_outputs_field_on_completions_and_chat(client, server):
    out = client.completions.create(
        model=server.model, prompt=PROMPT, max_tokens=20, temperature=1.0, seed=1, n=3,
        extra_body={"structured_outputs": {"regex": r"[a-z]{3,5}=[0-9]{2}"}})
    assert all(re.fullmatch(r"[a-z]{3,5}=[0-9]{2}", c.text) for c in out.choices), out
    chat = client.chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": PROMPT}], max_tokens=20,
        extra_body={"structured_outputs": {"choice": ["red", "green", "blue"]}})
    assert chat.choices[0].message.content in ("red", "green", "blue")
    streamed = "".join(
        c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model=server.model, messages=[{"role": "user", "content": PROMPT}], max_tokens=20,
            stream=True, extra_body={"structured_outputs": {"choice": ["red", "green"]}})
        if c.choices)
    assert streamed in ("red", "green")


@pytest.mark.parametrize("extra, param, words", [
    ({"structured_outputs": {"regex": "("}}, "structured_outputs",
     "structured_outputs.regex cannot be compiled"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "nonsense"}}}}, "response_format",
     "structured_outputs.json cannot be compiled"),
    ({"structured_outputs": {"json_object": True},
      "response_format": {"type": "json_object"}}, "response_format",
     "response_format and structured_outputs both constrain the output"),
    ({"structured_outputs": {"regex": "a", "whitespace_pattern": " "}}, "structured_outputs",
     "structured_outputs.whitespace_pattern is not implemented"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs",
     "takes exactly one of"),
])
def test_a_bad_constraint_is_a_400_naming_the_field(client, server, extra, param, words):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=server.model, max_tokens=4, extra_body=extra,
                                       messages=[{"role": "user", "content": PROMPT}])
    err = info.value.body
    err = err.get("error", err)
    assert err["param"] == param and words in err["message"], err
    # The server goes on.
    assert client.chat.completions.create(
        model=server.model, max_tokens=2,
        messages=[{"role": "user", "content": PROMPT}]).choices[0].message.content is not None


def test_token_rules_through_the_server(client, server):
    """vLLM's min_tokens, allowed_token_ids and bad_words fields."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(server.model_dir))
    letters = {tokenizer.convert_tokens_to_ids(c): c for c in "xyz"}
    out = client.completions.create(
        model=server.model, prompt=PROMPT, max_tokens=8, temperature=1.0, seed=2,
        extra_body={"allowed_token_ids": list(letters), "min_tokens": 8})
    text = out.choices[0].text
    assert len(text) == 8 and set(text) <= set("xyz"), text
    out = client.completions.create(
        model=server.model, prompt=PROMPT, max_tokens=8, temperature=1.0, seed=2,
        extra_body={"allowed_token_ids": list(letters), "bad_words": ["x", "y"]})
    assert out.choices[0].text == "z" * 8


def test_the_older_guided_fields_still_work(client, server):
    """guided_choice / guided_regex (vLLM before 0.34) are the same constraints."""
    out = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=10,
                                    extra_body={"guided_choice": ["left", "right"]})
    assert out.choices[0].text in ("left", "right")
    # ASCII digits: llguidance's \d takes any Unicode digit, some of several tokens each, which
    # a sampled reply may not finish within max_tokens
    out = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=10,
                                    extra_body={"guided_regex": r"[0-9]{4}"})
    assert re.fullmatch(r"[0-9]{4}", out.choices[0].text)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=server.model, prompt=PROMPT, max_tokens=4,
                                  extra_body={"guided_regex": "a",
                                              "structured_outputs": {"regex": "b"}})
    err = info.value.body
    err = err.get("error", err)
    assert "structured_outputs and guided_* both constrain the output" in err["message"]


def test_logit_bias_through_the_server(client, server):
    """OpenAI's logit_bias (token ids as strings): +100 makes the token every greedy choice."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(server.model_dir))
    free = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=6,
                                     temperature=0)
    forced = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=6,
                                       temperature=0, logit_bias={"1000": 100})
    assert forced.choices[0].text == tokenizer.decode([1000] * 6) != free.choices[0].text
