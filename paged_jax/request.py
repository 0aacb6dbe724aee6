"""A request's host-side state, and the vLLM-shaped outputs handed back to users."""
from __future__ import annotations

import dataclasses
import enum
import time

from paged_jax.sampling_params import SamplingParams


# The input id of a pending token (Request.num_pending): never a vocabulary id.
PLACEHOLDER = -1


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"  # preempted by swap: its computed blocks are in host memory
    FINISHED = "finished"


@dataclasses.dataclass(frozen=True)
class Logprob:
    logprob: float
    rank: int
    decoded_token: str | None = None


@dataclasses.dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_total_tokens: int  # prompt + at most this many tokens: max_tokens capped by max_model_len
    seed: int  # effective sampling seed: the user's, or one drawn from the engine's seed
    eos_token_ids: tuple[int, ...] = ()
    prompt: str | None = None
    arrival_time: float = dataclasses.field(default_factory=time.monotonic)
    output_token_ids: list[int] = dataclasses.field(default_factory=list)
    output_logprobs: list[dict[int, Logprob]] = dataclasses.field(default_factory=list)
    cumulative_logprob: float = 0.0
    # prompt_logprobs asked for (on the first sequence of a group only): [None] (the first
    # token has none), then one entry per prompt token as the steps computing it return
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    # Prompt positions whose next token's logprob a dispatched step computes (Scheduler.
    # dispatched): a prompt recomputed after preemption does not score them twice.
    num_prompt_scored: int = 0
    text: str = ""
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    num_cached_tokens: int | None = None  # prompt tokens the prefix cache gave at admission
    status: Status = Status.WAITING
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    # Tokens sampled by steps dispatched to the device whose results the host has not yet
    # applied (Scheduler.dispatched / update_from_output): 0 between synchronous steps, at
    # most 1 at scheduling time with asynchronous scheduling. They count in num_tokens, so
    # the scheduler plans the next step as if they were known; their ids are PLACEHOLDER
    # until they arrive (the device fills them in from the previous step's samples).
    num_pending: int = 0
    # Prefix-cache hashes of its first full blocks, kept between lookups (tokens only grow).
    block_hashes: list[bytes] = dataclasses.field(default_factory=list, repr=False)
    # Structured outputs: the sequence's llguidance matcher (structured_outputs.py), advanced
    # by every token appended; None when unconstrained.
    matcher: object = dataclasses.field(default=None, repr=False)
    # min_tokens, allowed_token_ids, bad_words (token_rules.TokenRules), or None
    rules: object = dataclasses.field(default=None, repr=False)
    # Its constant sampling columns (sampler.constant_columns builds them once)
    sampling_row: tuple | None = dataclasses.field(default=None, repr=False)
    # Its output's text, extended token by token (detokenizer.TextStream); None until first
    # asked for, False where the tokenizer's decode cannot be streamed
    text_stream: object = dataclasses.field(default=None, repr=False)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None

    @property
    def all_token_ids(self) -> list[int]:
        """The known tokens: prompt and output (pending ones not among them)."""
        return self.prompt_token_ids + self.output_token_ids

    def tokens_between(self, start: int, end: int) -> list[int]:
        """Token ids at positions start..end-1 without building the whole list (a step reads
        a few tokens of a long request); PLACEHOLDER at the positions of pending tokens."""
        p = len(self.prompt_token_ids)
        if start >= p:
            out = self.output_token_ids[start - p:end - p]
        else:
            out = self.prompt_token_ids[start:end] + self.output_token_ids[:max(0, end - p)]
        return out + [PLACEHOLDER] * (end - start - len(out))

    @property
    def needs_prompt_scores(self) -> bool:
        """Prompt logprobs asked for and not all computed yet: its prompt is computed afresh
        (no prefix-cache hit: a cached block holds K/V, not the logits)."""
        return (self.prompt_logprobs is not None
                and self.num_prompt_scored < len(self.prompt_token_ids) - 1)

    def prompt_scores(self, start: int, end: int) -> range:
        """The positions among start..end-1 (a step's tokens) whose next prompt token's
        logprob the step computes: those before the prompt's last, not already scored."""
        if self.prompt_logprobs is None:
            return range(0)
        return range(max(start, self.num_prompt_scored),
                     min(end, len(self.prompt_token_ids) - 1))

    @property
    def num_tokens(self) -> int:
        """Prompt, output and pending tokens: the length the next step extends."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_pending

    @property
    def num_known_tokens(self) -> int:
        """Prompt and output tokens the host has (num_tokens less the pending)."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED


@dataclasses.dataclass
class CompletionOutput:  # (OutputBuilder passes the fields by position: keep their order)
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass
class RequestOutput:  # (OutputBuilder passes the fields by position: keep their order)
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_preemptions: int = 0
    num_cached_tokens: int = 0  # prompt tokens whose K/V the prefix cache supplied (vLLM's)
    first_scheduled_time: float | None = None  # time.monotonic() when it left the queue
    # [None, then a {token id: Logprob} per prompt token] when prompt_logprobs was asked for
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
