"""The server's process under failure and at shutdown, each on a server of its own (start-up:
test_server_startup.py):
- a step that fails is a 500 (or a stream's error event) for its requests alone;
- an engine that cannot go on makes the process exit 1, for a supervisor to restart it;
- SIGTERM with 16 streams open: every client gets its normal end or an error event naming
  the shutdown, then data: [DONE]; the process exits 0 within the shutdown timeout."""
from __future__ import annotations

import asyncio
import json
import pathlib
import signal
import time

import httpx
import pytest
from server_testing import ENGINE_ARGS, start_server, stop_server, wait_idle

POISONED = pathlib.Path(__file__).with_name("poisoned_server.py")
STEP_FAILS, ENGINE_BREAKS = 666, 667
SHUTDOWN_TIMEOUT = 0.5


@pytest.fixture(scope="module")
def poisoned_server(tiny_chat_model_dir, tmp_path_factory):
    # Prefill-first steps: the poisoned prompt's step holds no other client's request.
    live = start_server(tiny_chat_model_dir, tmp_path_factory.mktemp("poisoned") / "log",
                        {**ENGINE_ARGS, "no_mixed_batches": None, "no_precompile": None},
                        script=POISONED)
    yield live
    stop_server(live)


def sse_events(lines) -> list:
    return [line[len("data: "):] for line in lines if line.startswith("data: ")]


def test_a_failed_step_fails_its_request_alone(poisoned_server):
    server = poisoned_server
    body = {"model": server.model, "prompt": "Once upon a time", "temperature": 0,
            "max_tokens": 150, "ignore_eos": True}
    with server.http() as http:
        want = http.post("/v1/completions", json=body).json()["choices"][0]["text"]

    async def scenario():
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60, headers={
                "Authorization": f"Bearer {server.api_key}"}) as http:
            decoding = asyncio.Event()

            async def run_other():  # streamed, so the test knows when it decodes
                text = ""
                async with http.stream("POST", "/v1/completions",
                                       json={**body, "stream": True}) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            text += json.loads(line[6:])["choices"][0]["text"]
                            decoding.set()
                return r.status_code, text

            other = asyncio.create_task(run_other())
            await asyncio.wait_for(decoding.wait(), 60)
            poisoned = {"model": server.model, "prompt": "Hi", "max_tokens": 8,
                        "temperature": 0.5, "seed": STEP_FAILS}
            whole = await http.post("/v1/completions", json=poisoned)
            async with http.stream("POST", "/v1/completions",
                                   json={**poisoned, "stream": True}) as streamed:
                events = sse_events([line async for line in streamed.aiter_lines()])
            return await other, whole, streamed, events

    other, whole, streamed, events = asyncio.run(scenario())
    assert whole.status_code == 500
    err = whole.json()["error"]
    assert err["code"] == "step_failed" and "OverflowError" in err["message"]
    assert streamed.status_code == 200 and events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "step_failed"
    assert other == (200, want)
    assert httpx.get(server.base_url + "/health").status_code == 200
    m = wait_idle(server)
    assert (m["paged_jax:kv_cache_usage_perc"], m["paged_jax:num_requests_running"],
            m["paged_jax:num_requests_waiting"]) == (0, 0, 0)
    assert m["paged_jax:request_success_total{error}"] == 2


def test_an_engine_that_cannot_go_on_exits_non_zero(poisoned_server):
    server = poisoned_server
    with server.http() as http:
        r = http.post("/v1/completions", json={"model": server.model, "prompt": "Hi",
                                               "temperature": 0.5, "seed": ENGINE_BREAKS})
    assert r.status_code == 500 and r.json()["error"]["code"] == "engine_dead"
    assert server.process.wait(timeout=30) == 1
    assert "KV cache was lost" in server.log()


def test_sigterm_ends_every_open_stream_and_exits_0(tiny_chat_model_dir, tmp_path):
    # Steps slowed to at least 10 ms, so that 100 tokens take longer than the timeout on any
    # machine and the shutdown has streams to end.
    server = start_server(tiny_chat_model_dir, tmp_path / "log",
                          {**ENGINE_ARGS, "shutdown_timeout": SHUTDOWN_TIMEOUT,
                           "no_precompile": None},
                          script=POISONED, script_args=("--step-delay", "0.01"))
    try:
        streams, whole, elapsed = asyncio.run(_sigterm_under_load(server))
        code = server.process.wait(timeout=SHUTDOWN_TIMEOUT + 20)
    finally:
        if server.process.poll() is None:
            stop_server(server)
    assert code == 0, server.log()
    assert elapsed < SHUTDOWN_TIMEOUT + 10
    ended_by_shutdown = 0
    for events in streams:
        assert events[-1] == "[DONE]"
        last = json.loads(events[-2])
        if "error" in last:
            assert last["error"]["code"] == "server_shutting_down"
            assert "shutting down" in last["error"]["message"]
            ended_by_shutdown += 1
        else:
            assert last["choices"][0]["finish_reason"] == "length"
    assert ended_by_shutdown == 16  # 100 slowed steps cannot finish in the timeout
    for r in whole:
        assert r.status_code == 503 and r.json()["error"]["code"] == "server_shutting_down"


async def _sigterm_under_load(server):
    # 16 x 100 tokens fit the pool (no preemption), so the only waiting requests are the two
    # whole ones, queued behind max_num_seqs.
    body = {"model": server.model, "prompt": "Tell me a long story", "max_tokens": 100,
            "ignore_eos": True, "stream": True}
    started = asyncio.Event()
    num_started = 0

    async def stream(http):
        nonlocal num_started
        lines = []
        async with http.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line and not lines:
                    num_started += 1
                    if num_started == 16:
                        started.set()
                lines.append(line)
        return sse_events(lines)

    limits = httpx.Limits(max_connections=32)
    async with httpx.AsyncClient(base_url=server.base_url, timeout=60, limits=limits,
                                 headers={"Authorization": f"Bearer {server.api_key}"}) as http:
        streams = [asyncio.create_task(stream(http)) for _ in range(16)]
        await asyncio.wait_for(started.wait(), 60)
        whole = [asyncio.create_task(http.post("/v1/completions",
                                               json={**body, "stream": False}))
                 for _ in range(2)]
        deadline = time.monotonic() + 30  # both queued behind the 16 (max_num_seqs)
        while server.metrics()["paged_jax:num_requests_waiting"] < 2:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        start = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        results = await asyncio.gather(*streams)
        whole_results = await asyncio.gather(*whole)
        return results, whole_results, time.monotonic() - start
