"""Iteration-level (continuous) batching with preemption by recompute.

Two policies. Prefill-first (vLLM V0 and the paper): every step is either a prefill of newly
admitted requests (FCFS, while sequences, the token budget and KV blocks allow) or one decode
token for every running request. Mixed (decode-first, as vLLM V1 batches): every running
request decodes, and whole prompts that fit the rest of the token budget join the same step;
a waiting prompt whose uncached part fits the budget only alone gets a prefill-first step, so
a long prompt never waits for the running requests to drain.

When a decode cannot find a block, the newest running request is preempted: its blocks are
freed and it goes back to the head of the queue, to be recomputed from its prompt and output
so far. A step that preempted admits nothing, so a victim is not readmitted at once.

With prefix caching on (KVCacheManager(enable_caching=True)), an admitted request starts from
the cached blocks its tokens begin with, and only the rest of its tokens are computed and
counted against the budget; the full blocks a step will compute are registered as it is
scheduled, so requests sharing a prompt (n > 1, a common system prompt) share its blocks even
when admitted in the same step.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Callable

from paged_jax.kv_cache_manager import KVCacheManager
from paged_jax.request import Request, Status


@dataclasses.dataclass(frozen=True)
class ScheduledBatch:
    kind: str  # "prefill" | "decode"
    requests: tuple[Request, ...]
    num_new_tokens: tuple[int, ...]
    preempted: tuple[Request, ...] = ()
    num_decodes: int = 0  # a prefill step's leading requests that decode (mixed policy)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


def paged_reservation(req: Request) -> int:
    """Tokens to hold KV for at admission: exactly what is computed now (allocate on demand)."""
    return req.num_tokens


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int,
                 reservation: Callable[[Request], int] = paged_reservation,
                 mixed: bool = False):
        self.kv = kv
        self.mixed = mixed
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.reservation = reservation
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch | None:
        if not self.mixed:
            return self._schedule_prefill() or self._schedule_decode()
        head = self.waiting[0] if self.waiting else None
        if (head is not None and self.running and len(self.running) < self.max_num_seqs
                and len(self.running) + head.num_tokens
                - self.kv.find_cached(head.all_token_ids).num_tokens
                > self.max_num_batched_tokens):
            # The head prompt's uncached part fits the budget only without the decodes:
            # prefill first.
            return self._schedule_prefill() or self._schedule_decode()
        decode = self._schedule_decode()
        if decode is not None and decode.preempted:
            return decode
        decodes = decode.requests if decode is not None else ()
        prompts = self._admit(self.max_num_batched_tokens - len(decodes))
        if not prompts:
            return decode
        return ScheduledBatch("prefill", decodes + prompts,
                              (1,) * len(decodes) + _uncomputed(prompts),
                              num_decodes=len(decodes))

    def _schedule_prefill(self) -> ScheduledBatch | None:
        batch = self._admit(self.max_num_batched_tokens)
        if not batch:
            return None
        return ScheduledBatch("prefill", batch, _uncomputed(batch))

    def _admit(self, budget: int) -> tuple[Request, ...]:
        """Waiting requests, FCFS, while sequences, the token budget and KV blocks allow."""
        batch: list[Request] = []
        tokens = 0
        while self.waiting and len(self.running) + len(batch) < self.max_num_seqs:
            req = self.waiting[0]
            hit = self.kv.find_cached(req.all_token_ids)
            new = req.num_tokens - hit.num_tokens
            if tokens + new > budget:
                break
            if not self.kv.allocate(req.request_id, max(req.num_tokens, self.reservation(req)),
                                    hit):
                break
            self.kv.cache_blocks(req.request_id, req.all_token_ids)
            self.kv.record_admission(req.num_tokens, hit)
            self.waiting.popleft()
            req.status = Status.RUNNING
            req.num_computed_tokens = hit.num_tokens
            if req.num_cached_tokens is None:
                req.num_cached_tokens = hit.num_tokens
            batch.append(req)
            tokens += new
        self.running.extend(batch)
        return tuple(batch)

    def _schedule_decode(self) -> ScheduledBatch | None:
        scheduled: list[Request] = []
        preempted: list[Request] = []
        queue = list(self.running)
        while queue:
            req = queue.pop(0)
            while not self.kv.allocate(req.request_id, req.num_tokens):
                # The newest running request not yet scheduled in this call: the blocks that
                # scheduled requests registered (cache_blocks) are computed by this step.
                victim = queue.pop() if queue else req
                self._preempt(victim)
                preempted.append(victim)
                if victim is req:
                    break
            else:
                self.kv.cache_blocks(req.request_id, req.all_token_ids)
                scheduled.append(req)
        if not scheduled:
            return None if not preempted else ScheduledBatch("decode", (), (), tuple(preempted))
        return ScheduledBatch("decode", tuple(scheduled), (1,) * len(scheduled),
                              tuple(preempted))

    def _preempt(self, req: Request) -> None:
        self.kv.free(req.request_id)
        self.running.remove(req)
        req.status = Status.WAITING
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def finish(self, req: Request) -> None:
        """Remove a finished or aborted request wherever it is and free its blocks."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.kv.free(req.request_id)
        req.status = Status.FINISHED


def _uncomputed(reqs) -> tuple[int, ...]:
    """New tokens of admitted prompts: all but those whose K/V came from the prefix cache."""
    return tuple(r.num_tokens - r.num_computed_tokens for r in reqs)
