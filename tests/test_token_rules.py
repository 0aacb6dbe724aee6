"""vLLM's token rules through the sampler's bitmask: min_tokens, allowed_token_ids and
bad_words, each checked by an assertion that fails without it (the free run breaks the rule
first), beside unconstrained requests whose outputs do not change."""
import numpy as np
import pytest

from paged_jax import SamplingParams
from paged_jax.token_rules import bad_word_ids

from test_engine import make_llm, random_prompts, tiny_dir  # noqa: F401

EOS = 2


@pytest.fixture(scope="module")
def llm(tiny_dir):
    return make_llm(tiny_dir)


def greedy(**kw):
    return SamplingParams(temperature=0.0, **{"max_tokens": 24, **kw})


def outputs(llm, prompts, params):
    return [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]


def test_min_tokens_holds_back_stop_tokens_until_reached(llm):
    prompts = random_prompts(3, 31, 3, 20)
    free = outputs(llm, prompts, greedy(ignore_eos=True))
    # Each stops at a token from early in its free run: without min_tokens it ends there.
    stops = [o.token_ids[2] for o in free]
    early = outputs(llm, prompts, [greedy(stop_token_ids=[s]) for s in stops])
    assert all(len(o.token_ids) <= 3 for o in early)
    held = outputs(llm, prompts, [greedy(stop_token_ids=[s], min_tokens=10) for s in stops])
    for o, s in zip(held, stops):
        assert len(o.token_ids) >= 10
        assert s not in o.token_ids[:9]  # never sampled before the tenth token
    with pytest.raises(ValueError, match="min_tokens must be in"):
        greedy(min_tokens=30)


def test_allowed_token_ids_are_the_only_tokens(llm):
    prompts = random_prompts(4, 32, 3, 20)
    rng = np.random.default_rng(0)
    allowed = sorted(rng.choice(np.arange(3, 49152), 40, replace=False).tolist())
    free = outputs(llm, prompts[:2], greedy())
    mixed = outputs(llm, prompts, [greedy(), greedy(),
                                   greedy(allowed_token_ids=allowed),
                                   SamplingParams(temperature=1.0, seed=4, max_tokens=24,
                                                  allowed_token_ids=allowed)])
    assert [o.token_ids for o in mixed[:2]] == [o.token_ids for o in free]
    for o in mixed[2:]:
        assert len(o.token_ids) == 24 and set(o.token_ids) <= set(allowed)
    assert not set(free[0].token_ids) <= set(allowed)
    with pytest.raises(ValueError, match="allowed_token_ids holds 60000, outside"):
        llm.llm_engine.add_request("x", prompts[0], greedy(allowed_token_ids=[5, 60000]))


def test_bad_words_never_appear(llm):
    tokenizer = llm.llm_engine.tokenizer
    prompts = random_prompts(3, 33, 3, 20)
    free = outputs(llm, prompts, greedy(ignore_eos=True))
    # Words from the free runs: single tokens, and two-token sequences taken as text.
    words = [tokenizer.decode([free[0].token_ids[1]]).strip(),
             tokenizer.decode(free[1].token_ids[3:5])]
    words = [w for w in words if w]
    banned = bad_word_ids(words, tokenizer)

    def holds(ids, seq):
        return any(ids[i:i + len(seq)] == seq for i in range(len(ids) - len(seq) + 1))

    assert any(holds(o.token_ids, seq) for o in free for seq in banned)  # the free run does
    got = outputs(llm, prompts, greedy(ignore_eos=True, bad_words=words))
    assert not any(holds(o.token_ids, seq) for o in got for seq in banned)


def test_logit_bias_moves_the_draw(llm):
    """+100 on a token makes it every greedy choice; -100 on a greedy run's tokens removes
    them; rows without a bias are unchanged."""
    prompts = random_prompts(3, 34, 3, 20)
    free = outputs(llm, prompts, greedy(max_tokens=8, ignore_eos=True))
    forced = outputs(llm, prompts, [greedy(max_tokens=8, ignore_eos=True),
                                    greedy(max_tokens=8, ignore_eos=True,
                                           logit_bias={777: 100.0}),
                                    greedy(max_tokens=8, ignore_eos=True, logit_bias={
                                        t: -100.0 for t in set(free[2].token_ids)})])
    assert forced[0].token_ids == free[0].token_ids
    assert forced[1].token_ids == [777] * 8 != free[1].token_ids
    assert not set(forced[2].token_ids) & set(free[2].token_ids)
    with pytest.raises(ValueError, match=r"logit_bias must map token ids to numbers in "
                                         r"\[-100, 100\], got 101"):
        greedy(logit_bias={5: 101})
    with pytest.raises(ValueError, match="logit_bias holds 60000, outside the vocabulary"):
        llm.llm_engine.add_request("x", prompts[0], greedy(logit_bias={60000: 1.0}))
