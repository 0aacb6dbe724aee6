"""The device sampler against numpy: penalties exactly, filters by the set of tokens drawn."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paged_jax.request import Request
from paged_jax import sampler
from paged_jax.sampler import SamplingInputs, build_inputs, sample
from paged_jax.sampling_params import SamplingParams

V = 64


def make_inputs(params_list, histories, prompt_lens, seeds, steps=None, bitmask=None):
    """bitmask: [rows, V / 32] int32 of structured outputs' allowed tokens (None: all)."""
    reqs = []
    for i, (p, h, pl, seed) in enumerate(zip(params_list, histories, prompt_lens, seeds)):
        r = Request(str(i), list(h[:pl]), p, 10**6, seed)
        r.output_token_ids = list(h[pl:])
        reqs.append(r)
    arrays = build_inputs(reqs, len(reqs), history_len=32)
    if steps is not None:
        arrays["step"] = np.asarray(steps, np.int32)
    arrays["bitmask"] = (np.full((len(reqs), V // 32), -1, np.int32) if bitmask is None
                         else bitmask)
    arrays["flags"][5] = bitmask is not None
    return SamplingInputs(**arrays)


_sample = jax.jit(sample)


def numpy_penalize(logits, hist, prompt_len, p: SamplingParams):
    out = logits.copy()
    seen = np.zeros(V, bool)
    seen[hist] = True
    counts = np.bincount(np.asarray(hist[prompt_len:], int), minlength=V).astype(np.float32)
    out = np.where(seen, np.where(out > 0, out / p.repetition_penalty,
                                  out * p.repetition_penalty), out)
    out -= p.frequency_penalty * counts
    out -= p.presence_penalty * (counts > 0)
    return out


def test_penalties_match_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (3, V)).astype(np.float32)
    params = [SamplingParams(temperature=0, repetition_penalty=1.3),
              SamplingParams(temperature=0, presence_penalty=1.5, frequency_penalty=0.7),
              SamplingParams(temperature=0, repetition_penalty=0.8, frequency_penalty=-1.0)]
    hists = [rng.integers(0, V, 20) for _ in range(3)]
    si = make_inputs(params, hists, [8, 10, 5], [0, 1, 2])
    got = np.asarray(_sample(logits, si).tokens)
    for i in range(3):
        expected = numpy_penalize(logits[i], hists[i], [8, 10, 5][i], params[i])
        assert got[i] == int(np.argmax(expected))
    # And the penalties changed the choice for at least one row (else this test proves little).
    assert any(got[i] != int(np.argmax(logits[i])) for i in range(3))


def allowed_set(row, p: SamplingParams):
    probs = np.exp(row / p.temperature - np.max(row / p.temperature))
    probs /= probs.sum()
    keep = probs >= p.min_p * probs.max()
    order = np.argsort(-probs)
    if p.top_k > 0:
        keep[order[p.top_k:]] = False
    before = np.cumsum(probs[order]) - probs[order]
    keep[order[np.maximum(np.sum(before < p.top_p), 1):]] = False
    return set(np.flatnonzero(keep).tolist())


@pytest.mark.parametrize("p", [
    SamplingParams(temperature=0.7, top_k=5),
    SamplingParams(temperature=1.3, top_p=0.6),
    SamplingParams(temperature=1.0, min_p=0.2),
    SamplingParams(temperature=0.9, top_k=10, top_p=0.8, min_p=0.05),
])
def test_filters_only_ever_draw_allowed_tokens(p):
    rng = np.random.default_rng(1)
    row = rng.normal(0, 2, V).astype(np.float32)
    n = 256
    si = make_inputs([p] * n, [[1]] * n, [1] * n, list(range(n)))
    drawn = set(np.asarray(_sample(np.tile(row, (n, 1)), si).tokens).tolist())
    allowed = allowed_set(row, p)
    assert drawn <= allowed
    assert len(drawn) >= min(len(allowed), 3)  # it does sample, not just take the argmax


def test_plain_temperature_follows_the_softmax():
    rng = np.random.default_rng(2)
    row = rng.normal(0, 1, 8).astype(np.float32)
    row = np.concatenate([row, np.full(V - 8, -30, np.float32)])
    n = 4000
    p = SamplingParams(temperature=0.5)
    si = make_inputs([p] * n, [[1]] * n, [1] * n, list(range(n)))
    drawn = np.asarray(_sample(np.tile(row, (n, 1)), si).tokens)
    freq = np.bincount(drawn, minlength=V)[:8] / n
    probs = np.exp(row[:8] / 0.5)
    probs /= probs.sum()
    assert np.max(np.abs(freq - probs)) < 0.03


def test_seed_and_step_fix_the_draw():
    rng = np.random.default_rng(3)
    logits = np.tile(rng.normal(0, 1, V).astype(np.float32), (4, 1))
    p = SamplingParams(temperature=1.0)
    a = _sample(logits, make_inputs([p] * 4, [[1]] * 4, [1] * 4, [5, 5, 6, 5], [0, 0, 0, 1]))
    toks = np.asarray(a.tokens)
    assert toks[0] == toks[1]  # same seed, same step
    b = _sample(logits[:1], make_inputs([p], [[1]], [1], [5], [0]))
    assert int(np.asarray(b.tokens)[0]) == toks[0]  # and whatever the batch


def test_logprobs_and_rank_of_the_chosen_token():
    rng = np.random.default_rng(4)
    logits = rng.normal(0, 2, (2, V)).astype(np.float32)
    p = SamplingParams(temperature=1.0, logprobs=5)
    res = _sample(logits, make_inputs([p, p], [[1], [1]], [1, 1], [0, 1]))
    ref = logits - logits.max(1, keepdims=True)
    ref = ref - np.log(np.exp(ref).sum(1, keepdims=True))
    for i in range(2):
        tok = int(res.tokens[i])
        assert abs(float(res.logprob[i]) - ref[i, tok]) < 1e-5
        assert int(res.rank[i]) == 1 + int(np.sum(ref[i] > ref[i, tok]))
        np.testing.assert_array_equal(np.asarray(res.top_ids[i, :5]), np.argsort(-ref[i])[:5])


def test_argmax_rows_is_numpys_argmax_with_ties_and_odd_vocabularies():
    rng = np.random.default_rng(7)
    for vocab in (49152, 1000, 129, 5):
        x = rng.standard_normal((9, vocab)).astype(np.float32)
        x[1, :] = 0.5  # all tied: the first column wins
        x[2, [3, vocab - 1]] = 10.0  # tie across chunks: the earlier one wins
        x[3] = -np.inf
        x[3, vocab - 1] = -1e30
        np.testing.assert_array_equal(np.asarray(sampler.argmax_rows(jnp.asarray(x))),
                                      x.argmax(-1))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_the_bitmask_allows_only_its_tokens_and_leaves_other_rows_alone(temperature):
    """Rows with a structured-output bitmask draw only allowed tokens; all-ones rows draw
    exactly what they draw without any bitmask (the same seeds)."""
    rng = np.random.default_rng(7)
    n = 64
    logits = rng.normal(0, 2, (n, V)).astype(np.float32)
    allowed = rng.random((n, V)) < 0.2
    allowed[np.arange(n), rng.integers(0, V, n)] = True  # at least one a row
    allowed[n // 2:] = True  # the second half unconstrained
    words = (allowed.reshape(n, -1, 32).astype(np.uint32)
             << np.arange(32, dtype=np.uint32)).sum(-1).astype(np.uint32).view(np.int32)
    p = SamplingParams(temperature=temperature)
    args = ([p] * n, [[1]] * n, [1] * n, list(range(n)))
    masked = np.asarray(_sample(logits, make_inputs(*args, bitmask=words)).tokens)
    free = np.asarray(_sample(logits, make_inputs(*args)).tokens)
    assert allowed[np.arange(n), masked].all()
    np.testing.assert_array_equal(masked[n // 2:], free[n // 2:])
    if temperature == 0:  # greedy: the best allowed token
        best = np.where(allowed, logits, -np.inf).argmax(-1)
        np.testing.assert_array_equal(masked[:n // 2], best[:n // 2])
    assert (masked[:n // 2] != free[:n // 2]).any()  # the mask did change draws


def _columns_request(i: int, rng) -> Request:
    p = SamplingParams(temperature=float(rng.choice([0.0, 0.7])), top_k=int(rng.choice([-1, 5])),
                       top_p=float(rng.choice([1.0, 0.9])),
                       repetition_penalty=float(rng.choice([1.0, 1.2])),
                       logit_bias={3: 1.5} if rng.random() < 0.3 else None,
                       logprobs=2 if rng.random() < 0.3 else None)
    r = Request(f"c{i}", rng.integers(0, V, int(rng.integers(1, 9))).tolist(), p, 10**6,
                seed=int(rng.integers(0, 2**40)))
    r.output_token_ids = rng.integers(0, V, int(rng.integers(0, 5))).tolist()
    return r


def test_the_column_cache_gives_what_a_fresh_build_gives():
    """Steps whose rows are the step before's requests (in order, at one row count) reuse
    the cached columns; any other step rebuilds them. Either way every array equals an
    uncached build's, and a cached column cannot be written."""
    rng = np.random.default_rng(5)
    pool = [_columns_request(i, rng) for i in range(12)]
    cache = sampler.ColumnCache()
    steps = [pool[:6], pool[:6], pool[:6][::-1], pool[1:7], pool[1:7], pool[:3]]
    rows = [8, 8, 8, 8, 16, 8]
    built = []
    for reqs, num_rows in zip(steps, rows):
        for r in reqs:
            r.output_token_ids.append(int(rng.integers(0, V)))  # (the step column moves)
        got = build_inputs(list(reqs), num_rows, 32, cache=cache)
        want = build_inputs(list(reqs), num_rows, 32)
        assert got.keys() == want.keys()
        for k in want:
            if want[k] is None:
                assert got[k] is None, k
            else:
                np.testing.assert_array_equal(got[k], want[k], err_msg=k)
        built.append(got["temperature"])
    assert built[1] is built[0]  # the same requests in the same order: kept
    assert built[2] is not built[1] and built[4] is not built[3]  # reordered; more rows
    with pytest.raises(ValueError, match="read-only"):
        built[0][0] = 1.0
