"""SamplingParams, named and validated as vLLM's are, so scripts can switch engines."""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from paged_jax.structured_outputs import StructuredOutputsParams

# vLLM's RequestOutputKind: "cumulative" (an output after every step that advanced the
# request, with everything so far) or "final_only" (one output, when it finishes: what
# LLM.generate asks for, which saves building one per running request per step).
OUTPUT_KINDS = ("cumulative", "final_only")
# top-N logprobs are computed for this many ranks on device, unless the engine's
# max_logprobs says otherwise
MAX_LOGPROBS = 20
# Entries of a request's logit_bias: the sampler holds them in fixed [rows, 300] arrays
# (OpenAI's own limit is 300 tokens)
MAX_LOGIT_BIAS = 300
INT32_MAX = 2**31 - 1  # the device holds top_k and token ids as int32
FLOAT32_MAX = 3.4028234663852886e38  # the device holds the float parameters as float32


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 (or 0) disables; a k at or past the vocabulary keeps every token
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: Sequence[str] | str | None = None
    stop_token_ids: Sequence[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    logprobs: int | None = None
    # For every prompt token after the first: its logprob given the tokens before it, with
    # this many most likely alternatives (RequestOutput.prompt_logprobs; vLLM's). The prompt
    # is then computed afresh, not read from the prefix cache: a cached block has no logits.
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    # With special tokens kept: whether they are set apart by spaces as the tokenizer's own
    # decoding puts them (vLLM's default), or joined to the text around them
    spaces_between_special_tokens: bool = True
    # False: outputs carry token ids only, no text (nothing is decoded; no stop strings)
    detokenize: bool = True
    # Keep only the prompt's last k tokens (-1: max_model_len of them), vLLM's left
    # truncation
    truncate_prompt_tokens: int | None = None
    include_stop_str_in_output: bool = False
    output_kind: str = "cumulative"  # OUTPUT_KINDS
    # The output held to a JSON schema, a regex, a choice or a grammar (a dict is taken as
    # StructuredOutputsParams' fields)
    structured_outputs: StructuredOutputsParams | None = None
    # vLLM's token rules (token_rules.py): no EOS or stop token before min_tokens tokens;
    # only allowed_token_ids; never bad_words
    min_tokens: int = 0
    allowed_token_ids: Sequence[int] | None = None
    bad_words: Sequence[str] | None = None
    # token id -> a number in [-100, 100] added to its logit before sampling (OpenAI's)
    logit_bias: dict[int, float] | None = None

    def __post_init__(self):
        # First: every float the sampler puts on the device is a finite float32, so that
        # the range checks below never compare NaN and Infinity never reaches a step.
        for name in ("temperature", "top_p", "min_p", "presence_penalty",
                     "frequency_penalty", "repetition_penalty"):
            value = getattr(self, name)
            _check(isinstance(value, (int, float)) and math.isfinite(value)
                   and abs(value) <= FLOAT32_MAX, name, value,
                   f"must be a finite number of at most {FLOAT32_MAX:.4g} in magnitude")
        _check(self.n >= 1, "n", self.n, "must be >= 1")
        _check(self.temperature >= 0, "temperature", self.temperature, "must be >= 0")
        _check(0 < self.top_p <= 1, "top_p", self.top_p, "must be in (0, 1]")
        _check(-1 <= self.top_k <= INT32_MAX, "top_k", self.top_k,
               f"must be -1 (disabled) or in [1, {INT32_MAX}]")
        _check(0 <= self.min_p <= 1, "min_p", self.min_p, "must be in [0, 1]")
        _check(-2 <= self.presence_penalty <= 2, "presence_penalty", self.presence_penalty,
               "must be in [-2, 2]")
        _check(-2 <= self.frequency_penalty <= 2, "frequency_penalty", self.frequency_penalty,
               "must be in [-2, 2]")
        _check(self.repetition_penalty > 0, "repetition_penalty", self.repetition_penalty,
               "must be > 0")
        _check(self.max_tokens is None or self.max_tokens >= 1, "max_tokens", self.max_tokens,
               "must be >= 1")
        # (the upper bound is the engine's max_logprobs, checked as a request is added)
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _check(value is None or 0 <= value <= INT32_MAX, name, value,
                   "must be >= 0 (at most the engine's max_logprobs)")
        bad = [t for t in self.stop_token_ids or () if not 0 <= t <= INT32_MAX]
        _check(not bad, "stop_token_ids", bad[0] if bad else None,
               f"must be token ids in [0, {INT32_MAX}]")
        _check(self.output_kind in OUTPUT_KINDS, "output_kind", self.output_kind,
               f"must be one of {', '.join(OUTPUT_KINDS)}")
        if self.seed == -1:  # "random", as vLLM and the web UIs that send it mean it
            object.__setattr__(self, "seed", None)
        _check(self.seed is None or 0 <= self.seed < 2**63, "seed", self.seed,
               "must be -1 (random) or an integer in [0, 2**63)")
        _check(self.truncate_prompt_tokens is None or self.truncate_prompt_tokens == -1
               or 1 <= self.truncate_prompt_tokens <= INT32_MAX, "truncate_prompt_tokens",
               self.truncate_prompt_tokens, "must be -1 (max_model_len) or >= 1")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(s for s in (self.stop or ()) if s))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        _check(self.detokenize or not self.stop, "detokenize", self.detokenize,
               "must be true for stop strings (they are matched in the text)")
        _check(self.min_tokens >= 0 and (self.max_tokens is None
                                          or self.min_tokens <= self.max_tokens),
               "min_tokens", self.min_tokens, "must be in [0, max_tokens]")
        if self.allowed_token_ids is not None:
            ids = tuple(self.allowed_token_ids)
            _check(bool(ids) and all(isinstance(t, int) and 0 <= t <= INT32_MAX for t in ids),
                   "allowed_token_ids", self.allowed_token_ids,
                   "must be a non-empty list of token ids")
            object.__setattr__(self, "allowed_token_ids", ids)
        if self.bad_words is not None:
            words = (self.bad_words,) if isinstance(self.bad_words, str) else tuple(
                self.bad_words)
            _check(all(isinstance(w, str) and w.strip() for w in words), "bad_words",
                   self.bad_words, "must be a list of non-blank strings")
            object.__setattr__(self, "bad_words", words)
        if self.logit_bias:
            bias = {}
            for token, value in self.logit_bias.items():
                tid = int(token) if isinstance(token, str) and token.isdigit() else token
                _check(isinstance(tid, int) and not isinstance(tid, bool)
                       and 0 <= tid <= INT32_MAX, "logit_bias", token,
                       "must map token ids to numbers; a key is not a token id")
                _check(isinstance(value, (int, float)) and not isinstance(value, bool)
                       and math.isfinite(value) and -100 <= value <= 100, "logit_bias", value,
                       "must map token ids to numbers in [-100, 100]")
                bias[tid] = float(value)
            _check(len(bias) <= MAX_LOGIT_BIAS, "logit_bias", f"{len(bias)} entries",
                   f"must have at most {MAX_LOGIT_BIAS} entries")
            object.__setattr__(self, "logit_bias", bias)
        if isinstance(self.structured_outputs, dict):
            object.__setattr__(self, "structured_outputs",
                               StructuredOutputsParams(**self.structured_outputs))

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def uses_token_rules(self) -> bool:
        return bool(self.min_tokens or self.allowed_token_ids or self.bad_words)

    @property
    def uses_penalties(self) -> bool:
        return (self.presence_penalty != 0 or self.frequency_penalty != 0
                or self.repetition_penalty != 1)


def _check(ok: bool, name: str, value, rule: str):
    if not ok:
        raise ValueError(f"{name} {rule}, got {value!r}")
