"""Sampling on device, inside the jitted step: penalties, temperature, min-p, top-k, top-p,
per-request seeds and top-N logprobs.

Each request draws its random number from its own key, fold_in(seed, number of tokens it
has generated), so a seeded request samples the same tokens whatever batch it lands in. Rows
may carry a speculative draft token (spec_decode.py): the row's token is then the draft if
the target distribution keeps it, else a draw from that distribution without it (other
streams of the same key). The distribution stays the model's, but which positions get
drafts depends on the batch, so seeded requests under speculative decoding are reproducible
only for the same workload. Optional
work (penalties, sorting for top-k/top-p, logprobs) sits behind lax.cond on runtime flags:
one compiled variant per shape serves every mix of sampling options.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from paged_jax.request import Request
from paged_jax.sampling_params import MAX_LOGIT_BIAS, MAX_LOGPROBS
from paged_jax.step_inputs import pad
from paged_jax.structured_outputs import fill_bitmask


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingInputs:
    temperature: jax.Array  # [S] f32; 0 = greedy
    top_k: jax.Array  # [S] i32; 0 = off
    top_p: jax.Array  # [S] f32
    min_p: jax.Array  # [S] f32
    repetition_penalty: jax.Array  # [S] f32
    presence_penalty: jax.Array  # [S] f32
    frequency_penalty: jax.Array  # [S] f32
    seed: jax.Array  # [S, 2] u32 (low, high words)
    step: jax.Array  # [S] i32: tokens generated so far
    prompt_lens: jax.Array  # [S] i32
    # [S, L] i32: prompt then output tokens, -1 padded (penalties only; None: a caller
    # without them)
    history: jax.Array | None
    draft: jax.Array  # [S] i32: the speculative draft token this row verifies, or -1
    # [S, ceil(V / 32)] i32: bit i of word w allows token 32 w + i (structured outputs); all
    # ones for unconstrained rows
    bitmask: jax.Array
    bias_ids: jax.Array  # [S, MAX_LOGIT_BIAS] i32: logit_bias's tokens, -1 padded
    bias_values: jax.Array  # [S, MAX_LOGIT_BIAS] f32: what each adds to its logit
    flags: jax.Array  # [7] bool: any penalties, top-k/top-p, logprobs, random sampling,
    # drafts, bitmask, logit bias
    # [S] i32: a prompt token whose logprob this row scores (prompt logprobs): the row's
    # token is then that one, its logprob and rank taken from the raw logits; -1 elsewhere.
    # (None: a caller without prompt logprobs.)
    score: jax.Array | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SampleResult:
    tokens: jax.Array  # [S] i32
    logprob: jax.Array  # [S] f32 of the chosen token
    rank: jax.Array  # [S] i32, 1 = most likely
    top_ids: jax.Array  # [S, num_top] (the engine's max_logprobs)
    top_logprobs: jax.Array  # [S, num_top]


def build_inputs(reqs: list[Request], num_rows: int, history_len: int,
                 drafts: list[list[int]] | None = None, mask_width: int = 0,
                 scores: list[tuple[int, int]] = (),
                 cache: "ColumnCache | None" = None) -> dict[str, np.ndarray | None]:
    """Host side: numpy arrays for the rows of `reqs`, padded to num_rows. drafts: per
    request, the speculative tokens its row computes after its last token; such a request
    has len(drafts) + 1 rows, row j verifying draft j (the last row samples the bonus).
    mask_width: int32 words of a bitmask row; "bitmask" is None when no request has
    structured outputs (the runner then passes an all-ones mask it keeps on the device).
    scores: (row, prompt token) of the rows that score a prompt token (prompt logprobs):
    rows past the sampled ones, or the row of a chunk that does not sample; "score" is None
    when there are none (the runner passes a -1 column it keeps). cache: keeps the columns
    that depend only on the rows' requests from one step to the next (ColumnCache)."""
    drafts = drafts or [[]] * len(reqs)
    bitmask = None
    if any(r.matcher is not None or r.rules is not None for r in reqs):
        bitmask = np.full((num_rows, mask_width), -1, np.int32)
        row = 0
        for r, d in zip(reqs, drafts):
            if r.matcher is not None:
                fill_bitmask(r.matcher, d, bitmask, row)
            if r.rules is not None:  # (such requests get no drafts)
                r.rules.apply(r, bitmask[row])
            row += len(d) + 1
    if any(drafts):
        expanded = [(r, j, d[j] if j < len(d) else -1)
                    for r, d in zip(reqs, drafts) for j in range(len(d) + 1)]
        rows = [r for r, _, _ in expanded]
        draft = pad([d for _, _, d in expanded], num_rows, -1)
        step = [len(r.output_token_ids) + r.num_pending + j for r, j, _ in expanded]
    else:  # (most steps: a row a request)
        rows, draft = reqs, np.full((num_rows,), -1, np.int32)
        step = [len(r.output_token_ids) + r.num_pending for r in reqs]
    const = cache.get(rows, num_rows) if cache is not None else constant_columns(rows,
                                                                                 num_rows)
    score = None
    if scores:  # (rows past the sampled ones are like padding but for the token scored)
        score = np.full((num_rows,), -1, np.int32)
        score_rows, targets = zip(*scores)
        score[list(score_rows)] = targets
    # Always full width so the step keeps one shape whether or not penalties are in use;
    # None when no row uses them (the runner passes an empty history it keeps on the device:
    # rows x max_model_len int32 is megabytes a step).
    history = None
    if const["penalties"]:
        history = np.full((num_rows, history_len), -1, np.int32)
        for i, r in enumerate(rows):
            if r.params.uses_penalties:
                toks = r.all_token_ids[:history_len]
                history[i, :len(toks)] = toks
    return dict(
        {k: v for k, v in const.items() if k not in _FLAG_KEYS},
        # (pending tokens: sampled by the step in flight, asynchronous scheduling)
        step=pad(step, num_rows), history=history, draft=draft, bitmask=bitmask,
        flags=np.asarray([const["penalties"], const["top"], const["logprobs"] or bool(scores),
                          const["random"], len(rows) > len(reqs), bitmask is not None,
                          const["bias"]], bool),
        score=score,
    )


# constant_columns' flags, which build_inputs folds into the step's flags column
_FLAG_KEYS = ("penalties", "top", "logprobs", "random", "bias")


def constant_columns(reqs: list[Request], num_rows: int) -> dict:
    """The columns of the rows of `reqs` (one a row) that stay the same while the rows do:
    the sampling parameters, prompt lengths, seeds and logit bias, and the flags they decide
    (as numpy arrays, or bools; read-only: a ColumnCache hands them to later steps)."""
    columns = [r.sampling_row or _sampling_row(r) for r in reqs]
    n = len(reqs)
    # Stacked in one conversion each; padding rows sample nothing (neutral values).
    floats = np.tile(np.asarray(_NEUTRAL, np.float32), (num_rows, 1))
    ints = np.zeros((num_rows, 4), np.int64)
    if n:
        floats[:n] = [c[0] for c in columns]
        ints[:n] = [c[1] for c in columns]
    temperature, top_p, min_p, repetition, presence, frequency = np.ascontiguousarray(floats.T)
    top_k, prompt_lens, seed_lo, seed_hi = ints.T
    p = [r.params for r in reqs]
    out = dict(
        temperature=temperature, top_k=top_k.astype(np.int32), top_p=top_p, min_p=min_p,
        repetition_penalty=repetition, presence_penalty=presence,
        frequency_penalty=frequency,
        seed=np.stack([seed_lo, seed_hi], axis=1).astype(np.uint32),
        prompt_lens=prompt_lens.astype(np.int32),
        **_logit_bias([x.logit_bias for x in p], num_rows))
    for v in out.values():
        if v is not None:
            v.flags.writeable = False
    return dict(out, penalties=bool(np.any((repetition != 1) | (presence != 0)
                                           | (frequency != 0))),
                top=bool(np.any((top_k > 0) | (top_p < 1))),
                logprobs=any(x.logprobs is not None for x in p),
                random=bool(np.any(temperature > 0)),
                bias=any(x.logit_bias for x in p))


class ColumnCache:
    """The constant columns (constant_columns) of the last step's rows, kept while the rows'
    requests stay the same ones in the same order, as most decode steps' do: vLLM's
    persistent batch keeps them the same way. At hundreds of rows, building them was most of
    a decode step's sampling inputs."""

    def __init__(self):
        self._rows: tuple = ()  # (held, so that the ids below stay theirs)
        self._key: tuple = ()
        self._columns: dict = {}

    def get(self, reqs: list[Request], num_rows: int) -> dict:
        key = (num_rows, *map(id, reqs))
        if key != self._key:
            self._rows, self._key = tuple(reqs), key
            self._columns = constant_columns(reqs, num_rows)
        return self._columns


# temperature, top_p, min_p, repetition, presence and frequency penalties of a padding row
_NEUTRAL = (0.0, 1.0, 0.0, 1.0, 0.0, 0.0)


def _sampling_row(req: Request) -> tuple[tuple, tuple]:
    """The request's constant sampling columns: (temperature (0 for greedy), top_p, min_p,
    repetition, presence, frequency), (top_k (0 for none), prompt length, the seed's low and
    high words). Kept on the request: its params and seed never change."""
    x = req.params
    req.sampling_row = ((0.0 if x.greedy else x.temperature, x.top_p, x.min_p,
                         x.repetition_penalty, x.presence_penalty, x.frequency_penalty),
                        (max(x.top_k, 0), len(req.prompt_token_ids),
                         req.seed & 0xFFFFFFFF, req.seed >> 32))
    return req.sampling_row


def _logit_bias(biases, num_rows: int) -> dict:
    """[num_rows, MAX_LOGIT_BIAS] ids and values, or None for both when no row has a bias
    (the runner passes empty ones it keeps on the device)."""
    if not any(biases):
        return dict(bias_ids=None, bias_values=None)
    ids = np.full((num_rows, MAX_LOGIT_BIAS), -1, np.int32)
    values = np.zeros((num_rows, MAX_LOGIT_BIAS), np.float32)
    for i, bias in enumerate(biases):
        if bias:
            ids[i, :len(bias)] = list(bias)
            values[i, :len(bias)] = list(bias.values())
    return dict(bias_ids=ids, bias_values=values)


def _add_bias(logits, si: SamplingInputs):
    rows = jnp.arange(logits.shape[0])[:, None]
    return logits.at[rows, jnp.maximum(si.bias_ids, 0)].add(
        jnp.where(si.bias_ids >= 0, si.bias_values, 0.0))


def sample(logits: jax.Array, si: SamplingInputs,
           num_top: int = MAX_LOGPROBS) -> SampleResult:
    """logits [S, V] float32 -> sampled tokens and logprobs (of the raw model distribution),
    with the num_top most likely tokens' (a static width: the engine's max_logprobs)."""
    # Structured outputs first: a token the grammar refuses has no mass whatever follows.
    # logit_bias, then structured outputs: a token the grammar refuses has no mass whatever
    # follows. (None: a caller without them.)
    biased = (logits if si.bias_ids is None else
              jax.lax.cond(si.flags[6], _add_bias, lambda lg, _: lg, logits, si))
    allowed = (biased if si.bitmask is None else
               jax.lax.cond(si.flags[5], _apply_bitmask, lambda lg, _: lg, biased, si))
    penalized = (allowed if si.history is None else
                 jax.lax.cond(si.flags[0], _penalize, lambda lg, _: lg, allowed, si))
    greedy_tokens = argmax_rows(penalized)
    # A greedy row keeps its draft exactly when the draft is the argmax: nothing to do; random
    # rows check theirs inside _sample_random.
    tokens = jax.lax.cond(si.flags[3], _sample_random, lambda lg, _, g: g, penalized, si,
                          greedy_tokens)
    if si.score is not None:  # scoring rows report the prompt token's logprob and rank
        tokens = jnp.where(si.score >= 0, si.score, tokens)
    # Logprobs cost three more passes over [S, V]: only when some request asked for them.
    chosen, rank, top_lp, top_ids = jax.lax.cond(
        si.flags[2], functools.partial(_logprobs, num_top=num_top),
        functools.partial(_no_logprobs, num_top=num_top), logits, tokens)
    return SampleResult(tokens, chosen, rank, top_ids, top_lp)


def _apply_bitmask(logits, si: SamplingInputs):
    s, v = logits.shape
    bits = (si.bitmask[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1
    return jnp.where(bits.reshape(s, -1)[:, :v] != 0, logits, -jnp.inf)


def argmax_rows(x: jax.Array, chunk: int = 128) -> jax.Array:
    """jnp.argmax(x, -1) (first maximum wins) of [S, V], by the maximum of each chunk of the
    vocabulary and then an argmax inside the winning chunk: XLA's CPU argmax over 49k columns
    took 7 ms at 64 rows here, this 0.2 ms."""
    s, v = x.shape
    pad = -v % chunk
    if pad:
        x = jnp.pad(x, ((0, 0), (0, pad)), constant_values=-jnp.inf)
    chunks = x.reshape(s, -1, chunk)
    best = jnp.argmax(chunks.max(-1), axis=-1)  # the first chunk holding the maximum
    inside = jnp.take_along_axis(chunks, best[:, None, None], axis=1)[:, 0]
    return (best * chunk + jnp.argmax(inside, axis=-1)).astype(jnp.int32)


def _logprobs(logits, tokens, num_top: int):
    raw = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(raw, tokens[:, None], axis=-1)[:, 0]
    rank = 1 + jnp.sum(raw > chosen[:, None], axis=-1).astype(jnp.int32)
    top_lp, top_ids = jax.lax.top_k(raw, min(num_top, raw.shape[-1]))
    return chosen, rank, top_lp, top_ids.astype(jnp.int32)


def _no_logprobs(logits, tokens, num_top: int):
    s, k = logits.shape[0], min(num_top, logits.shape[-1])
    return (jnp.zeros((s,), jnp.float32), jnp.zeros((s,), jnp.int32),
            jnp.zeros((s, k), jnp.float32), jnp.zeros((s, k), jnp.int32))


def _target_probs(logits, si: SamplingInputs):
    """The distribution a random row samples from: temperature, min-p, top-k, top-p."""
    temp = jnp.where(si.temperature > 0, si.temperature, 1.0)[:, None]
    scaled = _min_p(logits / temp, si.min_p)
    scaled = jax.lax.cond(si.flags[1], _top_k_top_p, lambda lg, *_: lg, scaled, si.top_k,
                          si.top_p)
    return jax.nn.softmax(scaled, axis=-1)


def _inverse_cdf(probs, u):
    """Inverse-CDF sampling: one uniform draw per row instead of a Gumbel draw per vocabulary
    entry, which cost ~10x more on the CPU. Tokens of zero mass are never picked: the first
    index whose CDF reaches u always has positive probability."""
    cdf = jnp.cumsum(probs, axis=-1)
    tokens = jnp.sum(cdf < (u * cdf[:, -1])[:, None], axis=-1)
    return jnp.minimum(tokens, probs.shape[-1] - 1).astype(jnp.int32)


def _sample_random(logits, si: SamplingInputs, greedy_tokens):
    probs = _target_probs(logits, si)
    random_tokens = _inverse_cdf(probs, jax.vmap(_uniform)(si.seed, si.step))
    random_tokens = jax.lax.cond(si.flags[4], _verify_drafts, lambda p, _, t: t, probs, si,
                                 random_tokens)
    return jnp.where(si.temperature > 0, random_tokens, greedy_tokens)


def _verify_drafts(probs, si: SamplingInputs, tokens):
    """Rows with a draft d: keep d with probability p(d), else draw from p with d removed
    (renormalized). The token's distribution is then p exactly. (Greedy rows' results are
    discarded by the caller.)"""
    d = jnp.maximum(si.draft, 0)
    p_draft = jnp.take_along_axis(probs, d[:, None], axis=-1)[:, 0]
    u_keep = jax.vmap(_uniform)(si.seed, si.step, jnp.ones_like(si.step))
    u_other = jax.vmap(_uniform)(si.seed, si.step, jnp.full_like(si.step, 2))
    others = probs.at[jnp.arange(probs.shape[0]), d].set(0.0)
    replaced = _inverse_cdf(others, u_other)
    verified = jnp.where(u_keep < p_draft, d, replaced)
    return jnp.where(si.draft >= 0, verified, tokens)


def _uniform(seed, step, stream=0):
    """A uniform draw of the request's key at `step`; stream > 0: independent others (the
    draft checks)."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed[0]), seed[1]), step)
    key = jax.random.fold_in(key, stream)
    return jax.random.uniform(key, (), jnp.float32)


def _penalize(logits, si: SamplingInputs):
    s, v = logits.shape
    hist = si.history
    valid = hist >= 0
    idx = jnp.where(valid, hist, 0)
    is_output = jnp.arange(hist.shape[1])[None, :] >= si.prompt_lens[:, None]
    rows = jnp.arange(s)[:, None]
    seen = jnp.zeros((s, v), bool).at[rows, idx].max(valid)
    counts = jnp.zeros((s, v), jnp.float32).at[rows, idx].add((valid & is_output).astype(
        jnp.float32))
    rep = si.repetition_penalty[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits - si.frequency_penalty[:, None] * counts
    return logits - si.presence_penalty[:, None] * (counts > 0)


def _min_p(logits, min_p):
    probs = jax.nn.softmax(logits, axis=-1)
    keep = probs >= min_p[:, None] * jnp.max(probs, axis=-1, keepdims=True)
    return jnp.where(keep, logits, -jnp.inf)


def _top_k_top_p(logits, top_k, top_p):
    v = logits.shape[-1]
    desc = -jnp.sort(-logits, axis=-1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
    kth = jnp.take_along_axis(desc, (k - 1)[:, None], axis=-1)
    probs = jax.nn.softmax(desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
    # The most likely token is always kept; then tokens while the mass before them < top_p.
    n_keep = jnp.maximum(jnp.sum(before < top_p[:, None], axis=-1), 1)
    pth = jnp.take_along_axis(desc, (n_keep - 1)[:, None], axis=-1)
    return jnp.where(logits >= jnp.maximum(kth, pth), logits, -jnp.inf)
