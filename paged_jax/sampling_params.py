"""SamplingParams, named and validated as vLLM's are, so scripts can switch engines."""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

# vLLM's RequestOutputKind: "cumulative" (an output after every step that advanced the
# request, with everything so far) or "final_only" (one output, when it finishes: what
# LLM.generate asks for, which saves building one per running request per step).
OUTPUT_KINDS = ("cumulative", "final_only")
MAX_LOGPROBS = 20  # top-N logprobs are computed for this many ranks on device
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
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    output_kind: str = "cumulative"  # OUTPUT_KINDS

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
        _check(self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS, "logprobs",
               self.logprobs, f"must be in [0, {MAX_LOGPROBS}]")
        bad = [t for t in self.stop_token_ids or () if not 0 <= t <= INT32_MAX]
        _check(not bad, "stop_token_ids", bad[0] if bad else None,
               f"must be token ids in [0, {INT32_MAX}]")
        _check(self.output_kind in OUTPUT_KINDS, "output_kind", self.output_kind,
               f"must be one of {', '.join(OUTPUT_KINDS)}")
        if self.seed == -1:  # "random", as vLLM and the web UIs that send it mean it
            object.__setattr__(self, "seed", None)
        _check(self.seed is None or 0 <= self.seed < 2**63, "seed", self.seed,
               "must be -1 (random) or an integer in [0, 2**63)")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(s for s in (self.stop or ()) if s))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def uses_penalties(self) -> bool:
        return (self.presence_penalty != 0 or self.frequency_penalty != 0
                or self.repetition_penalty != 1)


def _check(ok: bool, name: str, value, rule: str):
    if not ok:
        raise ValueError(f"{name} {rule}, got {value!r}")
