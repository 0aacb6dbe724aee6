"""Speculative decoding with n-gram (prompt lookup) drafts, as vLLM's "ngram" method.

Host side, plain Python. After each step a decoding request may get up to k draft tokens:
the tokens that followed the most recent earlier occurrence of its last n tokens (n from
prompt_lookup_max down to prompt_lookup_min). The next step computes the request's last token
and its drafts as one row of k + 1 tokens (a "mixed" step) and samples at every position; the
sampler keeps each draft with the target model's probability of it (a greedy request: when it
is the argmax) and otherwise replaces it with a draw from the target distribution without it,
which leaves the output distribution exactly the model's (Leviathan et al., 2023, with a
one-hot draft distribution). The tokens up to the first rejected draft are kept, plus that
replacement, or a bonus token sampled after the last draft when all are kept: 1 to k + 1
tokens a step.

Requests with repetition, presence or frequency penalties get no drafts (the penalties of a
later position would depend on the drafts before it).
"""
from __future__ import annotations

def propose_ngram(tokens: list[int], k: int, n_min: int, n_max: int) -> list[int]:
    """Up to k tokens that followed the most recent earlier occurrence of the longest suffix
    of `tokens` of n_max down to n_min tokens; [] when no such suffix occurred before."""
    if k <= 0:
        return []
    size = len(tokens)
    for n in range(min(n_max, size - 1), n_min - 1, -1):
        suffix = tokens[size - n:]
        # An occurrence ending before the suffix's own last token, most recent first.
        for start in range(size - n - 1, -1, -1):
            if tokens[start:start + n] == suffix:
                return tokens[start + n:start + n + k]
    return []


def accepted_prefix(drafts: list[int], tokens: list[int]) -> list[int]:
    """The tokens a row of len(drafts) + 1 sampled positions yields: position j's token
    replaces draft j unless they are equal (kept), and the first replacement ends the row;
    if every draft was kept, the last position's token (the bonus) is added."""
    out = []
    for draft, token in zip(drafts, tokens):
        out.append(token)
        if token != draft:
            return out
    out.append(tokens[len(drafts)])
    return out
