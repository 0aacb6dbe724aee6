"""Per-request token rules applied through the sampler's bitmask, as vLLM's SamplingParams
have them: allowed_token_ids (only these), bad_words (never these words: a one-token word is
banned everywhere, the last token of a longer one wherever the output so far ends with the
rest of it) and min_tokens (no EOS or stop token before that many tokens). Host side, plain
numpy; each rule clears bits of a request's bitmask row (structured_outputs.py sets the
rest)."""
from __future__ import annotations

import numpy as np

from paged_jax.request import Request


class TokenRules:
    def __init__(self, params, eos_token_ids, vocab_size: int, tokenizer=None):
        width = (vocab_size + 31) // 32
        self.allowed = None  # [width] int32 bitmask of allowed_token_ids, or None
        if params.allowed_token_ids:
            bits = np.zeros(width * 32, bool)
            bits[list(params.allowed_token_ids)] = True
            self.allowed = pack(bits)
        self.banned_words = bad_word_ids(params.bad_words, tokenizer) if params.bad_words else []
        self.min_tokens = params.min_tokens
        self.held_back = sorted(set(eos_token_ids) | set(params.stop_token_ids))

    @classmethod
    def for_request(cls, params, eos_token_ids, vocab_size, tokenizer) -> "TokenRules | None":
        if not (params.allowed_token_ids or params.bad_words or params.min_tokens):
            return None
        return cls(params, eos_token_ids, vocab_size, tokenizer)

    def apply(self, req: Request, row: np.ndarray) -> None:
        """Clears from a bitmask row ([width] int32) the tokens the rules refuse next."""
        if self.allowed is not None:
            row &= self.allowed
        out = req.output_token_ids
        banned = []
        for word in self.banned_words:
            n = len(word) - 1
            if n == 0 or (len(out) >= n and out[len(out) - n:] == word[:-1]):
                banned.append(word[-1])
        if len(out) + req.num_pending < self.min_tokens:
            banned += self.held_back
        words = row.view(np.uint32)
        for t in banned:
            words[t >> 5] &= ~np.uint32(1 << (t & 31))


def pack(bits: np.ndarray) -> np.ndarray:
    """[width * 32] bool -> [width] int32, bit i of word w standing for entry 32 w + i."""
    return np.packbits(bits.reshape(-1, 32), axis=-1, bitorder="little").view(np.int32)[:, 0]


def bad_word_ids(words, tokenizer) -> list[list[int]]:
    """The token sequences of each bad word, at the start of the text and after a space, as
    vLLM tokenizes them (the spaced form only where it is a different sequence of the same
    length)."""
    if tokenizer is None:
        raise ValueError("bad_words need a tokenizer; this model has none")
    out = []
    for word in words:
        plain = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        if plain:
            out.append(list(plain))
        if spaced and spaced[0] != (plain or [None])[0] and len(spaced) == len(plain):
            out.append(list(spaced))
    return out
