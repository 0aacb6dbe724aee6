"""Iteration-level (continuous) batching with preemption by recompute or swap: one token-budget
loop, as vLLM V1 schedules.

Every request has a count of tokens whose K/V are computed (num_computed_tokens) and a count
of tokens (num_tokens: prompt, output, and a pending sampled token). A step catches requests
up, in priority order, within one token budget (max_num_batched_tokens) and the KV blocks:
the running first, oldest first; then requests swapped out, oldest first; then new prompts,
FCFS. A decode is a request one token behind; a prompt after its prefix-cache hit, or part-way
through a chunked prefill, is many tokens behind. All are one case (Scheduler._grant): as many
tokens as the budget and the free blocks allow. Only admitting a prompt without chunked
prefill is all or nothing (and there a reservation policy, the Orca baselines', may hold more
blocks than the prompt needs). Speculative drafts (proposed by the engine, handed to
schedule()) are the same grant past a caught-up request's token count, made last, from the
tokens and blocks the other rows left: a guess never displaces a token known to be needed.

A running request that finds no block for even one token preempts the newest running request
(itself, if it is the newest). By recompute (the default): its blocks are freed and it goes
back to the head of the queue, to be recomputed from its prompt and output so far. By swap
(swap=True, the paper's other option): its computed blocks are copied to host blocks and it
waits in the swapped queue, to come back where it stopped; when the host blocks run out it is
recomputed instead. A step that preempted swaps in and admits nothing, so a victim is not
readmitted at once; while any request is swapped out no new prompt is admitted (the swapped
are older). The step's copies travel in its ScheduledBatch (swap_out, swap_in), to be made
before the step runs.

Policies over the loop: mixed=False gives the paper's (vLLM V0's) steps, prompts alone while
any can be admitted, else the running alone; with mixed batches (unchunked) a head prompt
that fits the budget only without the running requests' decodes gets such a step too, so a
long prompt never waits for the running to drain. chunked=True lets a prompt be admitted with
the part of it that fits and go on in later steps, taking its blocks chunk by chunk (a chunk
is cut to the free blocks, where V1 would preempt others). The batch lays its rows out for
the device: one-token decodes of running requests first, then every other row in the order
granted.

The scheduler owns request state. After schedule(), dispatched(batch) records that the step
went to the device: each request's computed tokens advance by what the step computes, and a
row that samples gets a pending token (Request.num_pending). update_from_output(batch,
sampled) applies the step's sampled tokens when they reach the host: drafts kept or
rejected, tokens appended, stop checks (StopChecker), finishing and freeing. Between the two
the next step may be scheduled (asynchronous scheduling): pending tokens count as tokens,
and a request that will have reached its length limit is not scheduled again.

With prefix caching on (KVCacheManager(enable_caching=True)), an admitted request starts from
the cached blocks its tokens begin with, and only the rest of its tokens are computed and
counted against the budget; the full blocks a step will compute are registered as it is
scheduled, so requests sharing a prompt (n > 1, a common system prompt) share its blocks even
when admitted in the same step.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Callable, NamedTuple

from paged_jax.kv_cache_manager import KVCacheManager
from paged_jax.prefix_cache import PrefixHit
from paged_jax.request import Request, Status
from paged_jax.spec_decode import accepted_prefix
from paged_jax.stop import StopChecker


@dataclasses.dataclass(frozen=True)
class ScheduledBatch:
    kind: str  # "prefill" | "decode"
    requests: tuple[Request, ...]
    num_new_tokens: tuple[int, ...]
    preempted: tuple[Request, ...] = ()
    num_decodes: int = 0  # a prefill step's leading requests that decode (mixed policy)
    # Block copies to make before the step runs: (device, host) pairs of preempted requests
    # swapped out, then (host, device) pairs of requests swapped back in.
    swap_out: tuple[tuple[int, int], ...] = ()
    swap_in: tuple[tuple[int, int], ...] = ()
    # Per request, the speculative drafts its row computes after its last token (() for
    # none; an empty tuple for the whole batch when no request drafts).
    spec_tokens: tuple[tuple[int, ...], ...] = ()
    # Per request, whether its row samples: it computes the last of its tokens (a prompt's
    # chunk before the last does not). () for a decode step: every row samples.
    samples: tuple[bool, ...] = ()

    @property
    def sampling(self) -> tuple[bool, ...]:
        """samples, one entry per request."""
        return self.samples or (True,) * len(self.requests)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def drafts(self) -> tuple[tuple[int, ...], ...]:
        """spec_tokens, one entry per request."""
        return self.spec_tokens or ((),) * len(self.requests)


def paged_reservation(req: Request) -> int:
    """Tokens to hold KV for at admission: exactly what is computed now (allocate on demand)."""
    return req.num_tokens


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int,
                 reservation: Callable[[Request], int] = paged_reservation,
                 mixed: bool = False, chunked: bool = False, swap: bool = False,
                 stop: StopChecker | None = None):
        """swap: preempt by swapping to kv's host blocks (recompute when they run out).
        stop: decides when a request finishes (default: tokens and length only)."""
        if chunked and not mixed:
            raise ValueError("chunked prefill needs mixed batches (decodes and prompt chunks "
                             "in one step)")
        if chunked and reservation is not paged_reservation:
            raise ValueError("chunked prefill takes blocks chunk by chunk; a reservation "
                             "policy needs whole prompts admitted at once")
        if swap and kv.cpu_pool is None:
            raise ValueError("preemption by swap needs host blocks (KVCacheManager "
                             "num_cpu_blocks > 0)")
        self.swap = swap
        self.stop = stop or StopChecker()
        self.kv = kv
        self.mixed = mixed
        self.chunked = chunked
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.reservation = reservation
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.swapped: collections.deque[Request] = collections.deque()  # oldest first
        self.num_preemptions = 0  # by recompute or swap
        self.num_swapped_out = 0  # preemptions by swap
        self._swap_out: list[tuple[int, int]] = []  # this schedule()'s copies
        self._swap_in: list[tuple[int, int]] = []
        self.num_prompt_tokens = 0  # tokens of admitted prompts, cached ones included
        self._drafts: dict[str, list[int]] = {}  # this schedule()'s proposals

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def schedule(self, drafts: dict[str, list[int]] | None = None) -> ScheduledBatch | None:
        """The next step. drafts: request id -> speculative tokens proposed for it (mixed
        policy), taken as far as the budget and blocks allow."""
        self._swap_out, self._swap_in = [], []
        self._drafts = drafts or {}
        batch = self._schedule()
        if self._swap_out or self._swap_in:
            batch = dataclasses.replace(batch or ScheduledBatch("decode", (), ()),
                                        swap_out=tuple(self._swap_out),
                                        swap_in=tuple(self._swap_in))
        return batch

    def _schedule(self) -> ScheduledBatch | None:
        if self._prefill_first():
            # New prompts alone while any can be admitted, else a step of the running (and
            # swapped-in) requests.
            return self._fill(run=False, admit=True) or self._fill(run=True, admit=False)
        return self._fill(run=True, admit=True)

    def _prefill_first(self) -> bool:
        """The policy: whether this step admits prompts alone. Always with mixed=False (the
        paper's, vLLM V0's steps). With mixed batches, unchunked, when the head prompt's
        uncached part fits the budget only without the running requests' decodes: it gets a
        step of its own, so a long prompt never waits for the running to drain."""
        if not self.mixed:
            return True
        if self.chunked or not self.waiting or self.swapped or not self.running:
            return False
        head = self.waiting[0]
        return (len(self.running) < self.max_num_seqs
                and len(self.running) + head.num_tokens - self._find_cached(head).num_tokens
                > self.max_num_batched_tokens)

    def _fill(self, run: bool, admit: bool) -> ScheduledBatch | None:
        """The one budget loop. Every request in turn catches its computed tokens up to its
        token count as far as the step's token budget and the KV blocks allow: the running
        (run) oldest first, then the swapped-out brought back oldest first, then new prompts
        FCFS (admit); drafts last, from what is left. A decode, a prompt's next chunk, a
        prompt after its prefix-cache hit and a row's drafts are one case (_grant); only a
        new prompt without chunked prefill is all or nothing. A running request that finds no
        block for even one token preempts the newest running one (itself, if it is the
        newest); a step that preempted swaps in and admits nothing, and no prompt is
        admitted while any request is swapped out (they are older)."""
        step = _Step(self.max_num_batched_tokens)
        if run:
            queue = collections.deque(self.running)
            while queue and step.budget > 0:
                req = queue.popleft()
                num_tokens, start = req.num_tokens, req.num_computed_tokens
                if num_tokens >= req.max_total_tokens:
                    continue  # its pending token is its last: it finishes when that arrives
                if num_tokens - start == 1 and self.kv.holds(req.request_id, start + 1):
                    # (most rows of most steps: a decode whose table has a slot for its
                    # token, which none of _grant's cuts can apply to)
                    self._cache(req, start + 1)
                    step.add(req, 1, 1)
                    continue
                while not self._catch_up(req, step):
                    # The newest running request not yet scheduled: the blocks the scheduled
                    # ones registered (cache_blocks) are computed by this step.
                    victim = queue.pop() if queue else req
                    self._preempt(victim)
                    step.preempted.append(victim)
                    if victim is req:
                        break
            if not step.preempted:
                self._swap_in_rows(step)
        if admit and not step.preempted and not self.swapped:
            self._admit_rows(step)
        self._add_drafts(step)
        return step.batch()

    def _catch_up(self, req: Request, step: _Step) -> bool:
        """Grants a running request its row: what is left of its tokens (one for a decode, a
        chunk of a prompt part-way through), cut to the budget and the free blocks. False if
        not a block is free for even one token."""
        start = req.num_computed_tokens
        left = req.num_tokens - start
        new = self._grant(req, start, left, step.budget)
        if new:
            step.add(req, new, left)
        return new > 0

    def _add_drafts(self, step: _Step) -> None:
        """Speculative drafts extend the rows of requests that caught up, oldest first, with
        the tokens and blocks every other row left: a guess never takes a block that a
        token known to be needed would have to preempt someone for. A request left with
        none decodes plainly."""
        for i, row in enumerate(step.rows):
            drafts = self._drafts.get(row.request.request_id)
            if not drafts or step.budget <= 0 or not row.samples:
                continue
            more = self._grant(row.request, row.request.num_computed_tokens + row.new,
                               len(drafts), step.budget)
            if more:
                step.rows[i] = row._replace(new=row.new + more, drafts=tuple(drafts[:more]))
                step.budget -= more

    def _grant(self, req: Request, start: int, want: int, budget: int,
               hit: PrefixHit | None = None, whole: bool = False) -> int:
        """Blocks for the request to compute up to `want` more tokens from position `start`
        (a new table from its prefix-cache hit, if given), cut to the budget and the free
        blocks; whole: all of them or none (an unchunked prompt, holding its reservation).
        Registers the full blocks the step computes; returns the tokens granted."""
        new = min(want, budget)
        if new <= 0 or (whole and new < want):
            return 0
        reserve = self.reservation(req) if whole else 0
        if not self.kv.allocate(req.request_id, max(start + new, reserve), hit):
            if whole or new == 1:
                return 0
            new = min(new, self.kv.room(req.request_id, hit) - start)
            if new <= 0:
                return 0
            if not self.kv.allocate(req.request_id, start + new, hit):
                raise AssertionError("tokens cut to the free blocks did not fit")
        self._cache(req, start + new)
        return new

    def _find_cached(self, req: Request) -> PrefixHit:
        """The cached blocks the request may start from: none while its prompt logprobs
        are still to be computed (they need the logits of every prompt position)."""
        if req.needs_prompt_scores:
            return PrefixHit(block_size=self.kv.block_size)
        return self.kv.find_cached(req.all_token_ids, req.block_hashes)

    def _swap_in_rows(self, step: _Step) -> None:
        """Swapped-out requests brought back, oldest first, while sequences, the budget and
        device blocks allow: a decode takes back its blocks and one more if its table is
        full, a prompt part-way through its computed blocks and then its next chunk."""
        while self.swapped and len(self.running) < self.max_num_seqs and step.budget > 0:
            req = self.swapped[0]
            partial = req.num_tokens - req.num_computed_tokens > 1
            if partial and req.num_computed_tokens >= self.kv.pool.num_free * self.kv.block_size:
                break  # its blocks would fit but no chunk after them: it stays out for now
            copies = self.kv.swap_in(req.request_id,
                                     req.num_computed_tokens if partial else req.num_tokens)
            if copies is None:
                break
            self._swap_in += copies
            self.swapped.popleft()
            req.status = Status.RUNNING
            self.running.append(req)
            if not self._catch_up(req, step):
                raise AssertionError("a request swapped back in found no room for its row")

    def _admit_rows(self, step: _Step) -> None:
        """Waiting requests, FCFS, while sequences, the budget and KV blocks allow: each
        computes all but its cache hit, or with chunked prefill what fits (a first chunk,
        holding blocks for that chunk only). The first that does not fit stops admission."""
        while self.waiting and len(self.running) < self.max_num_seqs and step.budget > 0:
            req = self.waiting[0]
            hit = self._find_cached(req)
            new = self._grant(req, hit.num_tokens, req.num_tokens - hit.num_tokens, step.budget,
                              hit, whole=not self.chunked)
            if not new:
                break
            self.kv.record_admission(req.num_tokens, hit)
            self.num_prompt_tokens += req.num_tokens
            self.waiting.popleft()
            req.status = Status.RUNNING
            req.num_computed_tokens = hit.num_tokens
            if req.num_cached_tokens is None:
                req.num_cached_tokens = hit.num_tokens
            self.running.append(req)
            step.add(req, new, req.num_tokens - hit.num_tokens, admitted=True)

    def _cache(self, req: Request, num_tokens: int) -> None:
        """Registers the full blocks among the request's first num_tokens tokens (the prefix
        cache), building its token list only in the steps that fill a block. A block ending in
        a pending token waits until that token is known (a later step registers it)."""
        num_tokens = min(num_tokens, req.num_known_tokens)
        if self.kv.new_full_blocks(req.request_id, num_tokens):
            self.kv.cache_blocks(req.request_id, req.tokens_between(0, num_tokens))

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        req.num_preemptions += 1
        self.num_preemptions += 1
        # A block several victims share (prefix caching) is copied out once a step.
        copies = (self.kv.swap_out(req.request_id, req.num_computed_tokens,
                                   dict(self._swap_out)) if self.swap else None)
        if copies is not None:
            self._swap_out += copies
            req.status = Status.SWAPPED
            self.num_swapped_out += 1
            self.swapped.appendleft(req)  # victims go newest first: the oldest stays in front
            return
        self.kv.free(req.request_id)
        req.status = Status.WAITING
        req.num_computed_tokens = 0
        self.waiting.appendleft(req)

    def dispatched(self, batch: ScheduledBatch) -> None:
        """The batch went to the device: each request's computed tokens advance by what the
        step computes (its drafts included), and each row that samples (one whose prompt is
        complete by this step) gets a pending token."""
        for req, new, samples in zip(batch.requests, batch.num_new_tokens, batch.sampling):
            if req.prompt_logprobs is not None:
                scored = req.prompt_scores(req.num_computed_tokens,
                                           req.num_computed_tokens + new)
                if scored:
                    req.num_prompt_scored = scored.stop
            req.num_computed_tokens += new
            req.num_pending += samples

    def update_from_output(self, batch: ScheduledBatch, sampled: list[list[int]]
                           ) -> list[tuple[Request, int]]:
        """Applies a dispatched step's results. sampled: per request of the batch, the tokens
        sampled at its rows (one, or with drafts one per draft and one more). Returns, for
        every request that sampled, (the request, how many tokens were appended to it): the
        drafts kept up to the first one replaced, then that replacement or the bonus token,
        cut at the token that finished it. Requests finished meanwhile (aborted, or stopped
        by the step before) are passed over: their rows were wasted."""
        updated = []
        for req, drafts, tokens, samples in zip(batch.requests, batch.drafts, sampled,
                                                batch.sampling):
            if req.finished or not samples:
                continue  # finished meanwhile, or a chunk of a prompt (its sample dropped)
            req.num_pending -= 1
            if not drafts:  # (most rows: one token)
                req.output_token_ids.append(int(tokens[0]))
                if self.stop.check(req):
                    self.finish(req)
                updated.append((req, 1))
                continue
            kept = accepted_prefix(list(drafts), [int(t) for t in tokens])
            # The K/V of rejected drafts are stale; the last kept token's are computed by the
            # next step.
            req.num_computed_tokens -= len(drafts) + 1 - len(kept)
            n = 0
            for token in kept:
                req.output_token_ids.append(token)
                n += 1
                if self.stop.check(req):
                    self.finish(req)
                    break
            updated.append((req, n))
        if self.kv.sliding_window is not None:
            for req in batch.requests:  # after drafts are settled: computed tokens only grow
                if not req.finished:
                    self.kv.release_outside_window(req.request_id, req.num_computed_tokens)
        return updated

    def finish(self, req: Request) -> None:
        """Remove a finished or aborted request wherever it is and free its blocks."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        elif req in self.swapped:
            self.swapped.remove(req)
        self.kv.free(req.request_id)
        req.status = Status.FINISHED
        req.num_pending = 0  # a step in flight may still hold a row for it: wasted


class _Row(NamedTuple):
    request: Request
    new: int  # tokens it computes, drafts included
    drafts: tuple[int, ...]
    admitted: bool  # admitted by this step
    samples: bool  # its last token is among them

    @property
    def decode(self) -> bool:
        """A one-token row of a request already running, which samples."""
        return self.new == 1 and self.samples and not self.admitted


@dataclasses.dataclass
class _Step:
    """A step being filled by Scheduler._fill: its rows in the order they were granted."""
    budget: int  # tokens left
    rows: list[_Row] = dataclasses.field(default_factory=list)
    preempted: list = dataclasses.field(default_factory=list)

    def add(self, req: Request, new: int, left: int, admitted: bool = False):
        """A row of `new` of the request's `left` tokens still to compute."""
        self.rows.append(_Row(req, new, (), admitted, new >= left))
        self.budget -= new

    def batch(self) -> ScheduledBatch | None:
        """The rows as the device takes them: one-token decodes of requests already running
        first (the decode attention's rows), then every other row in the order granted."""
        preempted = tuple(self.preempted)
        if not self.rows:
            return ScheduledBatch("decode", (), (), preempted) if preempted else None
        decodes = [row for row in self.rows if row.decode]
        if len(decodes) == len(self.rows):  # (most steps)
            return ScheduledBatch("decode", tuple(row.request for row in decodes),
                                  (1,) * len(decodes), preempted)
        rows = decodes + [row for row in self.rows if not row.decode]
        drafts = tuple(row.drafts for row in rows)
        return ScheduledBatch("prefill", tuple(row.request for row in rows),
                              tuple(row.new for row in rows), preempted,
                              num_decodes=len(decodes),
                              spec_tokens=drafts if any(drafts) else (),
                              samples=tuple(row.samples for row in rows))
