"""The loglikelihood path through the live server: completions with echo (and max_tokens 0,
the request lm-eval's local-completions backend sends), and vLLM's prompt_logprobs, against
HF transformers in float32 on the same checkpoint; suffix refused by name."""
from __future__ import annotations

import numpy as np
import openai
import pytest

from test_server_errors import assert_error

CONTEXTS = ["The capital of France is", "Question: what is two plus two?\nAnswer:"]
CONTINUATIONS = [" Paris", " four"]


@pytest.fixture(scope="module")
def hf_logprobs(server):
    """token ids -> [len, V] float64 log-softmax of the checkpoint in transformers (float32)."""
    torch = pytest.importorskip("torch")
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(server.model_dir), torch_dtype=torch.float32).eval()

    def run(ids: list[int]) -> np.ndarray:
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].double()
        return torch.log_softmax(logits, -1).numpy()
    return run


@pytest.fixture(scope="module")
def tokenizer(server):
    import transformers
    return transformers.AutoTokenizer.from_pretrained(str(server.model_dir))


def test_lm_eval_loglikelihood_request_matches_transformers(client, server, tokenizer,
                                                            hf_logprobs):
    """lm-eval's payload: token-id prompts (context + continuation), echo, max_tokens 0,
    logprobs 1, temperature 0; it reads token_logprobs[ctxlen:] and checks greediness
    against top_logprobs."""
    prompts, ctxlens = [], []
    for ctx, cont in zip(CONTEXTS, CONTINUATIONS):
        c, w = tokenizer.encode(ctx), tokenizer.encode(ctx + cont)
        prompts.append(w)
        ctxlens.append(len(c))
    out = client.completions.create(model=server.model, prompt=prompts, echo=True,
                                    max_tokens=0, logprobs=1, temperature=0, seed=1234)
    assert len(out.choices) == len(prompts)
    for choice, ids, ctxlen in zip(sorted(out.choices, key=lambda c: c.index), prompts,
                                   ctxlens):
        lp = choice.logprobs
        assert len(lp.token_logprobs) == len(ids)  # the prompt only: nothing generated
        assert choice.text == tokenizer.decode(ids) and choice.finish_reason == "length"
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        ref = hf_logprobs(ids)
        expected = [ref[i - 1, ids[i]] for i in range(1, len(ids))]
        np.testing.assert_allclose(lp.token_logprobs[1:], expected, atol=1e-3)
        continuation = sum(lp.token_logprobs[ctxlen:])
        assert continuation == pytest.approx(sum(expected[ctxlen - 1:]), abs=1e-3)
        for i in range(1, len(ids)):  # greedy: the token is the best of its top_logprobs
            best = max(lp.top_logprobs[i].values())
            greedy = int(np.argmax(ref[i - 1])) == ids[i]
            assert (lp.token_logprobs[i] >= best - 1e-5) == greedy or abs(
                np.sort(ref[i - 1])[-1] - np.sort(ref[i - 1])[-2]) < 1e-3
        assert out.usage.completion_tokens == 0


def test_echo_with_generation_and_streaming(client, server, tokenizer):
    whole = client.completions.create(model=server.model, prompt=CONTEXTS[0], echo=True,
                                      max_tokens=5, temperature=0, logprobs=2)
    plain = client.completions.create(model=server.model, prompt=CONTEXTS[0], max_tokens=5,
                                      temperature=0)
    choice = whole.choices[0]
    assert choice.text == CONTEXTS[0] + plain.choices[0].text
    n_prompt = len(tokenizer.encode(CONTEXTS[0]))
    assert len(choice.logprobs.tokens) == n_prompt + whole.usage.completion_tokens
    assert "".join(choice.logprobs.tokens) == choice.text
    assert choice.logprobs.text_offset == sorted(choice.logprobs.text_offset)
    streamed = list(client.completions.create(model=server.model, prompt=CONTEXTS[0],
                                              echo=True, max_tokens=5, temperature=0,
                                              stream=True))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == choice.text
    # echo without logprobs: the text only
    bare = client.completions.create(model=server.model, prompt=CONTEXTS[0], echo=True,
                                     max_tokens=0)
    assert bare.choices[0].text == CONTEXTS[0] and bare.choices[0].logprobs is None


@pytest.mark.parametrize("route", ["completions", "chat"])
def test_prompt_logprobs_field(client, server, tokenizer, hf_logprobs, route):
    if route == "completions":
        ids = tokenizer.encode(CONTEXTS[1])
        raw = client.completions.with_raw_response.create(
            model=server.model, prompt=ids, max_tokens=2, extra_body={"prompt_logprobs": 3})
        body = raw.http_response.json()
        plps = body["choices"][0]["prompt_logprobs"]
    else:
        raw = client.chat.completions.with_raw_response.create(
            model=server.model, messages=[{"role": "user", "content": CONTEXTS[1]}],
            max_tokens=2, extra_body={"prompt_logprobs": 3})
        body = raw.http_response.json()
        plps = body["prompt_logprobs"]
        ids = None
    assert plps[0] is None
    if ids is None:
        assert len(plps) == body["usage"]["prompt_tokens"]
        return
    ref = hf_logprobs(ids)
    for i in range(1, len(ids)):
        entry = {int(t): v for t, v in plps[i].items()}
        assert ids[i] in entry and 3 <= len(entry) <= 4
        assert entry[ids[i]]["logprob"] == pytest.approx(ref[i - 1, ids[i]], abs=1e-3)
        assert set(np.argsort(-ref[i - 1])[:3].tolist()) <= set(entry) or np.sort(
            ref[i - 1])[-3] - np.sort(ref[i - 1])[-4] < 1e-3


def test_suffix_is_refused_by_name(client, server):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=server.model, prompt="def f(", suffix="return x",
                                  max_tokens=4)
    err = assert_error(info.value.body, "suffix")
    assert "suffix" in err["message"] and err["code"] == "unsupported_parameter"


def test_max_tokens_zero_without_echo_is_refused(client, server):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=server.model, prompt="hi", max_tokens=0)
    assert_error(info.value.body, "max_tokens")
