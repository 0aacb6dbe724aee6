"""Beam search: the algorithm against beam search by definition over a random bigram model,
its EOS and length-penalty rules, and LLM.beam_search against transformers' beam search."""
import math

import numpy as np
import pytest

from paged_jax import LLM, BeamSearchParams
from paged_jax.beam_search import BeamSearchSequence, beam_search, score

VOCAB = 7


def bigram(seed):
    """log p(next | last token), [VOCAB, VOCAB], and the engine's stand-in over it."""
    logits = np.random.default_rng(seed).standard_normal((VOCAB, VOCAB)) * 2
    table = logits - np.log(np.exp(logits).sum(1, keepdims=True))

    def top_logprobs(width):
        def call(beams):
            out = []
            for tokens in beams:
                row = table[tokens[-1]]
                top = np.argsort(-row)[:2 * width]
                out.append({int(t): float(row[t]) for t in top})
            return out
        return call
    return table, top_logprobs


def by_definition(table, prompt, width, steps):
    """Keep the `width` best of every one-token extension of the kept sequences (no EOS)."""
    kept = [(0.0, list(prompt))]
    for _ in range(steps):
        ext = [(lp + table[s[-1], t], s + [t]) for lp, s in kept for t in range(VOCAB)]
        kept = sorted(ext, key=lambda x: -x[0])[:width]
    return kept


@pytest.mark.parametrize("width", [1, 2, 3])
def test_beams_are_the_best_extensions_at_every_step(width):
    table, top = bigram(width)
    prompts = [[1, 2], [4], [6, 0, 3]]
    outs = beam_search(prompts, BeamSearchParams(width, 5, ignore_eos=True), top(width),
                       eos_token_ids=(0,))
    for prompt, out in zip(prompts, outs):
        want = by_definition(table, prompt, width, 5)
        assert [s.tokens for s in out.sequences] == [s for _, s in want]
        np.testing.assert_allclose([s.cum_logprob for s in out.sequences],
                                   [lp for lp, _ in want], rtol=1e-9)
        assert all(s.finish_reason == "length" for s in out.sequences)


def test_eos_completes_a_beam_and_the_length_penalty_ranks_the_ends():
    table, top = bigram(5)
    eos = int(np.argmax(table[:, :].mean(0)))  # the likeliest next token on average
    params = BeamSearchParams(3, 6, length_penalty=0.5)
    out = beam_search([[eos + 1 if eos + 1 < VOCAB else 0]], params, top(3), (eos,))[0]
    seqs = out.sequences
    assert len(seqs) == 3
    stopped = [s for s in seqs if s.finish_reason == "stop"]
    assert stopped, "the most probable token never ended a beam"
    for s in stopped:  # ended at its EOS and was never extended
        assert s.tokens[-1] == eos and eos not in s.tokens[1:-1] and len(s.tokens) <= 7
    for s in seqs:
        want = sum(table[a, b] for a, b in zip(s.tokens, s.tokens[1:]))
        assert math.isclose(s.cum_logprob, want, rel_tol=1e-9)
    scores = [score(s, (eos,), 0.5) for s in seqs]
    assert scores == sorted(scores, reverse=True)
    # The score's length counts the prompt and not a final EOS (vLLM's).
    s = BeamSearchSequence([5, 1, eos], cum_logprob=-2.0)
    assert score(s, (eos,), 1.0) == -1.0 and score(s, (), 2.0) == -2.0 / 9


@pytest.mark.parametrize("kwargs, message", [
    (dict(beam_width=0, max_tokens=4), "beam_width must be in"),
    (dict(beam_width=11, max_tokens=4), r"beam_width must be in \[1, 10\], got 11"),
    (dict(beam_width=2, max_tokens=0), "max_tokens must be >= 1, got 0")])
def test_bad_beam_params_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BeamSearchParams(**kwargs)


# ---- the engine against transformers -------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(make_tiny_llama_dir):
    return make_tiny_llama_dir(tokenizer=True, initializer_range=0.2, num_hidden_layers=2,
                               hidden_size=64, num_attention_heads=4, num_key_value_heads=2)


def hf_beam_search(folder, prompt, width, steps):
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # no beam ends early, as ignore_eos
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), num_beams=width,
                             num_return_sequences=width, do_sample=False, max_new_tokens=steps,
                             length_penalty=1.0, early_stopping=False, pad_token_id=0)
        seqs = out.tolist()
        # Each returned sequence's log-probability, by a forward pass over it.
        logp = torch.log_softmax(model(out).logits.float(), -1)
        n = len(prompt)
        cum = [float(logp[i, n - 1:-1].gather(-1, out[i, n:, None]).sum()) for i in range(width)]
    return seqs, cum


@pytest.mark.parametrize("width", [2, 4])
def test_llm_beam_search_equals_transformers(tiny, width):
    llm = LLM(str(tiny), num_kv_blocks=128, max_model_len=128, max_num_seqs=32)
    rng = np.random.default_rng(width)
    prompts = [rng.integers(3, 49152, n).tolist() for n in (5, 23)]
    steps = 12
    outs = llm.beam_search([{"prompt_token_ids": p} for p in prompts],
                           BeamSearchParams(width, steps, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        want, cum = hf_beam_search(tiny, prompt, width, steps)
        assert [s.tokens for s in out.sequences] == want
        np.testing.assert_allclose([s.cum_logprob for s in out.sequences], cum, rtol=1e-4)
        assert all(len(s.tokens) == len(prompt) + steps for s in out.sequences)
        assert all(isinstance(s.text, str) for s in out.sequences)
    engine = llm.llm_engine
    # Every pass after the first found all full blocks of each beam's parent in the prefix
    # cache: a beam of n tokens hits (n - 1) // 16 blocks (never its last token's).
    stats = engine.kv.cache_stats
    assert stats.hits == sum(width * ((len(p) + t - 1) // 16 * 16)
                             for p in prompts for t in range(1, steps))
    assert stats.queries == sum(len(p) + sum(width * (len(p) + t) for t in range(1, steps))
                                for p in prompts)
    assert engine.kv.pool.num_free == engine.kv.pool.num_usable and not engine.scheduler.waiting


def test_a_prompt_too_long_for_the_beams_is_refused(tiny):
    llm = LLM(str(tiny), num_kv_blocks=32, max_model_len=64)
    with pytest.raises(ValueError, match="a prompt of 60 tokens plus max_tokens 8 exceeds "
                                         "max_model_len 64"):
        llm.beam_search([{"prompt_token_ids": list(range(3, 63))}], BeamSearchParams(2, 8))
