"""64 concurrent streams, 16 of which hang up mid-stream: the rest finish correctly, and the
aborted requests' KV blocks are freed at once (kv_cache_usage_perc back to 0)."""
from __future__ import annotations

import asyncio

import httpx
import pytest
from server_testing import wait_idle

PROMPTS = ["Once upon a time", "The quick brown fox", "In 1969, astronauts", "def main():"]
MAX_TOKENS = 16
NUM_REQUESTS, NUM_DROPPED = 64, 16
ABORTED = "paged_jax:request_success_total{abort}"


def test_concurrent_streams_with_disconnects(server, client):
    reference = [client.completions.create(model=server.model, prompt=p, temperature=0,
                                           max_tokens=MAX_TOKENS,
                                           extra_body={"ignore_eos": True}).choices[0].text
                 for p in PROMPTS]
    before = wait_idle(server)
    results = asyncio.run(_load(server))

    completed = [r for r in results if r is not None]
    assert len(completed) == NUM_REQUESTS - NUM_DROPPED
    for i, (text, reason, usage) in completed:
        assert text == reference[i % len(PROMPTS)]
        assert reason == "length"
        assert usage.completion_tokens == MAX_TOKENS

    after = wait_idle(server)
    assert after["paged_jax:kv_cache_usage_perc"] == 0
    assert after["paged_jax:num_requests_running"] == 0
    assert after["paged_jax:num_requests_waiting"] == 0
    assert after[ABORTED] - before[ABORTED] == NUM_DROPPED
    assert after["paged_jax:kv_cache_token_state_perc"] == 1  # nothing held, nothing wasted
    assert after["paged_jax:time_to_first_token_seconds_count"] > 0
    assert after["paged_jax:e2e_request_latency_seconds_count"] > 0
    assert server.process.poll() is None


async def _load(server):
    async with server.async_client() as aclient:
        async def complete(i):
            stream = await aclient.completions.create(
                model=server.model, prompt=PROMPTS[i % len(PROMPTS)], temperature=0,
                max_tokens=MAX_TOKENS, stream=True, stream_options={"include_usage": True},
                extra_body={"ignore_eos": True})
            text, reason, usage = "", None, None
            async for chunk in stream:
                for c in chunk.choices:
                    text += c.text
                    reason = c.finish_reason or reason
                usage = chunk.usage or usage
            return i, (text, reason, usage)

        async def hang_up(i):
            stream = await aclient.completions.create(
                model=server.model, prompt=f"Tell me story number {i}", max_tokens=100,
                stream=True, extra_body={"ignore_eos": True})
            received = 0
            async for _ in stream:
                received += 1
                if received == 3:
                    break
            await stream.close()
            return None

        # Every fourth request hangs up; the rest are spread over the 4 prompts.
        jobs = [hang_up(i) if i % 4 == 3 else complete(i) for i in range(NUM_REQUESTS)]
        return await asyncio.gather(*jobs)


def test_non_streaming_disconnect_aborts(server):
    before = wait_idle(server)
    # As long as the context allows (256), so the client's short timeout always comes first.
    body = {"model": server.model, "prompt": "A long answer:", "max_tokens": 240,
            "ignore_eos": True}
    with pytest.raises(httpx.TimeoutException):
        with server.http(timeout=0.05) as http:
            http.post("/v1/completions", json=body)
    after = wait_idle(server)
    assert after["paged_jax:kv_cache_usage_perc"] == 0
    assert after[ABORTED] - before[ABORTED] == 1
