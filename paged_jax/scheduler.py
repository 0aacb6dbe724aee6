"""Iteration-level (continuous) batching with preemption by recompute or swap.

Two policies. Prefill-first (vLLM V0 and the paper): every step is either a prefill of newly
admitted requests (FCFS, while sequences, the token budget and KV blocks allow) or one decode
token for every running request. Mixed (decode-first, as vLLM V1 batches): every running
request decodes, and whole prompts that fit the rest of the token budget join the same step;
a waiting prompt whose uncached part fits the budget only alone gets a prefill-first step, so
a long prompt never waits for the running requests to drain.

When a decode cannot find a block, the newest running request is preempted. By recompute
(the default): its blocks are freed and it goes back to the head of the queue, to be
recomputed from its prompt and output so far. By swap (preemption_mode="swap", the paper's
other option): its computed blocks are copied to host blocks and it waits in the swapped
queue, to be copied back and go on decoding where it stopped; when the host blocks run out it
is recomputed instead. A step that preempted admits and swaps in nothing, so a victim is not
readmitted at once; while any request is swapped out, no new prompt is admitted (the swapped
are older and come back first, as in vLLM V0). The step's copies travel in its
ScheduledBatch (swap_out, swap_in), to be made before the step runs.

With chunked prefill (chunked=True, mixed only) a prompt that does not fit the rest of a
step's token budget is admitted with the part that fits, and goes on in the following steps
(after the decodes, before swapped-out requests and new prompts) until all of it is computed;
only then does it sample. Its blocks are taken chunk by chunk, as vLLM V1 allocates them: a chunk is
cut to the blocks that are free (where V1 would preempt others), a prompt that finds none
waits, and a step in which nothing at all can run preempts the newest running request, so
that the older ones go on.

Speculative drafts (proposed by the engine, handed to schedule(); mixed policy only) come
last: they take the tokens and blocks that the decodes, chunks and admitted prompts leave
(never preempting anyone), cut short to fit; a drafting request is a row of 1 + drafts tokens
after the one-token decodes, and the batch carries the drafts each row computes.

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
from typing import Callable

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
        if batch is not None and batch.kind == "prefill":
            batch = dataclasses.replace(batch, samples=tuple(
                r.num_computed_tokens + new >= r.num_tokens
                for r, new in zip(batch.requests, batch.num_new_tokens)))
        if self._swap_out or self._swap_in:
            batch = dataclasses.replace(batch or ScheduledBatch("decode", (), ()),
                                        swap_out=tuple(self._swap_out),
                                        swap_in=tuple(self._swap_in))
        return batch

    def _schedule(self) -> ScheduledBatch | None:
        if not self.mixed:
            return (None if self.swapped else self._schedule_prefill()) or self._schedule_decode()
        head = self.waiting[0] if self.waiting and not self.swapped else None
        if (not self.chunked and head is not None and self.running
                and len(self.running) < self.max_num_seqs
                and len(self.running) + head.num_tokens - self._find_cached(head).num_tokens
                > self.max_num_batched_tokens):
            # The head prompt's uncached part fits the budget only without the decodes:
            # prefill first.
            return self._schedule_prefill() or self._schedule_decode()
        decodes, continuing, preempted = self._decode_rows()
        if preempted:  # admits nothing, and prompts part-way through wait a step
            return _decode_batch(decodes, preempted)
        budget = self.max_num_batched_tokens - len(decodes)
        # Running prompts part-way through go on first, oldest first: their chunks take
        # blocks before swapped-out requests and new prompts do.
        chunks, news, budget, starved = self._chunks(continuing, budget)
        back_decodes, back_continuing = self._swap_in_rows(budget)
        decodes += back_decodes
        budget -= len(back_decodes)
        back_chunks, back_news, budget, back_starved = self._chunks(back_continuing, budget)
        chunks += back_chunks
        news += back_news
        starved = starved or back_starved
        # (A prompt that found no block leaves none free: no new prompt is admitted either.)
        prompts, prompt_news = (self._admit(budget) if budget > 0 and not self.swapped
                                else ((), ()))
        budget -= sum(prompt_news)
        # Speculative drafts (the engine proposes them) come last: the tokens and blocks left
        # after everything else, oldest request first; a request left with none decodes
        # plainly.
        spec, spec_tokens = [], []
        for req in decodes:
            drafts = list(self._drafts.get(req.request_id, ())[:max(0, budget)])
            while drafts and not self.kv.allocate(req.request_id,
                                                  req.num_tokens + len(drafts)):
                drafts.pop()
            if drafts:
                budget -= len(drafts)
                spec.append(req)
                spec_tokens.append(tuple(drafts))
        decodes = [r for r in decodes if r not in spec]
        if not decodes and not spec and not chunks and not prompts and starved \
                and not self._swap_in:
            # Only prompts part-way through run, and none found a block: the newest gives
            # its blocks up so that the older go on (else none would ever finish).
            victim = self.running[-1]
            self._preempt(victim)
            return _decode_batch([], [victim])
        if not spec and not chunks and not prompts:
            return _decode_batch(decodes, ())
        # Rows of several new tokens each, after the one-token decodes: drafts, chunks, prompts.
        rows = tuple(decodes) + tuple(spec) + tuple(chunks) + prompts
        return ScheduledBatch("prefill", rows,
                              (1,) * len(decodes) + tuple(1 + len(d) for d in spec_tokens)
                              + tuple(news) + prompt_news, num_decodes=len(decodes),
                              spec_tokens=(((),) * len(decodes) + tuple(spec_tokens)
                                           + ((),) * (len(rows) - len(decodes) - len(spec))
                                           if spec else ()))

    def _chunks(self, reqs: list[Request], budget: int
                ) -> tuple[list[Request], list[int], int, bool]:
        """The next chunk of each prompt part-way through, in order, within the budget and
        the free blocks (a chunk is cut to the blocks it can get): the requests, their
        tokens, the budget left, and whether any found no block at all."""
        chunks: list[Request] = []
        news: list[int] = []
        starved = False
        for req in reqs:
            if budget <= 0:
                break
            start = req.num_computed_tokens
            new = min(req.num_tokens - start, budget,
                      self.kv.room(req.request_id) - start)
            if new <= 0:
                starved = True
                continue
            if not self.kv.allocate(req.request_id, start + new):
                raise AssertionError("a chunk cut to the free blocks did not fit")
            self._cache(req, start + new)
            chunks.append(req)
            news.append(new)
            budget -= new
        return chunks, news, budget, starved

    def _find_cached(self, req: Request) -> PrefixHit:
        """The cached blocks the request may start from: none while its prompt logprobs
        are still to be computed (they need the logits of every prompt position)."""
        if req.needs_prompt_scores:
            return PrefixHit(block_size=self.kv.block_size)
        return self.kv.find_cached(req.all_token_ids, req.block_hashes)

    def _schedule_prefill(self) -> ScheduledBatch | None:
        batch, news = self._admit(self.max_num_batched_tokens)
        if not batch:
            return None
        return ScheduledBatch("prefill", batch, news)

    def _admit(self, budget: int) -> tuple[tuple[Request, ...], tuple[int, ...]]:
        """Waiting requests, FCFS, while sequences, the token budget and KV blocks allow, and
        the tokens each computes now: all but its cache hit, or with chunked prefill, for the
        last one admitted, what is left of the budget or of the free blocks (a first chunk,
        holding blocks for that chunk only)."""
        batch: list[Request] = []
        news: list[int] = []
        tokens = 0
        while self.waiting and len(self.running) + len(batch) < self.max_num_seqs:
            req = self.waiting[0]
            hit = self._find_cached(req)
            new = req.num_tokens - hit.num_tokens
            if tokens + new > budget:
                if not self.chunked or tokens >= budget:
                    break
                new = budget - tokens  # a first chunk; the rest in later steps
            if self.chunked:  # blocks for this chunk only, cut to those free
                new = min(new, self.kv.room(req.request_id, hit) - hit.num_tokens)
                if new <= 0 or not self.kv.allocate(req.request_id, hit.num_tokens + new, hit):
                    break
            elif not self.kv.allocate(req.request_id, max(req.num_tokens, self.reservation(req)),
                                      hit):
                break
            self._cache(req, hit.num_tokens + new)
            self.kv.record_admission(req.num_tokens, hit)
            self.num_prompt_tokens += req.num_tokens
            self.waiting.popleft()
            req.status = Status.RUNNING
            req.num_computed_tokens = hit.num_tokens
            if req.num_cached_tokens is None:
                req.num_cached_tokens = hit.num_tokens
            batch.append(req)
            news.append(new)
            tokens += new
        self.running.extend(batch)
        return tuple(batch), tuple(news)

    def _schedule_decode(self) -> ScheduledBatch | None:
        decodes, continuing, preempted = self._decode_rows()
        if not preempted:
            back, back_continuing = self._swap_in_rows(self.max_num_batched_tokens - len(decodes))
            decodes += back
            continuing += back_continuing
        assert not continuing, "prompts part-way through exist only with chunked prefill"
        return _decode_batch(decodes, preempted)

    def _swap_in_rows(self, budget: int) -> tuple[list[Request], list[Request]]:
        """Swapped-out requests brought back, oldest first, while sequences, the budget (a
        token each) and device blocks allow: those that decode, and those part-way through a
        chunked prefill (they compute their next chunk within the caller's budget)."""
        decodes: list[Request] = []
        continuing: list[Request] = []
        while (self.swapped and len(self.running) < self.max_num_seqs
               and len(decodes) + len(continuing) < budget):
            req = self.swapped[0]
            partial = req.num_tokens - req.num_computed_tokens > 1
            if partial and req.num_computed_tokens >= self.kv.pool.num_free * self.kv.block_size:
                break  # its blocks would fit but no chunk after them: it stays out for now
            # A prompt part-way through takes back its computed blocks; its chunk, more.
            copies = self.kv.swap_in(req.request_id,
                                     req.num_computed_tokens if partial else req.num_tokens)
            if copies is None:
                break
            self._swap_in += copies
            self.swapped.popleft()
            req.status = Status.RUNNING
            self.running.append(req)
            if partial:
                continuing.append(req)
            else:
                self._cache(req, req.num_tokens)
                decodes.append(req)
        return decodes, continuing

    def _decode_rows(self) -> tuple[list[Request], list[Request], list[Request]]:
        """Running requests in order: those that decode (one block more if their table is
        full, preempting the newest running requests when none is free), those part-way
        through a chunked prefill (blocks for their next chunk come later, in _chunks), and
        the preempted."""
        decodes: list[Request] = []
        continuing: list[Request] = []
        preempted: list[Request] = []
        queue = list(self.running)
        while queue:
            req = queue.pop(0)
            if req.num_tokens >= req.max_total_tokens:
                continue  # its pending token is its last: it finishes when that arrives
            if req.num_tokens - req.num_computed_tokens > 1:
                continuing.append(req)  # its chunk takes its blocks (_chunks)
                continue
            while not self.kv.allocate(req.request_id, req.num_tokens):
                # The newest running request not yet scheduled in this call: the blocks that
                # scheduled requests registered (cache_blocks) are computed by this step.
                victim = queue.pop() if queue else req
                self._preempt(victim)
                preempted.append(victim)
                if victim is req:
                    break
            else:
                self._cache(req, req.num_tokens)
                decodes.append(req)
        return decodes, continuing, preempted

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
            scored = req.prompt_scores(req.num_computed_tokens, req.num_computed_tokens + new)
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
        for req in batch.requests:  # after drafts are settled: computed tokens only grow now
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


def _decode_batch(decodes, preempted) -> ScheduledBatch | None:
    if not decodes:
        return None if not preempted else ScheduledBatch("decode", (), (), tuple(preempted))
    return ScheduledBatch("decode", tuple(decodes), (1,) * len(decodes), tuple(preempted))
