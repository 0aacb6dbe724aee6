"""Drives one LLMEngine from asyncio code.

The engine is not thread-safe, so one thread owns it: it applies queued commands (add,
abort), runs step(), and hands each RequestOutput to the asyncio.Queue of the HTTP request
that asked for it (call_soon_threadsafe). HTTP handlers never touch the engine.

    handle = await loop.submit(["Hello", [1, 2, 3]], params, request_id="cmpl-...")
    async for prompt_index, output in handle:   # cumulative outputs, the last one finished
        ...

A ValueError from the engine's checks (a bad request) is raised by submit() before any
output, and nothing of the batch is queued: every prompt is checked before any is added. A
step that fails (engine.StepError) fails the requests it held with RequestFailedError and
the loop goes on; anything else the engine raises stops the loop for good: every request
fails with EngineDeadError, `healthy` turns False and `on_death` is called, so the server can
exit and be restarted. Leaving the iteration early (a disconnected client: the generator is
cancelled or closed) aborts what is unfinished, which frees its KV blocks at the engine's
next iteration.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from typing import AsyncIterator, Awaitable, Callable

from paged_jax.engine import StepError
from paged_jax.kv_view import kv_view
from paged_jax.request import RequestOutput
from paged_jax.sampling_params import SamplingParams
from paged_jax.server.tracing import FinishedRequest

log = logging.getLogger(__name__)
# Failed steps in a row (each failing only its own requests) after which the engine is taken
# to be broken rather than fed a few bad requests: the loop stops and the server exits 1.
MAX_CONSECUTIVE_STEP_FAILURES = 8
# The KV view (/v1/kv_cache) is rebuilt on the engine thread while a page polls it: at most
# this often, and only within KV_VIEW_IDLE_S of the last poll (it walks every block).
KV_VIEW_PERIOD_S = 0.25
KV_VIEW_IDLE_S = 10.0


class EngineDeadError(RuntimeError):
    pass


class RequestFailedError(RuntimeError):
    """This request's step failed on the engine (a 500 for this request alone)."""


class ClientDisconnected(Exception):
    pass


@dataclasses.dataclass
class _AddBatch:
    """One HTTP request's prompts: checked all, then added all, or none."""
    prompts: list[tuple[str, object]]  # (engine request id, prompt)
    params: SamplingParams
    arrival: float
    deliver: Callable[[object], None]
    accepted: asyncio.Future
    trace_context: object = None  # the HTTP request's traceparent (tracing.py)


@dataclasses.dataclass
class _Timing:
    arrival: float
    params: SamplingParams
    trace_context: object = None
    last: float | None = None  # time of the previous output; None before the first
    first_token: float | None = None


class EngineLoop:
    def __init__(self, engine, metrics=None, on_death: Callable[[], None] | None = None,
                 stats=None, tracer=None):
        """on_death: called from the engine thread once, if the loop stops for an error;
        stats: a StatsLogger, fed a snapshot after every step (the periodic log line);
        tracer: a tracing.RequestTracer, given each finished request."""
        self.engine = engine
        self.stats = stats
        self.tracer = tracer
        self._kv_view: dict | None = None  # the latest, built on the engine thread
        self._kv_view_built = 0.0
        self._kv_view_asked = -KV_VIEW_IDLE_S
        self.on_death = on_death
        engine.stream_text = True  # streamed outputs carry their text so far
        self.metrics = metrics
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._deliver: dict[str, Callable[[object], None]] = {}  # engine thread only
        self._timing: dict[str, _Timing] = {}
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self.error: BaseException | None = None

    # ---- lifecycle (event loop) ------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._commands.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def healthy(self) -> bool:
        return self.error is None and self._thread is not None and self._thread.is_alive()

    # ---- requests (event loop) -------------------------------------------------------------

    async def submit(self, prompts: list, params: SamplingParams, request_id: str,
                     arrival: float | None = None,
                     trace_context=None) -> "GenerationHandle":
        """Adds one engine request per prompt; raises ValueError if any is refused."""
        if not self.healthy:
            raise EngineDeadError(f"the engine is not running: {self.error!r}")
        arrival = time.monotonic() if arrival is None else arrival
        handle = GenerationHandle(self, asyncio.Queue())
        rids = [f"{request_id}-{i}" if len(prompts) > 1 else request_id
                for i in range(len(prompts))]
        accepted = self._loop.create_future()
        handle.request_ids.extend(rids)
        handle._unfinished.update(rids)
        self._commands.put(_AddBatch(list(zip(rids, prompts)), params, arrival,
                                     handle._deliver_from_thread(), accepted, trace_context))
        if not self.healthy:  # the thread stopped after the check above: nobody will answer
            self._fail_pending_commands()
        try:
            await accepted  # raises the refusal; nothing of the batch was queued then
        except BaseException:
            handle.abort()  # cancelled while the engine thread added the batch: undo it
            raise
        return handle

    def abort(self, request_ids: list[str]) -> None:
        if request_ids:
            self._commands.put(list(request_ids))

    def kv_cache_view(self) -> dict | None:
        """The block pool as kv_view.kv_view gives it, as of the engine thread's last build
        (None before the first: the engine thread builds one within a second of being
        asked, busy or idle)."""
        self._kv_view_asked = time.monotonic()
        return self._kv_view

    def _refresh_kv_view(self) -> None:
        now = time.monotonic()
        if (now - self._kv_view_asked < KV_VIEW_IDLE_S
                and now - self._kv_view_built >= KV_VIEW_PERIOD_S):
            self._kv_view = kv_view(self.engine)
            self._kv_view_built = now

    # ---- the engine thread -----------------------------------------------------------------

    def _run(self) -> None:
        failures = 0  # steps in a row that raised StepError
        try:
            steps = self.engine.snapshot().num_steps
            while not self._stopping:
                self._apply_commands(block=not self.engine.has_unfinished_requests())
                self._refresh_kv_view()
                if self._stopping or not self.engine.has_unfinished_requests():
                    continue
                started = time.monotonic()
                try:
                    outputs = self.engine.step()
                    failures = 0
                except StepError as err:  # only that step's requests fail; the loop goes on
                    self._fail_requests(err)
                    outputs, failures = [], failures + 1
                    if failures >= MAX_CONSECUTIVE_STEP_FAILURES:
                        raise RuntimeError(f"{failures} steps in a row failed, the last with "
                                           f"{err.cause!r}: the engine is not well") from err
                self._publish(outputs, started)
                snapshot = self.engine.snapshot()
                if self.metrics is not None:
                    self.metrics.update(snapshot)
                if self.stats is not None:
                    self.stats.observe(snapshot, time.monotonic())
                if snapshot.num_steps == steps:
                    # Nothing ran (e.g. all preempted): do not spin. A step of prompt chunks
                    # only has no outputs either, but it ran: go straight on.
                    time.sleep(0.001)
                steps = snapshot.num_steps
        except BaseException as err:  # a bug in the engine: fail every request, stay down
            log.exception("engine loop died")
            self.error = err
            for deliver in list(self._deliver.values()):
                deliver(EngineDeadError(f"the engine failed: {type(err).__name__}: {err}"))
            self._deliver.clear()
            if self.on_death is not None:
                self.on_death()
        finally:
            # Adds queued behind the stop (or the failure) are refused, not left waiting, and
            # a multi-host leader tells its followers from this thread, between steps.
            self._fail_pending_commands()
            self.engine.stop_followers()

    def _fail_requests(self, err: StepError) -> None:
        cause = f"{type(err.cause).__name__}: {err.cause}"
        for rid in err.request_ids:
            deliver = self._deliver.pop(rid, None)
            self._ended(rid, "error")
            if deliver is not None:
                deliver(RequestFailedError(
                    f"the engine step that computed this request failed ({cause}); the "
                    f"request was stopped and its KV blocks freed"))

    def _fail_pending_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(cmd, _AddBatch):
                self._resolve(cmd.accepted, EngineDeadError("the engine is not running"))

    def _apply_commands(self, block: bool) -> None:
        try:
            cmd = self._commands.get(timeout=1.0) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        applied_abort = False
        while cmd is not None:
            if isinstance(cmd, _AddBatch):
                self._add(cmd)
            else:
                self.engine.abort_request(cmd)
                for rid in cmd:
                    self._deliver.pop(rid, None)
                    self._ended(rid, "abort")
                applied_abort = True
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                break
        if applied_abort and self.metrics is not None:
            self.metrics.update(self.engine.snapshot())  # freed blocks show at once

    def _add(self, cmd: _AddBatch) -> None:
        try:  # one refusal refuses the whole batch, unqueued
            self.engine.add_requests([(rid, prompt, cmd.params) for rid, prompt in cmd.prompts],
                                     cmd.arrival)
        except Exception as err:  # ValueError: a bad request; anything else is reported too
            self._resolve(cmd.accepted, err)
            return
        for rid, _ in cmd.prompts:
            self._deliver[rid] = cmd.deliver
            self._timing[rid] = _Timing(cmd.arrival, cmd.params, cmd.trace_context)
        self._resolve(cmd.accepted, None)

    def _resolve(self, fut: asyncio.Future, err: BaseException | None) -> None:
        def set_():
            if fut.done():
                return
            if err is None:
                fut.set_result(None)
            else:
                fut.set_exception(err)
        self._call_in_loop(set_)

    def _publish(self, outputs: list[RequestOutput], started: float) -> None:
        now = time.monotonic()
        for out in outputs:
            rid = out.request_id
            deliver = self._deliver.get(rid)
            timing = self._timing.get(rid)
            if timing is not None and self.metrics is not None:
                self._observe(timing, out.first_scheduled_time or started, now, out.finished)
            if timing is not None:
                timing.last = now
                if timing.first_token is None:
                    timing.first_token = now
            if deliver is not None:
                deliver((rid, out))
            if out.finished:
                self._deliver.pop(rid, None)
                if timing is not None:
                    self._finished(rid, out, timing, out.first_scheduled_time or started, now)
                self._timing.pop(rid, None)

    def _finished(self, rid: str, out: RequestOutput, timing: _Timing, scheduled: float,
                  now: float, reason: str | None = None) -> None:
        """A request ended: its per-request metrics and its span."""
        if self.metrics is None and self.tracer is None:
            return
        params = timing.params
        done = FinishedRequest(
            request_id=rid, prompt_tokens=len(out.prompt_token_ids) if out else 0,
            completion_tokens=sum(len(c.token_ids) for c in out.outputs) if out else 0,
            num_sequences=len(out.outputs) if out else 0, n=params.n,
            max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
            arrival=timing.arrival, scheduled=scheduled,
            first_token=timing.first_token or now, finished=now,
            finish_reason=reason or (out.outputs[0].finish_reason or "stop"))
        if self.metrics is not None:
            self.metrics.request_finished(done)
        if self.tracer is not None:
            self.tracer.record(done, timing.trace_context)

    def _ended(self, rid: str, reason: str) -> None:
        """An unfinished request aborted or failed: counted once, by that reason."""
        timing = self._timing.pop(rid, None)
        if timing is not None:
            now = time.monotonic()
            self._finished(rid, None, timing, now, now, reason)

    def _observe(self, timing: _Timing, scheduled: float, now: float, finished: bool) -> None:
        """scheduled: when the request left the queue (with chunked prefill, steps before
        its first token)."""
        m = self.metrics
        if timing.last is None:
            m.queue_time.observe(max(0.0, scheduled - timing.arrival))
            m.ttft.observe(now - timing.arrival)
        else:
            m.itl.observe(now - timing.last)
        if finished:
            m.e2e.observe(now - timing.arrival)

    def _call_in_loop(self, fn, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            pass


class GenerationHandle:
    """The outputs of one HTTP request's prompts, as (prompt index, RequestOutput)."""

    def __init__(self, loop: EngineLoop, sink: asyncio.Queue):
        self._engine_loop = loop
        self._sink = sink
        self.request_ids: list[str] = []
        self._unfinished: set[str] = set()
        self._ended: BaseException | None = None
        self._watcher: asyncio.Task | None = None

    def _deliver_from_thread(self) -> Callable[[object], None]:
        sink, loop = self._sink, self._engine_loop

        def deliver(item):
            loop._call_in_loop(sink.put_nowait, item)
        return deliver

    @property
    def done(self) -> bool:
        """Every prompt finished, failed or was aborted."""
        return not self._unfinished

    def end(self, err: BaseException) -> None:
        """Ends the iteration with `err` (event loop) and aborts what is unfinished."""
        self._ended = err
        self._sink.put_nowait(err)  # wakes the reader
        self.abort()

    def abort(self) -> None:
        """Aborts what is still running (safe to call more than once)."""
        pending = [r for r in self.request_ids if r in self._unfinished]
        self._unfinished.clear()
        self._engine_loop.abort(pending)

    def watch_disconnect(self, receive: Callable[[], Awaitable[dict]]) -> None:
        """Aborts as soon as the client goes away (an ASGI http.disconnect), even while the
        requests wait in the queue and no output would reveal the broken connection."""
        async def watch():
            while (await receive())["type"] != "http.disconnect":
                pass
            self.end(ClientDisconnected())
        self._watcher = asyncio.ensure_future(watch())

    async def __aiter__(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        index = {rid: i for i, rid in enumerate(self.request_ids)}
        try:
            while True:
                if self._ended is not None:
                    raise self._ended
                if not self._unfinished:
                    break
                batch = [await self._sink.get()]
                if self._ended is not None:
                    raise self._ended
                while not self._sink.empty():  # a slow reader skips to the latest outputs
                    batch.append(self._sink.get_nowait())
                latest: dict[str, RequestOutput] = {}
                for item in batch:
                    if isinstance(item, BaseException):
                        raise item
                    rid, out = item
                    latest[rid] = out
                for rid, out in latest.items():
                    if rid not in self._unfinished:
                        continue
                    if out.finished:
                        self._unfinished.discard(rid)
                    yield index[rid], out
        finally:
            if self._watcher is not None:
                self._watcher.cancel()
            if self._unfinished:
                self.abort()
