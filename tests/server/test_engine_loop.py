"""EngineLoop on a fake engine (no model, no JAX compile): failed steps fail their requests
and the loop goes on, until so many fail in a row that the engine counts as broken: then the
loop stops, every request fails, `healthy` turns False and on_death is called once."""
from __future__ import annotations

import asyncio
import types

import pytest

from paged_jax.engine import StepError
from paged_jax.request import RequestOutput
from paged_jax.server.engine_loop import (MAX_CONSECUTIVE_STEP_FAILURES, EngineDeadError,
                                          EngineLoop, RequestFailedError)


class FakeEngine:
    """Requests whose prompt is "bad" make the step that holds them fail; others finish in
    one step."""

    def __init__(self):
        self.stream_text = False
        self.num_steps = 0
        self.pending: dict[str, str] = {}
        self.steps_failed = 0

    def add_requests(self, requests, arrival):
        if any(prompt == "refused" for _, prompt, _ in requests):
            raise ValueError("prompt must not be refused")
        self.pending.update((rid, prompt) for rid, prompt, _ in requests)

    def abort_request(self, ids):
        for rid in ids:
            self.pending.pop(rid, None)

    def has_unfinished_requests(self):
        return bool(self.pending)

    def step(self):
        bad = [rid for rid, p in self.pending.items() if p == "bad"]
        if bad:
            self.steps_failed += 1
            self.abort_request(bad)
            raise StepError(bad, OverflowError("no room in int32"))
        self.num_steps += 1
        done, self.pending = self.pending, {}
        return [RequestOutput(rid, p, [], [], True) for rid, p in done.items()]

    def snapshot(self):
        return types.SimpleNamespace(num_steps=self.num_steps)

    def stop_followers(self):
        pass


async def collect(handle):
    return [out async for _, out in handle]


def test_a_failed_step_fails_its_request_and_the_loop_goes_on():
    async def main():
        loop = EngineLoop(FakeEngine())
        loop.start()
        try:
            bad = await loop.submit(["bad"], None, "b")
            with pytest.raises(RequestFailedError, match="OverflowError: no room in int32"):
                await collect(bad)
            with pytest.raises(ValueError, match="refused"):
                await loop.submit(["fine", "refused"], None, "r")  # refused whole
            good = await loop.submit(["fine"], None, "g")
            assert [o.finished for o in await collect(good)] == [True]
            assert loop.healthy
        finally:
            loop.stop()
    asyncio.run(main())


def test_failed_steps_in_a_row_stop_the_loop_and_report_its_death():
    deaths = []

    async def main():
        engine = FakeEngine()
        loop = EngineLoop(engine, on_death=lambda: deaths.append(1))
        loop.start()
        try:
            for i in range(MAX_CONSECUTIVE_STEP_FAILURES - 1):
                handle = await loop.submit(["bad"], None, f"b{i}")
                with pytest.raises(RequestFailedError):
                    await collect(handle)
            assert loop.healthy and not deaths
            waiting = await loop.submit(["bad", "bad"], None, "last")
            with pytest.raises((RequestFailedError, EngineDeadError)):
                await collect(waiting)
            for _ in range(100):
                if not loop.healthy:
                    break
                await asyncio.sleep(0.01)
            assert not loop.healthy and deaths == [1]
            assert "steps in a row failed" in str(loop.error)
            with pytest.raises(EngineDeadError):
                await loop.submit(["fine"], None, "after")
        finally:
            loop.stop()
    asyncio.run(main())
