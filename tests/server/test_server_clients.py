"""The live server through the clients vLLM users run against it, unchanged: instructor
(JSON_SCHEMA and TOOLS modes, sync, async and partial streaming), langchain-openai (invoke,
stream, with_structured_output by json_schema and by function calling, bind_tools with a
named function, with "any" and with the default "auto" on a server running the hermes
parser, tool results sent back) and lm-eval (its local-completions backend against the
server next to its hf backend on the same checkpoint: per-sample loglikelihoods and acc of
a multiple-choice task, the generations of a generate_until task).

The model is the tiny random Llama of conftest.py: it writes garbage, so structured replies
are valid only because the server constrains them; the pydantic models below have short
Literal and bounded-int fields so that a constrained reply ends well inside max_tokens.
Clients run with retries off, so a failure is not hidden by a second try.
"""
from __future__ import annotations

import asyncio
import json
import math
from typing import Literal

import instructor
import lm_eval
import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_openai import ChatOpenAI
from lm_eval.tasks import TaskManager
from pydantic import BaseModel, ConfigDict, Field

from server_testing import REPO

LM_EVAL_TASKS = REPO / "tests" / "server" / "lm_eval_task"
MC_TASK, GEN_TASK = "paged_jax_tiny_mc", "paged_jax_tiny_gen"
PROMPT = "What is the weather in Paris for the next three days?"


class Forecast(BaseModel):
    """The weather forecast for a city."""
    model_config = ConfigDict(extra="forbid")
    city: Literal["Paris", "Rome", "Oslo"]
    days: int = Field(ge=1, le=7)


class Clock(BaseModel):
    """The time in a zone."""
    model_config = ConfigDict(extra="forbid")
    zone: Literal["UTC", "CET"]


TOOL_MODELS = {"Forecast": Forecast, "Clock": Clock}


def chat_model(server, **kwargs) -> ChatOpenAI:
    options = dict(max_tokens=100, temperature=0, max_retries=0, timeout=120)
    return ChatOpenAI(base_url=server.base_url + "/v1", api_key=server.api_key,
                      model=server.model, **{**options, **kwargs})


# --- instructor --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [instructor.Mode.JSON_SCHEMA, instructor.Mode.TOOLS])
def test_instructor_returns_a_valid_model(server, mode):
    """JSON_SCHEMA sends response_format json_schema, TOOLS sends the model as the one tool
    and tool_choice naming it; either way the reply parses into the model on the first try,
    and the completion behind it carries it where the mode says."""
    with server.client() as raw:  # instructor wraps the client: not the shared one
        patched = instructor.from_openai(raw, mode=mode)
        forecast, completion = patched.chat.completions.create_with_completion(
            model=server.model, response_model=Forecast, max_retries=0, max_tokens=100,
            temperature=0, messages=[{"role": "user", "content": PROMPT}])
    assert isinstance(forecast, Forecast)
    assert forecast.city in ("Paris", "Rome", "Oslo") and 1 <= forecast.days <= 7
    # instructor hands back its own subclass (with the raw completion attached): compare the
    # fields
    reply = forecast.model_dump()
    (choice,) = completion.choices
    assert choice.finish_reason == "stop"
    if mode == instructor.Mode.JSON_SCHEMA:
        assert not choice.message.tool_calls
        assert Forecast.model_validate_json(choice.message.content).model_dump() == reply
    else:
        (call,) = choice.message.tool_calls
        assert call.function.name == "Forecast"
        assert Forecast.model_validate_json(call.function.arguments).model_dump() == reply


def test_instructor_async_and_partial_streaming(server):
    """Six concurrent async requests at temperature 1, each a valid model; a partial stream
    in JSON_SCHEMA mode fills the fields in and ends on the same object as the whole reply
    at temperature 0."""
    async def run_async() -> list[Forecast]:
        async with server.async_client() as raw:
            patched = instructor.from_openai(raw, mode=instructor.Mode.TOOLS)
            return await asyncio.gather(*[
                patched.chat.completions.create(
                    model=server.model, response_model=Forecast, max_retries=0,
                    max_tokens=100, temperature=1.0, seed=seed,
                    messages=[{"role": "user", "content": f"{PROMPT} ({seed})"}])
                for seed in range(6)])

    replies = asyncio.run(run_async())
    assert len(replies) == 6 and all(isinstance(r, Forecast) for r in replies)

    with server.client() as raw:
        patched = instructor.from_openai(raw, mode=instructor.Mode.JSON_SCHEMA)
        kwargs = dict(model=server.model, response_model=Forecast, max_retries=0,
                      max_tokens=100, temperature=0,
                      messages=[{"role": "user", "content": PROMPT}])
        whole = patched.chat.completions.create(**kwargs)
        partials = list(patched.chat.completions.create_partial(**kwargs))
    assert len(partials) > 1  # streamed in pieces, not one final object
    assert partials[0].city is None or partials[0].days is None
    final = partials[-1]
    assert Forecast.model_validate(final.model_dump()).model_dump() == whole.model_dump()


# --- langchain-openai --------------------------------------------------------------------


def test_langchain_invoke_and_stream_agree(server):
    llm = chat_model(server, max_tokens=16)
    message = llm.invoke([HumanMessage("Tell me a story.")])
    assert isinstance(message, AIMessage) and message.content
    assert message.response_metadata["finish_reason"] == "length"
    assert message.usage_metadata["output_tokens"] == 16
    chunks = list(llm.stream([HumanMessage("Tell me a story.")]))
    assert len(chunks) > 2
    assert "".join(chunk.content for chunk in chunks) == message.content


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_structured_output(server, method):
    """with_structured_output: json_schema sends response_format, function_calling sends the
    model as a tool with tool_choice naming it."""
    structured = chat_model(server).with_structured_output(Forecast, method=method,
                                                           include_raw=True)
    out = structured.invoke(PROMPT)
    assert out["parsing_error"] is None
    forecast = out["parsed"]
    assert isinstance(forecast, Forecast)
    raw = out["raw"]
    assert raw.response_metadata["finish_reason"] == "stop"
    if method == "json_schema":
        assert raw.tool_calls == []
        assert Forecast.model_validate_json(raw.content) == forecast
    else:
        (call,) = raw.tool_calls
        assert call["name"] == "Forecast" and Forecast(**call["args"]) == forecast


def test_langchain_bind_tools_with_a_named_function(server):
    """bind_tools(tool_choice=name): AIMessage.tool_calls holds that function with arguments
    of its schema; streamed, the tool-call chunks add up to the same call."""
    llm = chat_model(server).bind_tools([Forecast, Clock], tool_choice="Clock")
    message = llm.invoke(PROMPT)
    assert message.invalid_tool_calls == []
    (call,) = message.tool_calls
    assert call["name"] == "Clock" and call["id"].startswith("chatcmpl-tool-")
    Clock(**call["args"])
    chunks = list(llm.stream(PROMPT))
    total = chunks[0]
    for chunk in chunks[1:]:
        total = total + chunk
    (streamed,) = total.tool_calls
    assert (streamed["name"], streamed["args"]) == (call["name"], call["args"])


def test_langchain_required_tools_and_a_tool_result_round_trip(server):
    """tool_choice="any" (sent as "required"): one or more calls, each of a bound tool with
    arguments of its schema; the calls and their ToolMessage results sent back as history
    are accepted and answered."""
    llm = chat_model(server, max_tokens=60)
    history = [HumanMessage(PROMPT)]
    message = llm.bind_tools([Forecast, Clock], tool_choice="any").invoke(history)
    assert message.tool_calls and message.invalid_tool_calls == []
    for call in message.tool_calls:
        TOOL_MODELS[call["name"]](**call["args"])
    history.append(message)
    history += [ToolMessage(json.dumps({"result": "sunny"}), tool_call_id=call["id"])
                for call in message.tool_calls]
    answer = llm.invoke(history)
    assert isinstance(answer.content, str) and answer.content
    assert answer.response_metadata["finish_reason"] in ("stop", "length")
    # the tool results are part of the prompt: a longer prompt than the first turn's
    assert answer.usage_metadata["input_tokens"] > message.usage_metadata["input_tokens"]


# The random model never writes a tool call by itself: a regex (structured_outputs, sent
# through ChatOpenAI's extra_body) makes it write hermes's format, text then one call.
HERMES_CALL = (r'Let me look\.<tool_call>\{"name": "Forecast", "arguments": '
               r'\{"city": "(Paris|Rome)", "days": [1-7]\}\}</tool_call>')


def test_langchain_auto_tool_calls_through_the_hermes_parser(server):
    """An agent's turn: bind_tools with no tool_choice; the hermes parser turns the reply
    into AIMessage.tool_calls, whole and streamed alike; the tool's result goes back as a
    ToolMessage and the next turn answers in text."""
    # (the shared server runs with --enable-auto-tool-choice --tool-call-parser hermes)
    llm = chat_model(server, max_tokens=60)
    agent = llm.bind_tools([Forecast, Clock])
    forced = {"structured_outputs": {"regex": HERMES_CALL}}
    message = agent.invoke(PROMPT, extra_body=forced)
    assert message.response_metadata["finish_reason"] == "tool_calls"
    assert message.content == "Let me look." and message.invalid_tool_calls == []
    (call,) = message.tool_calls
    assert call["name"] == "Forecast" and call["id"].startswith("chatcmpl-tool-")
    assert Forecast(**call["args"]).city in ("Paris", "Rome")
    chunks = list(agent.stream(PROMPT, extra_body=forced))
    total = chunks[0]
    for chunk in chunks[1:]:
        total = total + chunk
    assert total.content == "Let me look."
    (streamed,) = total.tool_calls
    assert (streamed["name"], streamed["args"]) == (call["name"], call["args"])

    history = [HumanMessage(PROMPT), message,
               ToolMessage(json.dumps({"forecast": "sunny"}), tool_call_id=call["id"])]
    answer = agent.invoke(history, extra_body={
        "structured_outputs": {"choice": ["It will be sunny.", "It will rain."]}})
    assert answer.content in ("It will be sunny.", "It will rain.")
    assert answer.tool_calls == [] and answer.response_metadata["finish_reason"] == "stop"
    # unforced, the random model writes text, which stays text
    plain = agent.invoke(PROMPT, max_tokens=12)
    assert plain.tool_calls == [] and plain.content
    assert plain.response_metadata["finish_reason"] == "length"


# --- lm-eval -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm_eval_runs(server, tiny_chat_model_dir):
    """Both tasks through lm-eval twice: local-completions against the live server (its
    tokenizer the checkpoint's, the API key from OPENAI_API_KEY, which is where
    LocalCompletionsAPI.api_key reads it) and hf on the same checkpoint in float32.
    backend -> simple_evaluate's result. The task YAMLs' data_files are relative to the
    repository root, as `lm_eval --include_path tests/server/lm_eval_task` from there reads
    them; the json builder on local files needs no hub. Seeds None: lm-eval leaves the
    session's global random state alone."""
    manager = TaskManager(include_path=str(LM_EVAL_TASKS), include_defaults=False)
    model_args = {
        "local-completions": (f"model={server.model},base_url={server.base_url}/v1/completions,"
                              f"tokenizer={tiny_chat_model_dir},tokenizer_backend=huggingface,"
                              "num_concurrent=1,max_retries=1"),
        "hf": f"pretrained={tiny_chat_model_dir},dtype=float32,device=cpu",
    }
    runs = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)
        mp.setenv("OPENAI_API_KEY", server.api_key)
        for backend, args in model_args.items():
            runs[backend] = lm_eval.simple_evaluate(
                model=backend, model_args=args, tasks=[MC_TASK, GEN_TASK],
                task_manager=manager, log_samples=True, bootstrap_iters=0,
                random_seed=None, numpy_random_seed=None, torch_random_seed=None)
    return runs


def samples(run: dict, task: str) -> list[dict]:
    return sorted(run["samples"][task], key=lambda s: s["doc_id"])


def test_lm_eval_loglikelihoods_match_hf(lm_eval_runs):
    """The project's acceptance check of the loglikelihood path: every choice's
    loglikelihood within 1e-3 of transformers', the same is_greedy, the same acc per doc
    and overall."""
    api, hf = lm_eval_runs["local-completions"], lm_eval_runs["hf"]
    api_samples, hf_samples = samples(api, MC_TASK), samples(hf, MC_TASK)
    assert [s["doc_id"] for s in api_samples] == [s["doc_id"] for s in hf_samples]
    assert len(api_samples) == 5
    for a, h in zip(api_samples, hf_samples):
        assert len(a["filtered_resps"]) == len(h["filtered_resps"]) == len(a["doc"]["choices"])
        for (ll_api, greedy_api), (ll_hf, greedy_hf) in zip(a["filtered_resps"],
                                                            h["filtered_resps"]):
            assert math.isfinite(ll_api) and ll_api < 0
            assert ll_api == pytest.approx(ll_hf, abs=1e-3)
            assert greedy_api == greedy_hf
        assert len({round(ll, 3) for ll, _ in a["filtered_resps"]}) > 1  # not degenerate
        assert (a["acc"], a["acc_norm"]) == (h["acc"], h["acc_norm"])
    for metric in ("acc,none", "acc_norm,none"):
        assert api["results"][MC_TASK][metric] == hf["results"][MC_TASK][metric]


def test_lm_eval_generations_match_hf(lm_eval_runs):
    """generate_until through the server (token-id prompt, temperature 0, stop strings,
    max_tokens) writes what transformers' greedy generate writes."""
    api = samples(lm_eval_runs["local-completions"], GEN_TASK)
    hf = samples(lm_eval_runs["hf"], GEN_TASK)
    assert len(api) == len(hf) == 5
    for a, h in zip(api, hf):
        assert a["resps"] == h["resps"]
        (text,) = a["filtered_resps"]
        assert isinstance(text, str) and text.strip()
