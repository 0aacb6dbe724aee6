"""Beam search, as vLLM V1 runs it (vllm/entrypoints/llm.py, LLM.beam_search): on top of the
engine, one engine pass per generated position.

Every step each live beam of every prompt goes in as a request of one token
(max_tokens=1) that returns the top 2 * beam_width log-probabilities of the model's raw
distribution. Each beam's candidates are ranked per prompt; a candidate that ends in EOS is
set aside as completed (unless ignore_eos), and the best beam_width of the others live on.
At the end the completed and live beams are ranked together by
cum_logprob / len(tokens) ** length_penalty (prompt included, a final EOS not), and the best
beam_width returned.

The beams share their KV blocks through the prefix cache: a beam's tokens are a prefix of its
children's, so each pass computes only the tokens after the last full cached block. Turn
enable_prefix_caching off and every pass recomputes every beam from its first token.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

from paged_jax.sampling_params import MAX_LOGPROBS


@dataclasses.dataclass(frozen=True)
class BeamSearchParams:
    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    length_penalty: float = 1.0

    def __post_init__(self):
        # 2 * beam_width candidates per beam come from the sampler's top-N log-probabilities.
        if not 1 <= self.beam_width <= MAX_LOGPROBS // 2:
            raise ValueError(f"beam_width must be in [1, {MAX_LOGPROBS // 2}], got "
                             f"{self.beam_width!r}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens!r}")


@dataclasses.dataclass
class BeamSearchSequence:
    tokens: list[int]  # the prompt's, then the generated ones
    cum_logprob: float = 0.0  # of the generated tokens
    finish_reason: str | None = None  # "stop" (ended in EOS) or "length"
    text: str | None = None  # the generated tokens, detokenized


@dataclasses.dataclass
class BeamSearchOutput:
    sequences: list[BeamSearchSequence]  # best first, beam_width of them


def score(seq: BeamSearchSequence, eos_token_ids: Sequence[int], length_penalty: float) -> float:
    """vLLM's get_beam_search_score: the length counts the prompt but not a final EOS."""
    n = len(seq.tokens) - (seq.tokens[-1] in eos_token_ids)
    return seq.cum_logprob / n ** length_penalty


def beam_search(prompts: list[list[int]], params: BeamSearchParams,
                top_logprobs: Callable[[list[list[int]]], list[dict[int, float]]],
                eos_token_ids: Sequence[int]) -> list[BeamSearchOutput]:
    """top_logprobs: token lists -> for each, the next token's top 2 * beam_width
    log-probabilities, {token id: logprob} (the engine, or a test's stand-in)."""
    width = params.beam_width
    eos = () if params.ignore_eos else tuple(eos_token_ids)

    def rank(seqs):
        # With ignore_eos an EOS is an ordinary token, and a final one counts in the length
        # (vLLM discounts it even then).
        return sorted(seqs, key=lambda s: score(s, eos, params.length_penalty), reverse=True)

    live = [[BeamSearchSequence(list(p))] for p in prompts]
    completed: list[list[BeamSearchSequence]] = [[] for _ in prompts]
    for _ in range(params.max_tokens):
        beams = [b for group in live for b in group]
        if not beams:
            break
        candidates = iter(top_logprobs([b.tokens for b in beams]))
        for i, group in enumerate(live):
            children = []
            for beam in group:
                for token, logprob in next(candidates).items():
                    child = BeamSearchSequence(beam.tokens + [token],
                                               beam.cum_logprob + logprob)
                    if token in eos:
                        child.finish_reason = "stop"
                        completed[i].append(child)
                    else:
                        children.append(child)
            live[i] = rank(children)[:width]
    outputs = []
    for group, done in zip(live, completed):
        for beam in group:
            beam.finish_reason = "length"
        outputs.append(BeamSearchOutput(rank(done + group)[:width]))
    return outputs
