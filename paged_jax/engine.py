"""LLMEngine: requests in, one scheduled step at a time, RequestOutputs back.

The host side (scheduler, block tables, stop checks, detokenization) is plain Python; the
device sees one padded StepInputs per step through the ModelRunner.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import operator
import random
import threading
import time
from typing import Iterable

import jax

from paged_jax import kv_cache, multihost, sampler, sharding, spec_decode, step_inputs, swap
from paged_jax.config import EngineConfig
from paged_jax.generation_defaults import load_sampling_defaults
from paged_jax.intmath import cdiv
from paged_jax.kv_cache_manager import KVCacheManager, KVUsage
from paged_jax.model_runner import ModelRunner
from paged_jax.models.loader import LoadedModel, load_model, shard_model
from paged_jax.outputs import OutputBuilder
from paged_jax.plan import (check_options, check_quantization, make_plan, resolve_dtype,
                            warn_half_on_cpu)
from paged_jax.request import Request, RequestOutput
from paged_jax.sampling_params import SamplingParams
from paged_jax.scheduler import ScheduledBatch, Scheduler
from paged_jax.stop import StopChecker
from paged_jax.structured_outputs import GrammarCompiler
from paged_jax.token_rules import TokenRules, bad_word_ids
from paged_jax.snapshot import EngineSnapshot, RequestView

log = logging.getLogger(__name__)
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"  # the embedded model (config.model None)
_computed = operator.attrgetter("num_computed_tokens")


class StepError(RuntimeError):
    """A step failed while it was built or run. The requests it held (request_ids: the ids
    add_request was given) are finished with finish_reason "error" and their blocks freed;
    every other request is untouched and the engine goes on with the next step()."""

    def __init__(self, request_ids: list[str], cause: BaseException):
        super().__init__(f"the step failed ({type(cause).__name__}: {cause}); it held "
                         f"{len(request_ids)} request(s)")
        self.request_ids = request_ids
        self.cause = cause


class EngineBrokenError(RuntimeError):
    """The KV cache was lost in a failed step (donated to a computation that did not return
    it): no request can go on, and the engine must be rebuilt."""


@dataclasses.dataclass
class EngineStats:
    prompt_tokens: int = 0
    generation_tokens: int = 0
    num_steps: int = 0
    batched_tokens: int = 0  # tokens the steps computed (prompt chunks, decodes, drafts)
    # Seconds spent in each phase of step(), summed: schedule (drafts and scheduling), build
    # (the step's padded arrays), device (dispatch, run, and the wait for the sampled
    # tokens), update (applying them: stop checks, detokenizing, outputs).
    step_seconds: dict = dataclasses.field(
        default_factory=lambda: dict.fromkeys(("schedule", "build", "device", "update"), 0.0))
    spec_draft_tokens: int = 0  # speculative tokens computed ...
    spec_accepted_tokens: int = 0  # ... and kept
    finished: dict = dataclasses.field(default_factory=dict)  # finish reason -> count


@dataclasses.dataclass(frozen=True)
class _InFlight:
    """A step dispatched to the device whose results the host has not yet applied."""
    batch: ScheduledBatch
    inputs: step_inputs.StepInputs
    result: object  # the runner's device-side results
    logprobs: bool  # whether any row's logprobs are wanted (fetched with its tokens)

    @property
    def last_rows(self) -> dict[str, int]:
        """Request id -> the sampled row of its last token: where the next step finds the
        token its pending position holds."""
        out, row = {}, 0
        for req, drafts in zip(self.batch.requests, self.inputs.drafts):
            row += len(drafts) + 1
            out[req.request_id] = row - 1
        return out


class LLMEngine:
    def __init__(self, config: EngineConfig, model: LoadedModel | None = None):
        check_options(config)  # before joining other processes or loading anything
        self.multihost, self.mesh, dtype = setup_devices(config)
        on_cpu = jax.default_backend() == "cpu"
        tp = config.tensor_parallel_size
        check_quantization(config.quantization, jax.default_backend(),
                           getattr(jax.devices()[0], "compute_capability", None))
        if model is None:
            model = load_model(config.model, dtype=dtype, cache_dir=config.cache_dir,
                               mesh=self.mesh, revision=config.revision,
                               tokenizer=config.tokenizer,
                               tokenizer_revision=config.tokenizer_revision,
                               quantization=config.quantization)
        else:
            if (config.tokenizer is not None or config.tokenizer_revision is not None
                    or config.quantization is not None):
                raise ValueError("tokenizer / tokenizer_revision / quantization apply when the "
                                 "engine loads the model; with a model handed in, pass them to "
                                 "load_model")
            if self.mesh is not None:
                model = shard_model(model, self.mesh)
        if config.calculate_kv_scales:
            from paged_jax.kv_scales import with_kv_scales

            model = with_kv_scales(model)
        self.model = model
        # What the server calls the model (unless --served-model-name) and where it lies.
        self.model_name = config.model or DEFAULT_MODEL_NAME
        self.model_path = model.path
        mcfg = self.model.config
        # {SamplingParams field: value} a request without its own params gets (the server
        # fills each unset field from it)
        self.sampling_defaults = load_sampling_defaults(model.path, config.generation_config)
        self.plan = plan = make_plan(config, mcfg, jax.default_backend(), bool(self.multihost))
        if on_cpu and mcfg.dtype != "float32":
            warn_half_on_cpu(mcfg.dtype)
        run_cfg = mcfg.for_max_model_len(plan.max_model_len)  # LongRoPE's factor set
        if run_cfg != mcfg:
            self.model = model = model.with_config(run_cfg)
            mcfg = run_cfg
        self.backend = plan.backend
        self.max_model_len = plan.max_model_len
        self.max_num_batched_tokens = plan.max_num_batched_tokens
        num_blocks, num_cpu_blocks, swapping = (plan.num_kv_blocks, plan.num_cpu_blocks,
                                                plan.swapping)
        self.config = config
        self.tokenizer = self.model.tokenizer
        self.kv = KVCacheManager(num_blocks, config.block_size,
                                 enable_caching=config.enable_prefix_caching,
                                 num_cpu_blocks=num_cpu_blocks,
                                 sliding_window=mcfg.kv_window)
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, self.max_num_batched_tokens,
                                   mixed=config.mixed_batches,
                                   chunked=config.enable_chunked_prefill, swap=swapping,
                                   stop=StopChecker(self.tokenizer))
        self.buckets = step_inputs.Buckets.make(config.max_num_seqs, self.max_num_batched_tokens,
                                                self.max_model_len, config.block_size,
                                                table_ladder=plan.table_ladder,
                                                mixed_steps=plan.mixed_steps,
                                                num_speculative_tokens=(
                                                    plan.num_speculative_tokens))
        cache_sharding = sharding.kv_cache_sharding(self.mesh) if self.mesh is not None else None
        caches = kv_cache.allocate(mcfg, num_blocks, config.block_size, cache_sharding,
                                   config.kv_cache_dtype)
        self.runner = ModelRunner(self.model.graphdef, self.model.params, caches,
                                  self.backend, self.max_model_len, self.buckets.max_rows,
                                  mcfg.vocab_size, self.mesh,
                                  swap.SwapSpace(num_cpu_blocks, caches) if swapping
                                  else None, config.max_logprobs)
        self._channel = None  # multi-host serving: process 0's per-step command broadcast
        # Step publishes and the stop message may come from different threads (the engine
        # loop, and the CLI's shutdown if that loop is stuck): one broadcast at a time, and
        # none after the stop.
        self._channel_lock = threading.Lock()
        self._published: list = []
        self.outputs = OutputBuilder(self.tokenizer)
        # Structured outputs' matchers, compiled per constraint (None: no tokenizer)
        self.grammars = (GrammarCompiler(self.tokenizer, mcfg.vocab_size,
                                         config.disable_any_whitespace)
                         if self.tokenizer is not None else None)
        self.stats = EngineStats()
        self._rng = random.Random(config.seed)
        self._lap_start = 0.0  # step(): when the phase being timed began
        self._groups: dict[str, list[Request]] = {}  # user request id -> its n sequences
        # Asynchronous scheduling: the step dispatched and not yet applied, the live groups
        # whose steps must run synchronously, and whether the last step overlapped.
        self._inflight: _InFlight | None = None
        self._columns = sampler.ColumnCache()  # the sampling columns kept between steps
        self._sync_groups: dict[str, str] = {}  # group id -> why
        self._overlapping = True
        self._group_of: dict[str, str] = {}  # sequence id -> user request id
        log.info("engine: %d KV blocks of %d tokens (%.1f MiB per device, kv_cache_dtype "
                 "%s), backend %s, max_model_len %d, tensor_parallel_size %d, preemption by "
                 "%s%s%s", num_blocks, config.block_size,
                 num_blocks * kv_cache.block_bytes(mcfg, config.block_size,
                                                   config.kv_cache_dtype) / tp / 2**20,
                 config.kv_cache_dtype,
                 self.backend, self.max_model_len, tp, config.preemption_mode,
                 f" ({num_cpu_blocks} host blocks)" if swapping else "",
                 ", asynchronous scheduling" if plan.async_scheduling else "")
        if config.precompile:
            start = time.perf_counter()
            self.runner.precompile(self.buckets)
            log.info("precompiled %d step variants in %.1fs", self.runner.num_compiled,
                     time.perf_counter() - start)

    # ---- requests -------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt, params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> None:
        """prompt: a string, a list of token ids, or {"prompt": ...} / {"prompt_token_ids": ...}.
        Raises ValueError for a request that can never run; other requests are untouched."""
        self.add_requests([(request_id, prompt, params)], arrival_time)

    def add_requests(self, requests: list[tuple[str, object, SamplingParams | None]],
                     arrival_time: float | None = None) -> None:
        """(request id, prompt, params) each: all are added, or, if any can never run (a
        ValueError naming why), none is, so a refused batch leaves nothing queued."""
        ids = [rid for rid, _, _ in requests]
        if len(set(ids)) < len(ids):
            raise ValueError(f"request ids {ids} repeat within the batch")
        checked = []
        for rid, prompt, params in requests:
            params = params or self.default_sampling_params()
            checked.append((rid, prompt, params, *self.check_request(prompt, params, rid)))
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        for request_id, prompt, params, text, ids in checked:
            limit = self.max_model_len - len(ids)
            max_total = len(ids) + min(params.max_tokens or limit, limit)
            group = []
            so = params.structured_outputs
            for i in range(params.n):
                seed = (params.seed + i if params.seed is not None
                        else self._rng.getrandbits(63))
                rid = request_id if params.n == 1 else f"{i}_{request_id}"
                group.append(Request(rid, list(ids), params, max_total, seed,
                                     self.model.eos_token_ids, text, arrival,
                                     matcher=self.grammars.new_matcher(so) if so else None,
                                     rules=TokenRules.for_request(
                                         params, self.model.eos_token_ids,
                                         self.model.config.vocab_size, self.tokenizer),
                                     # (the group's prompt: its first sequence scores it)
                                     prompt_logprobs=([None] if i == 0 and
                                                      params.prompt_logprobs is not None
                                                      else None)))
            self._groups[request_id] = group
            if params.uses_penalties:
                self._sync_groups[request_id] = ("uses penalties, which read its previous "
                                                 "token on the host")
            elif so is not None or params.uses_token_rules:
                self._sync_groups[request_id] = ("has structured outputs or token rules, "
                                                 "whose next mask needs its previous token")
            for req in group:
                self._group_of[req.request_id] = request_id
                self.scheduler.add(req)
            if self._channel is not None:
                self._published.append(("add", request_id, prompt, params, arrival))

    @property
    def stream_text(self) -> bool:
        """Whether every output carries its text so far (a streaming server), or only
        finished ones (offline generation: decoding each step would be wasted)."""
        return self.outputs.text_every_step

    @stream_text.setter
    def stream_text(self, value: bool) -> None:
        self.outputs.text_every_step = value

    def default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the model's generation-config defaults (vLLM's
        get_default_sampling_params): what a request without its own params samples with."""
        return SamplingParams(**self.sampling_defaults)

    def check_request(self, prompt, params: SamplingParams,
                      request_id: str | None = None) -> tuple[str | None, list[int]]:
        """What add_request checks, without adding: raises ValueError for a request that can
        never run. Returns (the prompt's text if it had one, its token ids)."""
        if request_id is not None and request_id in self._groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        text, ids = self.tokenize(prompt)
        ids, text = self._truncate(ids, text, params)
        self._validate(ids, params)
        return text, ids

    def _truncate(self, ids: list[int], text: str | None, params: SamplingParams):
        """truncate_prompt_tokens: the prompt's last k tokens (and their text)."""
        k = params.truncate_prompt_tokens
        if k is None:
            return ids, text
        k = self.max_model_len if k == -1 else k
        if k > self.max_model_len:
            raise ValueError(f"truncate_prompt_tokens must be at most max_model_len "
                             f"({self.max_model_len}), got {k}")
        if len(ids) <= k:
            return ids, text
        ids = ids[-k:]
        return ids, (self.tokenizer.decode(ids) if text is not None else None)

    def tokenize(self, prompt) -> tuple[str | None, list[int]]:
        """(the prompt's text if it had one, its token ids)"""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            prompt = prompt["prompt"]
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass prompt_token_ids")
            return prompt, self.tokenizer.encode(prompt)
        return None, [int(t) for t in prompt]

    def _validate(self, ids: list[int], params: SamplingParams) -> None:
        if not ids:
            raise ValueError("the prompt is empty")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this model has none")
        vocab = self.model.config.vocab_size
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            if value is not None and value > min(self.config.max_logprobs, vocab):
                raise ValueError(f"{name} must be at most max_logprobs "
                                 f"({min(self.config.max_logprobs, vocab)}), got {value}")
        for name in ("allowed_token_ids", "logit_bias"):
            bad = [t for t in getattr(params, name) or () if t >= vocab]
            if bad:
                raise ValueError(f"{name} holds {bad[0]}, outside the vocabulary [0, {vocab})")
        if params.bad_words:
            bad_word_ids(params.bad_words, self.tokenizer)  # a tokenizer is needed
        if params.structured_outputs is not None:
            if self.grammars is None:
                raise ValueError("structured outputs need a tokenizer; this model has none")
            self.grammars.template(params.structured_outputs)  # compiles it, or says why not
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")
        # A backstop behind the checks above: the request's sampling row is built as a step
        # would build it, so a value the device arrays cannot hold is refused here, alone,
        # and never fails a step that other requests share.
        probe = Request("probe", ids[-1:], params, len(ids) + 1, seed=params.seed or 0)
        try:
            sampler.build_inputs([probe], 1, 1)
        except (OverflowError, TypeError, ValueError) as err:
            raise ValueError(f"sampling parameters {params} cannot be put on the device: "
                             f"{type(err).__name__}: {err}") from err
        if len(ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens; max_model_len is "
                             f"{self.max_model_len}, which leaves no room to generate")
        need = min(len(ids) + (params.max_tokens or self.max_model_len), self.max_model_len)
        blocks = cdiv(need, self.kv.block_size)
        window = self.kv.sliding_window
        if window is not None and self.config.enable_chunked_prefill:
            # Blocks the window has passed go back as the request goes (prompt chunks too):
            # it holds a window and one block, one more for a chunk to start in, and its
            # drafts. (Without chunks a prompt, or a preempted request's recompute, comes in
            # whole and needs its full length.)
            blocks = min(blocks, cdiv(window, self.kv.block_size) + 2
                         + cdiv(self.plan.num_speculative_tokens, self.kv.block_size))
        if blocks > self.kv.pool.num_usable:
            raise ValueError(f"the request needs up to {need} tokens ({blocks} KV blocks) but "
                             f"the KV cache holds {self.kv.pool.num_usable} blocks")

    def abort_request(self, request_ids: str | Iterable[str]) -> None:
        request_ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        if self._channel is not None:
            self._published.append(("abort", request_ids))
        for rid in request_ids:
            self._sync_groups.pop(rid, None)
            for req in self._groups.pop(rid, []):
                if not req.finished:
                    self.scheduler.finish(req)
                    req.finish_reason = "abort"
                    self.stats.finished["abort"] = self.stats.finished.get("abort", 0) + 1
                self._forget(req)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or self._inflight is not None

    def get_num_unfinished_requests(self) -> int:
        sched = self.scheduler
        return len(sched.waiting) + len(sched.running) + len(sched.swapped)

    # ---- one step -------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedules and runs one step, and returns the outputs of the requests that a step
        advanced. With asynchronous scheduling the step is dispatched, then the results of
        the step before are applied while it runs: outputs come one step late, and a last
        call with nothing to schedule collects the step still in flight."""
        with self._channel_lock:
            if self._channel is not None:  # multi-host serving: the followers mirror this step
                self._channel.publish(self._published)
                self._published = []
        batch = None
        self._lap_start = time.perf_counter()
        outputs: list[RequestOutput] = []
        taken: list[_InFlight] = []  # steps taken out of flight to be applied in this call
        scheduled = False  # (a failure before it: scheduling may have touched anyone)
        try:
            overlap = self._overlap()
            if not overlap and self._inflight is not None:  # back to synchronous steps
                outputs += self._resolve(self._take_inflight(taken))
            drafts = self._propose_drafts() if self.config.speculative_method else None
            batch = self.scheduler.schedule(drafts)
            scheduled = True
            self._lap("schedule")
            flight = self._dispatch(batch)
            prev = self._take_inflight(taken)
            self._inflight = flight
            if prev is not None:  # (overlapped with `flight` on the device)
                outputs += self._resolve(prev)
            if not overlap and self._inflight is not None:
                outputs += self._resolve(self._take_inflight(taken))
            return outputs
        except BaseException as err:
            # Scheduling registered the blocks this step was to compute in the prefix cache;
            # their K/V may never have been written (an error, or Ctrl-C in a notebook). Later
            # requests must not hit those blocks.
            self.kv.reset_prefix_cache()
            # The step scheduled now and every one in flight or being applied: a failure in
            # any leaves their requests half-advanced.
            failing = [batch] + [f.batch for f in taken + [self._inflight] if f is not None]
            self._inflight = None
            if not isinstance(err, Exception):
                raise  # Ctrl-C: the caller aborts what it started
            failed = self._fail_step(failing if scheduled else None, err)
            if not self.runner.caches_alive():
                raise EngineBrokenError(f"the KV cache was lost in a failed step: {err!r}"
                                        ) from err
            raise StepError(failed, err) from err

    def _overlap(self) -> bool:
        """Whether this step may be dispatched before the last one's results are applied:
        asynchronous scheduling is on and no live request needs its previous token on the
        host to build the step (penalties read the whole history). A change is logged."""
        overlap = self.plan.async_scheduling and not self._sync_groups
        if self.plan.async_scheduling and overlap != self._overlapping:
            gid = next(iter(self._sync_groups), None)
            log.info("asynchronous scheduling %s", "resumed" if overlap else
                     f"paused: request {gid!r} {self._sync_groups[gid]}; steps run "
                     "synchronously")
        self._overlapping = overlap
        return overlap

    def _take_inflight(self, taken: list) -> "_InFlight | None":
        """The step in flight (None if none), recorded in `taken` for step()'s failure
        handling."""
        flight, self._inflight = self._inflight, None
        if flight is not None:
            taken.append(flight)
        return flight

    def _fail_step(self, batches, err: Exception) -> list[str]:
        """Finishes, with reason "error", every request group that had a sequence in the
        failed step or the one in flight beside it (scheduled, or preempted): the steps may
        have left their state half-advanced. Without batches (scheduling itself failed) that
        is every unfinished request. Returns their ids."""
        if batches is None:
            touched = [r for g in self._groups.values() for r in g]
        else:  # requests swapped back in are among batch.requests
            touched = [r for b in batches if b is not None for r in (*b.requests, *b.preempted)]
        failed = list(dict.fromkeys(self._group_of[r.request_id] for r in touched
                                    if r.request_id in self._group_of))
        log.error("a step failed (%s: %s); failing its %d request(s): %s",
                  type(err).__name__, err, len(failed), ", ".join(failed))
        for gid in failed:
            self._sync_groups.pop(gid, None)
            for req in self._groups.pop(gid):
                if not req.finished:
                    self.scheduler.finish(req)
                    req.finish_reason = "error"
                    self.stats.finished["error"] = self.stats.finished.get("error", 0) + 1
                self._forget(req)
        return failed

    def reset_prefix_cache(self) -> None:
        """Forget every cached block (vLLM's reset_prefix_cache): e.g. between benchmark runs."""
        self.kv.reset_prefix_cache()

    def _propose_drafts(self) -> dict[str, list[int]]:
        """n-gram drafts for every decoding request, as many as may still be generated less
        the token the step samples anyway; none for requests with penalties."""
        cfg = self.config
        drafts = {}
        for req in self.scheduler.running:
            room = min(cfg.num_speculative_tokens, req.max_total_tokens - req.num_tokens - 1)
            if (req.num_tokens - req.num_computed_tokens == 1 and room > 0
                    and not req.params.uses_penalties and req.rules is None):
                found = spec_decode.propose_ngram(
                    req.all_token_ids, room, cfg.prompt_lookup_min, cfg.prompt_lookup_max)
                if req.matcher is not None:  # only the drafts the grammar accepts
                    found = found[:req.matcher.validate_tokens(found)]
                drafts[req.request_id] = found
        return drafts

    def _dispatch(self, batch) -> "_InFlight | None":
        """Makes the batch's swap copies, builds its inputs and dispatches it to the device
        without waiting for the result."""
        if batch is not None and (batch.swap_out or batch.swap_in):
            # Before the step: it may write blocks that swapped-out requests just freed.
            self.runner.swap(batch.swap_out, batch.swap_in)
            self._lap("device")  # the page copies, not scheduling
        if batch is None or not batch.requests:
            return None
        # Decoding rows longest first: the XLA decode attention walks the rows in groups,
        # each up to its own longest row, so sorted rows leave little of a group idle; the
        # CPU kernel's threads take the longest rows first, which balances them. (Decoding
        # rows carry no drafts: those rows come after them.)
        n_dec = len(batch.requests) if batch.kind == "decode" else batch.num_decodes
        if n_dec > 1:
            # (a decode row's computed tokens are its tokens less one)
            decodes = sorted(batch.requests[:n_dec], key=_computed, reverse=True)  # (stable)
            batch = dataclasses.replace(batch, requests=tuple(decodes) + batch.requests[n_dec:])
        now = time.monotonic()
        self._lap("schedule")  # sorting the rows is part of scheduling them
        prev = self._inflight
        inputs = step_inputs.build(batch, self.kv, self.buckets,
                                   prev.last_rows if prev is not None else None)
        sampling = sampler.build_inputs(list(batch.requests), len(inputs.logits_indices),
                                        self.max_model_len, [list(d) for d in inputs.drafts],
                                        self.runner.mask_width,
                                        [(row, target) for _, _, target, row in inputs.scores],
                                        self._columns)
        self._lap("build")
        result = self.runner.dispatch(inputs, sampling,
                                      prev.result if prev is not None else None)
        self.scheduler.dispatched(batch)
        for req in batch.requests:
            if req.first_scheduled_time is None:
                req.first_scheduled_time = now
        self._lap("device")
        return _InFlight(batch, inputs, result, bool(sampling["flags"][2]))

    def _resolve(self, flight: "_InFlight") -> list[RequestOutput]:
        """Waits for a dispatched step's sampled tokens and applies them: the scheduler
        updates the requests, then their logprobs and outputs are built."""
        batch, inputs = flight.batch, flight.inputs
        result = self.runner.fetch(flight.result, inputs.num_rows + inputs.num_score_rows,
                                   flight.logprobs)
        self._lap("device")
        self.stats.num_steps += 1
        self.stats.batched_tokens += batch.num_tokens
        # Prompts admitted (a preempted request's again), cached tokens included, as vLLM.
        self.stats.prompt_tokens = self.scheduler.num_prompt_tokens
        tokens = result["tokens"].tolist()
        reqs, spec = batch.requests, any(inputs.drafts)
        if spec:  # a row per draft and one more
            starts = list(itertools.accumulate((len(d) + 1 for d in inputs.drafts), initial=0))
            sampled = [tokens[a:b] for a, b in zip(starts, starts[1:])]
        else:  # (most steps: a row a request)
            starts, sampled = range(len(reqs)), [[t] for t in tokens[:len(reqs)]]
        for i, position, _, row in inputs.scores:
            self.outputs.record_prompt_score(reqs[i], position, result, row)
        updated = self.scheduler.update_from_output(batch, sampled)
        index = dict(zip(map(id, reqs), range(len(reqs))))
        stats = self.stats
        for req, n in updated:
            i = index[id(req)]
            self.outputs.record(req, result, starts[i], n)
            stats.generation_tokens += n
            if spec and inputs.drafts[i]:
                drafts, start = inputs.drafts[i], starts[i]
                stats.spec_draft_tokens += len(drafts)
                stats.spec_accepted_tokens += sum(
                    1 for j in range(min(n, len(drafts))) if tokens[start + j] == drafts[j])
            if req.finished:
                req.finished_time = time.monotonic()
                stats.finished[req.finish_reason] = stats.finished.get(req.finish_reason, 0) + 1
        outputs = self._collect([req for req, _ in updated])
        self._lap("update")
        return outputs

    def _lap(self, phase: str) -> None:
        """Adds the time since the last lap to the phase's total."""
        now = time.perf_counter()
        self.stats.step_seconds[phase] += now - self._lap_start
        self._lap_start = now

    def _collect(self, updated) -> list[RequestOutput]:
        outs, seen = [], set()
        group_of, groups, build = self._group_of, self._groups, self.outputs.request_output
        for req in updated:  # (every running request, every step: lookups hoisted)
            gid = group_of.get(req.request_id)
            if gid in seen or gid is None:
                continue
            seen.add(gid)
            group = groups[gid]
            if req.params.output_kind == "final_only" and any(not r.finished for r in group):
                continue
            outs.append(build(gid, group))
        # Only once every output is built: a failure above leaves every group in place for
        # _fail_step, none finished and forgotten with its output lost.
        for out in outs:
            if out.finished:
                self._sync_groups.pop(out.request_id, None)
                for r in self._groups.pop(out.request_id):
                    self._forget(r)
        return outs

    def _forget(self, req: Request) -> None:
        self._group_of.pop(req.request_id, None)

    # ---- multi-host serving ---------------------------------------------------------------

    def lead(self) -> None:
        """Process 0 of a multi-host server: from now on every step first publishes the adds
        and aborts applied since the previous one, for the followers to mirror."""
        if self.multihost and multihost.is_leader():
            self._channel = multihost.CommandChannel()

    def follow(self) -> None:
        """The other processes of a multi-host server: mirror process 0's commands and steps
        until it calls stop_followers()."""
        channel = multihost.CommandChannel()
        while True:
            commands = channel.receive()
            if commands == multihost.STOP:
                return
            for command in commands:
                if command[0] == "add":
                    _, rid, prompt, params, arrival = command
                    self.add_request(rid, prompt, params, arrival)
                else:
                    self.abort_request(command[1])
            try:
                self.step()
            except StepError:
                pass  # the leader's step failed the same way and failed the same requests

    def stop_followers(self) -> None:
        with self._channel_lock:
            if self._channel is not None:
                self._channel.publish(multihost.STOP)
                self._channel = None

    def kv_usage(self) -> KVUsage:
        held = {r.request_id: self.kv.tokens_held(r.request_id, r.num_computed_tokens)
                for r in self.scheduler.running}
        return self.kv.usage(held)

    def snapshot(self, with_requests: bool = False) -> EngineSnapshot:
        """The engine's queues, KV and host pools and running totals, frozen: what metrics,
        the server loop, notebooks and experiments read. with_requests: each unfinished
        sequence too, with its block table (costs a walk over them)."""
        sched, kv, stats, cpu = self.scheduler, self.kv, self.stats, self.kv.cpu_pool
        requests = ()
        if with_requests:
            requests = tuple(
                RequestView(r.request_id, status, len(r.prompt_token_ids), r.num_tokens,
                            r.num_computed_tokens,
                            tuple(kv.block_table(r.request_id)) if status == "running" else (),
                            r.num_preemptions)
                for status, queue in (("running", sched.running), ("waiting", sched.waiting),
                                      ("swapped", sched.swapped))
                for r in queue)
        return EngineSnapshot(
            num_waiting=len(sched.waiting), num_running=len(sched.running),
            num_swapped=len(sched.swapped), kv=self.kv_usage(), block_size=kv.block_size,
            num_free_blocks=kv.pool.num_free,
            num_cpu_blocks=cpu.num_usable if cpu is not None else 0,
            num_cpu_blocks_used=cpu.num_used if cpu is not None else 0,
            num_preemptions=sched.num_preemptions, num_swapped_out=sched.num_swapped_out,
            prefix_cache_queries=kv.cache_stats.queries, prefix_cache_hits=kv.cache_stats.hits,
            window_released_blocks=kv.num_released_blocks,
            spec_draft_tokens=stats.spec_draft_tokens,
            spec_accepted_tokens=stats.spec_accepted_tokens, prompt_tokens=stats.prompt_tokens,
            generation_tokens=stats.generation_tokens, num_steps=stats.num_steps,
            batched_tokens=stats.batched_tokens,
            step_seconds=dict(stats.step_seconds),
            finished=dict(stats.finished), requests=requests)


def setup_devices(config: EngineConfig):
    """(whether this is a multi-host run, the tensor-parallel mesh or None, the model dtype).
    Call before any JAX computation: it joins the other processes of a multi-host run."""
    distributed = multihost.initialize_distributed(
        config.coordinator_address, config.num_processes, config.process_id)
    tp = config.tensor_parallel_size
    mesh = sharding.make_mesh(tp) if tp > 1 or distributed else None
    return distributed, mesh, resolve_dtype(config, jax.default_backend())
