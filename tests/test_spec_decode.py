"""Speculative decoding with n-gram drafts: the proposer, the acceptance rule, the sampler's
draft check against the target distribution, and the engine against dense greedy runs."""
import jax
import numpy as np
import pytest

from paged_jax import LLM, SamplingParams, spec_decode
from paged_jax.request import Request
from paged_jax.sampler import SamplingInputs, build_inputs, sample
from paged_jax.server.metrics import ServerMetrics
from paged_jax.spec_decode import accepted_prefix, propose_ngram
from test_engine import dense, make_llm, tiny_dir  # noqa: F401 (fixture)


def test_ngram_proposes_what_followed_the_longest_suffix_seen_before():
    toks = [1, 2, 3, 9, 2, 3, 4, 5, 1, 2, 3]
    # "1 2 3" (3 tokens) occurred at the start, followed by 9 2 3 4; longer suffixes never did.
    assert propose_ngram(toks, 4, 1, 4) == [9, 2, 3, 4]
    assert propose_ngram(toks, 2, 1, 4) == [9, 2]
    # With at most 2 tokens of suffix, "2 3" most recently occurred at 4-5, followed by 4 5 1.
    assert propose_ngram(toks, 3, 1, 2) == [4, 5, 1]
    assert propose_ngram([5, 6, 7], 3, 1, 3) == []  # the last token never occurred before
    assert propose_ngram([7, 7], 3, 2, 3) == []  # needs 2 tokens of suffix seen before
    assert propose_ngram([7, 7], 3, 1, 3) == [7]
    assert propose_ngram(toks, 0, 1, 4) == []


def test_the_row_keeps_drafts_up_to_the_first_replacement():
    assert accepted_prefix([4, 5, 6], [4, 5, 6, 7]) == [4, 5, 6, 7]  # all kept, and a bonus
    assert accepted_prefix([4, 5, 6], [4, 9, 6, 7]) == [4, 9]
    assert accepted_prefix([4, 5, 6], [8, 5, 6, 7]) == [8]
    assert accepted_prefix([], [3]) == [3]


def _rows(params, drafts, vocab_logits, n):
    reqs = [Request(str(i), [1], params, 100, seed=i) for i in range(n)]
    arrays = build_inputs(reqs, 2 * n, history_len=4, drafts=[drafts] * n)
    logits = np.tile(vocab_logits, (2 * n, 1)).astype(np.float32)
    return jax.jit(sample)(logits, SamplingInputs(**arrays))


@pytest.mark.parametrize("top_k", [-1, 3])
def test_a_checked_draft_leaves_the_target_distribution_unchanged(top_k):
    """Keep the draft with probability p(draft), else draw from p without it: the token is
    distributed as p, whichever token was drafted (one the filter removed included)."""
    # Six tokens that matter; the sampler's top-N logprobs need a vocabulary of 20 or more.
    logits = np.concatenate([[1.0, 0.2, 2.0, -1.0, 0.5, 1.5], np.full(18, -1e9)])
    p = np.exp(logits)
    if top_k > 0:
        p[np.argsort(-logits)[top_k:]] = 0
    p /= p.sum()
    n = 20000
    for draft in (2, 5, 3):  # likeliest, middling, filtered out by top-k=3
        out = _rows(SamplingParams(temperature=1.0, top_k=top_k), [draft], logits, n)
        first = np.asarray(out.tokens)[0::2]  # each request's draft row
        freq = np.bincount(first, minlength=24) / n
        np.testing.assert_allclose(freq, p, atol=0.015)
        if p[draft] == 0:
            assert not np.any(first == draft)


def test_a_greedy_row_keeps_its_draft_only_when_it_is_the_argmax():
    logits = np.concatenate([[0.1, 3.0, 0.2, 0.3], np.zeros(20)])
    for draft in (1, 2):
        out = _rows(SamplingParams(temperature=0.0), [draft], logits, 4)
        assert np.all(np.asarray(out.tokens) == 1)


# ---- the engine ----------------------------------------------------------------------------

def repetitive_prompts(n, seed):
    """Prompts that repeat a pattern, as code or quoted text does: drafts get accepted."""
    rng = np.random.default_rng(seed)
    return [{"prompt_token_ids": rng.integers(3, 49152, int(rng.integers(3, 7))).tolist()
             * int(rng.integers(2, 5))} for _ in range(n)]


GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=2)


def oracle_drafts(monkeypatch, llm, prompts, n):
    """Replace the n-gram lookup by drafts of the dense greedy continuation, the last draft
    made wrong at every third position: a random tiny model seldom repeats itself, and this
    way steps keep all drafts (and a bonus), some, or none."""
    conts = {tuple(p["prompt_token_ids"]): dense(llm, p, n) for p in prompts}

    def propose(tokens, k, n_min, n_max):
        for prompt, cont in conts.items():
            if tuple(tokens[:len(prompt)]) == prompt:
                done = len(tokens) - len(prompt)
                drafts = list(cont[done:done + k])
                if drafts and done % 3 == 1:
                    drafts[-1] += 1
                return drafts
        raise AssertionError("drafts asked for an unknown prompt")

    monkeypatch.setattr(spec_decode, "propose_ngram", propose)


@pytest.mark.parametrize("opts", [
    dict(), dict(attention_backend="xla"),
    dict(enable_chunked_prefill=True, max_num_batched_tokens=32)])
def test_greedy_with_drafts_equals_dense(tiny_dir, opts, monkeypatch):
    prompts = repetitive_prompts(6, 0)
    plain = make_llm(tiny_dir, **opts)
    spec = make_llm(tiny_dir, speculative_method="ngram", num_speculative_tokens=3, **opts)
    oracle_drafts(monkeypatch, spec, prompts, 24)
    want = plain.generate(prompts, GREEDY, use_tqdm=False)
    got = spec.generate(prompts, GREEDY, use_tqdm=False)
    for prompt, w, g in zip(prompts, want, got):
        assert g.outputs[0].token_ids == dense(spec, prompt, 24)
        # Each token's log-probability is the one the plain run computed for it.
        for a, b in zip(g.outputs[0].logprobs, w.outputs[0].logprobs):
            assert a.keys() == b.keys()
            np.testing.assert_allclose([x.logprob for x in a.values()],
                                       [x.logprob for x in b.values()], rtol=1e-4, atol=1e-5)
    stats, plain_steps = spec.llm_engine.stats, plain.llm_engine.stats.num_steps
    assert 0 < stats.spec_accepted_tokens < stats.spec_draft_tokens  # kept some, not all
    metrics = ServerMetrics("m")  # what the server exports
    metrics.update(spec.llm_engine.snapshot())
    for name, value in (("draft", stats.spec_draft_tokens),
                        ("accepted", stats.spec_accepted_tokens)):
        assert metrics.registry.get_sample_value(
            f"paged_jax:spec_decode_num_{name}_tokens_total", {"model_name": "m"}) == value
    assert stats.num_steps < plain_steps  # kept drafts saved steps
    engine = spec.llm_engine
    assert engine.kv.pool.num_free == engine.kv.pool.num_usable


def test_greedy_with_ngram_drafts_equals_dense(tiny_dir):
    prompts = repetitive_prompts(6, 3)
    llm = make_llm(tiny_dir, speculative_method="ngram", num_speculative_tokens=3)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert llm.llm_engine.stats.spec_draft_tokens > 0  # the prompts' patterns drafted some
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == dense(llm, prompt, 24)


def test_sampled_requests_stop_at_max_tokens_and_stop_tokens(tiny_dir, monkeypatch):
    llm = make_llm(tiny_dir, speculative_method="ngram", num_speculative_tokens=4)
    prompts = repetitive_prompts(8, 1)
    oracle_drafts(monkeypatch, llm, prompts, 40)
    # At temperature 0.05 the greedy drafts are mostly kept; at 0.8 (this model's
    # distributions are flat) mostly replaced.
    params = [SamplingParams(temperature=(0.05, 0.8)[i % 2], seed=i, max_tokens=int(m),
                             ignore_eos=True)
              for i, m in enumerate(np.random.default_rng(2).integers(1, 30, 8))]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [p.max_tokens for p in params]
    assert llm.llm_engine.stats.spec_accepted_tokens > 0
    # A stop token met among kept drafts ends the request there.
    first = llm.generate(prompts[:1], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    stop = SamplingParams(temperature=0.0, max_tokens=24, stop_token_ids=[first[5]])
    out = llm.generate(prompts[:1], stop, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == first[:first.index(first[5]) + 1]
    assert out.finish_reason == "stop"


@pytest.mark.parametrize("opts, message", [
    (dict(speculative_method="eagle", num_speculative_tokens=2), "speculative_method must be"),
    (dict(speculative_method="ngram"), r"num_speculative_tokens must be in \[1, 16\]"),
    (dict(speculative_method="ngram", num_speculative_tokens=2, prompt_lookup_min=3,
          prompt_lookup_max=2), "prompt_lookup_min <= prompt_lookup_max"),
    (dict(speculative_method="ngram", num_speculative_tokens=2, mixed_batches=False),
     "speculative decoding needs mixed_batches")])
def test_bad_speculative_options_name_the_value(tiny_dir, opts, message):
    with pytest.raises(ValueError, match=message):
        LLM(str(tiny_dir), num_kv_blocks=16, max_model_len=64, **opts)


# ---- the scheduler -------------------------------------------------------------------------

def test_drafts_take_only_what_decodes_and_prompts_leave():
    from test_scheduler import engine_step, make_request, make_scheduler

    # 9 blocks of 4 tokens (8 usable), a budget of 8 tokens a step.
    sched = make_scheduler(num_blocks=9, block_size=4, budget=8, mixed=True)
    a, b = make_request(3, 20), make_request(3, 20)
    sched.add(a)
    sched.add(b)
    engine_step(sched)  # both prefilled: 4 tokens each, one block each
    c = make_request(4, 2)  # a prompt that fits the budget beside the two decodes
    sched.add(c)
    batch = sched.schedule({a.request_id: [5, 6, 7], b.request_id: [5, 6, 7]})
    # Decodes (2 tokens) and the prompt (4) first; 2 tokens are left for drafts, oldest first.
    assert batch.requests == (b, a, c) and batch.num_new_tokens == (1, 3, 4)
    assert batch.drafts == ((), (5, 6), ()) and not batch.preempted
    # a's first draft is kept, its second replaced: two tokens; b and c sample one each.
    sched.dispatched(batch)
    updated = sched.update_from_output(batch, [[9], [5, 8, 4], [3]])
    assert [(r, n) for r, n in updated] == [(b, 1), (a, 2), (c, 1)]
    assert a.output_token_ids == [7, 5, 8] and a.num_computed_tokens == a.num_tokens - 1
    assert b.output_token_ids == [7, 9] and b.num_computed_tokens == b.num_tokens - 1
    # Drafts never preempt: with the blocks nearly gone they are cut to what fits.
    want = list(range(4 * (sched.kv.pool.num_free + 2)))  # more blocks than are free
    batch = sched.schedule({a.request_id: list(want), b.request_id: list(want)})
    assert not batch.preempted
    kept = {r.request_id: d for r, d in zip(batch.requests, batch.drafts)}
    assert len(kept[a.request_id]) < len(want)
    for req in (a, b):  # what was kept fits the request's blocks
        assert sched.kv.blocks_needed(req.request_id,
                                      req.num_tokens + len(kept[req.request_id])) == 0


@pytest.mark.parametrize("max_len, seqs, k", [(100, 8, 16), (128, 4, 3), (64, 32, 2)])
def test_every_row_count_a_step_can_sample_was_precompiled(max_len, seqs, k):
    from paged_jax.step_inputs import Buckets, pick

    b = Buckets.make(seqs, max_len, max_len, 16, table_ladder=False, mixed_steps=True,
                     num_speculative_tokens=k)
    shapes = set(b.all_shapes())
    for t in b.tokens:
        s = pick(b.seqs, min(t, b.seqs[-1]))
        for rows in range(1, min(t, seqs * (k + 1)) + 1):  # a sampled row is a token
            r = b.rows_bucket(rows, s, t)
            assert rows <= r <= t or (rows <= s and r == s)
            assert ("mixed", t, s, b.blocks[0], r) in shapes
