"""Prompt logprobs (vLLM's SamplingParams.prompt_logprobs) against transformers' float32
log-softmax of the same checkpoint: alone, beside other requests, over chunks, past prefix-cache
hits, and recomputed after preemption."""
import numpy as np
import pytest

from paged_jax import SamplingParams
from test_engine import make_llm, random_prompts, tiny_dir  # noqa: F401 (fixture)


_HF = {}


def reference(llm, ids) -> np.ndarray:
    """[len(ids), V] float64 log-softmax of transformers' float32 run of the same checkpoint."""
    import torch
    import transformers

    path = llm.llm_engine.model_path
    if path not in _HF:
        _HF[path] = transformers.AutoModelForCausalLM.from_pretrained(
            path, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        logits = _HF[path](torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, -1).numpy()


def check(llm, ids, prompt_logprobs, k):
    ref = reference(llm, ids)
    assert prompt_logprobs[0] is None and len(prompt_logprobs) == len(ids)
    for pos in range(1, len(ids)):
        entry, row, tok = prompt_logprobs[pos], ref[pos - 1], ids[pos]
        # the prompt token itself, then the k most likely (it may be among them)
        assert tok in entry and set(entry) - {tok} <= set(np.argsort(-row)[:k].tolist())
        assert set(np.argsort(-row)[:k].tolist()) <= set(entry)
        # its rank: 1 + the tokens more likely (float32 near-ties either way)
        assert (np.sum(row > row[tok] + 1e-4) < entry[tok].rank
                <= 1 + np.sum(row > row[tok] - 1e-4))
        for t, lp in entry.items():
            assert abs(lp.logprob - row[t]) < 1e-4, (pos, t)


@pytest.mark.parametrize("opts", [
    # mixed steps and prefix caching (the defaults), chunked
    dict(enable_chunked_prefill=True, max_num_batched_tokens=32),
    dict(mixed_batches=False, enable_prefix_caching=False),
    dict(async_scheduling=True),
])
def test_prompt_logprobs_equal_transformers_log_softmax(tiny_dir, opts):
    llm = make_llm(tiny_dir, **opts)
    prompts = random_prompts(4, 31, lo=20, hi=70)
    params = [SamplingParams(temperature=0.0, max_tokens=4, prompt_logprobs=k, ignore_eos=True)
              if k is not None else SamplingParams(temperature=0.0, max_tokens=4)
              for k in (3, None, 0, 5)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    for out, prompt, p in zip(outs, prompts, params):
        if p.prompt_logprobs is None:
            assert out.prompt_logprobs is None
        else:
            check(llm, prompt["prompt_token_ids"], out.prompt_logprobs, p.prompt_logprobs)
            assert all(len(e) <= p.prompt_logprobs + 1 for e in out.prompt_logprobs[1:])
    # Scoring rows never disturb the sampled ones: the same tokens as without any.
    again = llm.generate(prompts, [SamplingParams(temperature=0.0, max_tokens=4)] * 4,
                         use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in again]


def test_a_cached_prompt_is_computed_afresh_for_its_logprobs(tiny_dir):
    llm = make_llm(tiny_dir, enable_chunked_prefill=True, max_num_batched_tokens=32)
    prompt = random_prompts(1, 5, lo=60, hi=61)[0]
    plain = SamplingParams(temperature=0.0, max_tokens=2)
    llm.generate([prompt], plain, use_tqdm=False)  # now cached
    hit = llm.generate([prompt], plain, use_tqdm=False)[0]
    assert hit.num_cached_tokens > 0 and hit.prompt_logprobs is None
    scored = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=2,
                                                   prompt_logprobs=2), use_tqdm=False)[0]
    assert scored.num_cached_tokens == 0
    check(llm, prompt["prompt_token_ids"], scored.prompt_logprobs, 2)
    # n > 1: the group's first sequence scores the prompt; the others may share its blocks
    group = llm.generate([prompt], SamplingParams(n=3, temperature=0.0, max_tokens=2,
                                                  prompt_logprobs=1), use_tqdm=False)[0]
    check(llm, prompt["prompt_token_ids"], group.prompt_logprobs, 1)


def test_prompt_logprobs_survive_preemption(tiny_dir):
    # A pool too small for every request at once: some are preempted (recomputed) while
    # their prompts or outputs are part-way through.
    llm = make_llm(tiny_dir, num_kv_blocks=12, block_size=16, enable_chunked_prefill=True,
                   max_num_batched_tokens=32, max_num_seqs=8)
    prompts = random_prompts(6, 77, lo=30, hi=60)
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True,
                                                prompt_logprobs=2), use_tqdm=False)
    assert sum(o.num_preemptions for o in outs) > 0
    for out, prompt in zip(outs, prompts):
        check(llm, prompt["prompt_token_ids"], out.prompt_logprobs, 2)


def test_max_logprobs_bounds_what_a_request_may_ask_for(tiny_dir):
    with pytest.raises(ValueError, match="prompt_logprobs must be >= 0"):
        SamplingParams(prompt_logprobs=-1)
    llm = make_llm(tiny_dir, max_logprobs=30)
    prompt = random_prompts(1, 8, lo=12, hi=13)[0]
    with pytest.raises(ValueError, match=r"logprobs must be at most max_logprobs \(30\), got 31"):
        llm.generate([prompt], SamplingParams(logprobs=31))
    with pytest.raises(ValueError, match=r"prompt_logprobs must be at most max_logprobs"):
        llm.generate([prompt], SamplingParams(prompt_logprobs=31))
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=2, logprobs=25,
                                                prompt_logprobs=25), use_tqdm=False)[0]
    check(llm, prompt["prompt_token_ids"], out.prompt_logprobs, 25)
    assert all(len(e) in (25, 26) for e in out.outputs[0].logprobs)
