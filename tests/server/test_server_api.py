"""The OpenAI API of a live server, through the official openai client: completions and chat,
streamed and not, n=2, logprobs, stop strings, usage, and greedy output equal to LLM's."""
from __future__ import annotations

import httpx
import openai
import pytest

from paged_jax import LLM, SamplingParams

PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Name three colors."}]
GREEDY = dict(temperature=0, max_tokens=12)


@pytest.fixture(scope="module")
def llm(server):
    """The server's model in this process, for reference outputs (one sequence at a time)."""
    return LLM(str(server.model_dir), num_kv_blocks=64, max_model_len=256, max_num_seqs=1)


@pytest.fixture(scope="module")
def greedy_completion(client, server):
    return client.completions.create(model=server.model, prompt=PROMPT, **GREEDY)


@pytest.fixture(scope="module")
def greedy_chat(client, server):
    return client.chat.completions.create(model=server.model, messages=CHAT, **GREEDY)


def test_health_and_models(server, client):
    assert httpx.get(server.base_url + "/health").status_code == 200
    models = client.models.list().data
    assert [m.id for m in models] == [server.model]


def test_greedy_completion_equals_llm_generate(llm, greedy_completion):
    want = llm.generate(PROMPT, SamplingParams(**GREEDY), use_tqdm=False)[0]
    choice = greedy_completion.choices[0]
    assert choice.text == want.outputs[0].text
    assert choice.finish_reason == want.outputs[0].finish_reason
    usage = greedy_completion.usage
    assert usage.prompt_tokens == len(want.prompt_token_ids)
    assert usage.completion_tokens == len(want.outputs[0].token_ids)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_greedy_chat_equals_llm_chat(llm, greedy_chat):
    want = llm.chat(CHAT, SamplingParams(**GREEDY), use_tqdm=False)[0]
    choice = greedy_chat.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == want.outputs[0].text
    assert greedy_chat.usage.prompt_tokens == len(want.prompt_token_ids)
    assert greedy_chat.usage.completion_tokens == len(want.outputs[0].token_ids)


def test_streamed_completion_equals_whole(client, server, greedy_completion):
    chunks = list(client.completions.create(model=server.model, prompt=PROMPT, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    text_chunks = [c for c in chunks if c.choices]
    assert len(text_chunks) > 1
    assert "".join(c.choices[0].text for c in text_chunks) == greedy_completion.choices[0].text
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == (
        greedy_completion.choices[0].finish_reason)
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == greedy_completion.usage


def test_streamed_chat_equals_whole(client, server, greedy_chat):
    chunks = list(client.chat.completions.create(model=server.model, messages=CHAT, stream=True,
                                                 stream_options={"include_usage": True},
                                                 **GREEDY))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == greedy_chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == greedy_chat.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == greedy_chat.usage.prompt_tokens


def test_streaming_without_usage_has_none(client, server):
    chunks = list(client.completions.create(model=server.model, prompt=PROMPT, stream=True,
                                            **GREEDY))
    assert all(c.usage is None and c.choices for c in chunks)


def test_n2_completion_and_chat(client, server):
    params = dict(n=2, temperature=1.0, seed=7, max_tokens=6,
                  extra_body={"ignore_eos": True})
    out = client.completions.create(model=server.model, prompt=PROMPT, **params)
    assert sorted(c.index for c in out.choices) == [0, 1]
    assert out.usage.completion_tokens == 12
    again = client.completions.create(model=server.model, prompt=PROMPT, **params)
    assert [c.text for c in again.choices] == [c.text for c in out.choices]  # seeded

    chat = client.chat.completions.create(model=server.model, messages=CHAT, **params)
    assert sorted(c.index for c in chat.choices) == [0, 1]
    assert chat.usage.completion_tokens == 12

    texts = {0: "", 1: ""}
    finished = set()
    for chunk in client.completions.create(model=server.model, prompt=PROMPT, stream=True,
                                           **params):
        for c in chunk.choices:
            texts[c.index] += c.text
            if c.finish_reason:
                finished.add(c.index)
    assert finished == {0, 1}
    assert [texts[0], texts[1]] == [c.text for c in out.choices]


def test_completion_logprobs(client, server):
    out = client.completions.create(model=server.model, prompt=PROMPT, logprobs=3,
                                    **GREEDY)
    lp = out.choices[0].logprobs
    n = out.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == n
    assert lp.text_offset == sorted(lp.text_offset)
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert 3 <= len(top) <= 4 and logprob <= 0
        assert top[token] == pytest.approx(logprob)
        assert logprob == pytest.approx(max(top.values()))  # greedy takes the top token


def test_chat_logprobs(client, server):
    out = client.chat.completions.create(model=server.model, messages=CHAT, logprobs=True,
                                         top_logprobs=2, **GREEDY)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 2
        assert item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob
        assert item.top_logprobs[0].token == item.token
        assert item.bytes == list(item.token.encode())
    plain = client.chat.completions.create(model=server.model, messages=CHAT, **GREEDY)
    assert plain.choices[0].logprobs is None


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string(client, server, greedy_completion, stream):
    full = greedy_completion.choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    want = full[:full.index(stop)]
    out = client.completions.create(model=server.model, prompt=PROMPT, stop=[stop, "@@@@"],
                                    stream=stream, **GREEDY)
    if stream:
        chunks = [c.choices[0] for c in out if c.choices]
        text, reason = "".join(c.text for c in chunks), chunks[-1].finish_reason
    else:
        text, reason = out.choices[0].text, out.choices[0].finish_reason
        assert out.choices[0].model_extra["stop_reason"] == stop
    assert (text, reason) == (want, "stop")


def test_ignore_eos_runs_to_max_tokens(client, server):
    out = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=20,
                                    temperature=0, extra_body={"ignore_eos": True})
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 20


def test_batch_of_prompts(client, server, greedy_completion, llm):
    ids = llm.get_tokenizer().encode(PROMPT)
    out = client.completions.create(model=server.model, prompt=[PROMPT, "Hello"], **GREEDY)
    assert [c.index for c in out.choices] == [0, 1]
    assert out.choices[0].text == greedy_completion.choices[0].text
    by_ids = client.completions.create(model=server.model, prompt=ids, **GREEDY)
    assert by_ids.choices[0].text == greedy_completion.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids)


def test_sampling_options_accepted(client, server):
    params = dict(temperature=0.8, top_p=0.9, seed=3, presence_penalty=0.5,
                  frequency_penalty=0.5, max_tokens=8,
                  extra_body={"top_k": 20, "min_p": 0.01, "repetition_penalty": 1.2})
    a = client.completions.create(model=server.model, prompt=PROMPT, **params)
    b = client.completions.create(model=server.model, prompt=PROMPT, **params)
    assert a.choices[0].text == b.choices[0].text
    chat = client.chat.completions.create(model=server.model, messages=CHAT,
                                          max_completion_tokens=3, temperature=0)
    assert chat.usage.completion_tokens <= 3


def test_a_repeated_long_prompt_hits_the_prefix_cache(client, server):
    prompt = " ".join(["a long shared system prompt about the capital of France"] * 6)
    before = server.metrics()
    first = client.completions.create(model=server.model, prompt=prompt, **GREEDY)
    second = client.completions.create(model=server.model, prompt=prompt, **GREEDY)
    after = server.metrics()
    assert first.choices[0].text == second.choices[0].text
    n = first.usage.prompt_tokens
    assert n > 32
    queries = "paged_jax:prefix_cache_queries_total"
    hits = "paged_jax:prefix_cache_hits_total"
    assert after[queries] - before[queries] == 2 * n
    assert after[hits] - before[hits] == (n - 1) // 16 * 16  # the second prompt's full blocks
    # OpenAI's usage field for it, whole and streamed
    assert second.usage.prompt_tokens_details.cached_tokens == (n - 1) // 16 * 16
    streamed = [c for c in client.completions.create(
        model=server.model, prompt=prompt, stream=True, stream_options={"include_usage": True},
        **GREEDY)]
    assert streamed[-1].usage.prompt_tokens_details.cached_tokens == (n - 1) // 16 * 16


def test_truncate_prompt_tokens_keeps_the_prompts_end(client, server, llm):
    ids = llm.get_tokenizer().encode(" ".join(["word"] * 300))  # past the 256-token context
    out = client.completions.create(model=server.model, prompt=ids, temperature=0,
                                    max_tokens=4, extra_body={"truncate_prompt_tokens": 100})
    assert out.usage.prompt_tokens == 100
    same = client.completions.create(model=server.model, prompt=ids[-100:], temperature=0,
                                     max_tokens=4)
    assert out.choices[0].text == same.choices[0].text
    chat = client.chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": "word " * 400}], max_tokens=2,
        extra_body={"truncate_prompt_tokens": 50})
    assert chat.usage.prompt_tokens == 50
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=server.model, prompt=ids, max_tokens=4,
                                  extra_body={"truncate_prompt_tokens": 1000})
    assert info.value.body["param"] == "truncate_prompt_tokens"
    assert "at most max_model_len (256)" in info.value.body["message"]


def test_special_tokens_kept_with_and_without_spaces(client, server, llm):
    tok = llm.get_tokenizer()
    special = tok.convert_tokens_to_ids("<|im_start|>")
    out = {}
    for spaces in (True, False):
        r = client.completions.create(
            model=server.model, prompt="x", max_tokens=6, temperature=0,
            extra_body={"skip_special_tokens": False, "spaces_between_special_tokens": spaces,
                        "allowed_token_ids": [special, tok.encode("a")[0]]})
        out[spaces] = r.choices[0].text
    assert "<|im_start|>" in out[False] and " " not in out[False]
    assert out[True].replace(" ", "") == out[False]


def test_continue_final_message_echo_and_template_fields(client, server, llm):
    tok = llm.get_tokenizer()
    turn = [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi the"}]
    out = client.chat.completions.create(
        model=server.model, messages=turn, max_tokens=4, temperature=0,
        extra_body={"continue_final_message": True, "add_generation_prompt": False,
                    "echo": True})
    rendered = tok.apply_chat_template(turn, tokenize=False, continue_final_message=True)
    assert rendered.endswith("Hi the") and out.usage.prompt_tokens == len(tok.encode(rendered))
    assert out.choices[0].message.content.startswith("Hi the")
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=server.model, messages=turn, max_tokens=4, temperature=0, stream=True,
        extra_body={"continue_final_message": True, "add_generation_prompt": False,
                    "echo": True}) if c.choices)
    assert streamed == out.choices[0].message.content
    for extra, param in [({"continue_final_message": True}, "messages"),  # and a new turn?
                         ({"chat_template": "{{ messages }}"}, "chat_template"),
                         ({"chat_template_kwargs": {"tools": []}}, "messages")]:
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=server.model, messages=turn, max_tokens=2,
                                           extra_body=extra)
        assert info.value.body["param"] == param, (extra, info.value.body)
