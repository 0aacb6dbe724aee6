"""What a hostile client sends: each is refused with a named 4xx, alone. The engine survives,
other clients' requests complete, and nothing leaks (KV usage, running and waiting at 0)."""
from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from server_testing import API_KEY, SERVER_ARGS, wait_idle

REFUSED = "paged_jax:num_requests_refused_total"
ABORTED = "paged_jax:request_success_total{abort}"


def post(server, body, path="/v1/completions", headers=None, timeout=60):
    """body: a dict (sent as JSON) or the raw bytes of the body."""
    content = json.dumps(body).encode() if isinstance(body, dict) else body
    with server.http(timeout=timeout) as http:
        return http.post(path, content=content,
                         headers={"Content-Type": "application/json", **(headers or {})})


def error_of(response, status=400) -> dict:
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


class Background:
    """A long greedy completion, streamed on another thread while the test misbehaves; the
    test goes on once its first token has arrived (it is running, not queued)."""

    def __init__(self, server, max_tokens=120):
        self.body = {"model": server.model, "prompt": "Once upon a time", "temperature": 0,
                     "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
        self.server, self.events, self.status = server, [], None
        self.running = threading.Event()
        self.thread = threading.Thread(target=self._run)

    def _run(self):
        try:
            with self.server.http(timeout=120) as http:
                with http.stream("POST", "/v1/completions", json=self.body) as r:
                    self.status = r.status_code
                    for line in r.iter_lines():
                        if line.startswith("data: "):
                            self.events.append(line[len("data: "):])
                            self.running.set()
        finally:
            self.running.set()

    def __enter__(self):
        self.thread.start()
        assert self.running.wait(60)
        return self

    def __exit__(self, *exc):
        self.thread.join(120)

    def check(self):
        assert self.status == 200 and self.events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in self.events[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert sum(1 for c in chunks for ch in c["choices"] if ch["text"]) >= 1


def greedy_text(server, **extra):
    r = post(server, {"model": server.model, "prompt": "Tell me", "max_tokens": 8,
                      "temperature": 0.8, "seed": 5, **extra})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


@pytest.mark.parametrize("top_k", [2**31, 2**70])
def test_top_k_past_int32_is_400_and_the_engine_serves_on(server, top_k):
    with Background(server) as other:
        r = post(server, {"model": server.model, "prompt": "Hi", "max_tokens": 2,
                          "top_k": top_k})
        err = error_of(r)
        assert err["param"] == "top_k" and str(top_k) in err["message"]
    other.check()
    assert httpx.get(server.base_url + "/health").status_code == 200
    m = wait_idle(server)
    assert (m["paged_jax:kv_cache_usage_perc"], m["paged_jax:num_requests_running"],
            m["paged_jax:num_requests_waiting"]) == (0, 0, 0)


@pytest.mark.parametrize("top_k", [49152, 49153, 10**9])
def test_top_k_at_or_past_the_vocabulary_keeps_every_token_as_vllm(server, top_k):
    assert greedy_text(server, top_k=top_k) == greedy_text(server)


@pytest.mark.parametrize("field, value", [
    ("temperature", 1e308), ("temperature", 1e39), ("repetition_penalty", 1e39),
    ("min_p", 1e39), ("seed", 2**64), ("seed", -2), ("stop_token_ids", [2**40]),
])
def test_values_no_device_array_holds_are_400_naming_the_field(server, field, value):
    r = post(server, {"model": server.model, "prompt": "Hi", "max_tokens": 2, field: value})
    err = error_of(r)
    assert err["param"] == field and field in err["message"]


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_json_nan_and_infinity_are_refused(server, constant):
    body = f'{{"model": "{server.model}", "prompt": "Hi", "temperature": {constant}}}'
    err = error_of(post(server, body.encode()))
    assert err["code"] == "json_invalid" and constant.lstrip("-") in err["message"]


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", '{"model": "%s", "prompt": "abc\\ud800def", "max_tokens": 2}'),
    ("/v1/chat/completions", '{"model": "%s", "max_tokens": 2, "messages": '
                             '[{"role": "user", "content": "abc\\udfffdef"}]}'),
    ("/v1/completions", '{"model": "%s", "prompt": ["ok", "x\\ud83d"], "max_tokens": 2}'),
])
def test_lone_surrogates_are_400(server, path, body):
    err = error_of(post(server, (body % server.model).encode(), path))
    assert err["code"] == "invalid_unicode" and "surrogate" in err["message"]


def test_a_valid_surrogate_pair_is_one_character(server):
    body = '{"model": "%s", "prompt": "smile \\ud83d\\ude00", "max_tokens": 2}' % server.model
    assert post(server, body.encode()).status_code == 200


def test_invalid_utf8_is_400(server):
    body = b'{"model": "%s", "prompt": "abc\xff\xfedef", "max_tokens": 2}' % (
        server.model.encode())
    err = error_of(post(server, body))
    assert err["code"] == "invalid_unicode" and "UTF-8" in err["message"]


def test_empty_body_and_deep_nesting_get_clear_messages(server):
    err = error_of(post(server, b""))
    assert err["message"] == "the request body is empty; expected a JSON object"
    for depth in (65, 200_000):
        nested = "[" * depth + "]" * depth
        body = f'{{"model": "{server.model}", "prompt": "Hi", "user": {nested}}}'.encode()
        err = error_of(post(server, body))
        assert err["code"] == "json_too_deep" and "64 levels" in err["message"]


def test_too_many_sequences_in_one_request_is_400_naming_the_limit(server):
    r = post(server, {"model": server.model, "prompt": ["a"] * 9, "n": 8, "max_tokens": 2})
    err = error_of(r)
    assert err["code"] == "too_many_sequences" and "72" in err["message"]
    assert str(SERVER_ARGS["max_sequences_per_request"]) in err["message"]


def test_a_body_over_the_limit_is_413_naming_the_limit(server):
    limit = SERVER_ARGS["max_request_body_bytes"]
    prompt = "a" * (limit + 1000)
    r = post(server, {"model": server.model, "prompt": prompt})
    err = error_of(r, 413)
    assert err["code"] == "body_too_large" and str(limit) in err["message"]
    assert httpx.get(server.base_url + "/health").status_code == 200


def test_health_answers_within_100ms_while_a_5mb_prompt_is_refused(server):
    body = json.dumps({"model": server.model, "prompt": "word " * 1_000_000,
                       "max_tokens": 4}).encode()  # 5 MB
    result = {}

    def refuse():
        start = time.perf_counter()
        result["response"] = post(server, body)
        result["seconds"] = time.perf_counter() - start

    latencies = []
    sender = threading.Thread(target=refuse)
    with httpx.Client(base_url=server.base_url, timeout=5) as http:
        http.get("/health")  # the connection is open before the clock starts
        sender.start()
        while sender.is_alive():
            start = time.perf_counter()
            assert http.get("/health").status_code == 200
            latencies.append(time.perf_counter() - start)
            time.sleep(0.005)
    err = error_of(result["response"])
    assert err["code"] == "context_length_exceeded" and "characters" in err["message"]
    assert latencies and max(latencies) < 0.1, (max(latencies), result["seconds"])


def test_docs_need_the_key_and_health_takes_head(server):
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert httpx.get(server.base_url + path).status_code == 401
    with server.http() as http:
        schema = http.get("/openapi.json")
    assert schema.status_code == 200 and "/v1/completions" in schema.json()["paths"]
    head = httpx.head(server.base_url + "/health")
    assert head.status_code == 200 and head.content == b""


@pytest.mark.parametrize("header, status", [
    (f"Bearer {API_KEY}", 200), (f"bearer {API_KEY}", 200), (f"BEARER  {API_KEY}", 200),
    (f"Basic {API_KEY}", 401), (f"Bearer {API_KEY}x", 401), ("Bearer", 401),
])
def test_the_bearer_scheme_is_case_insensitive(server, header, status):
    r = httpx.get(server.base_url + "/v1/models", headers={"Authorization": header})
    assert r.status_code == status


def test_a_batch_refused_as_a_whole_counts_as_refused_not_aborted(server):
    before = wait_idle(server)
    r = post(server, {"model": server.model, "prompt": [[11, 12, 13], [60000]],
                      "max_tokens": 50})
    assert "outside the vocabulary" in error_of(r)["message"]
    after = wait_idle(server)
    assert after[REFUSED] - before[REFUSED] == 1
    assert after[ABORTED] == before[ABORTED]


HEALTH = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.mark.parametrize("first, sent", [
    (None, b""), (None, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"),
    (HEALTH, b"GET /health HTTP/1.1\r\nHo"),  # kept alive, then one header byte at a time
])
def test_a_connection_without_headers_is_closed_after_the_header_timeout(server, first, sent):
    import socket
    import urllib.parse

    url = urllib.parse.urlparse(server.base_url)
    timeout = SERVER_ARGS["header_read_timeout"]
    with socket.create_connection((url.hostname, url.port)) as sock:
        if first is not None:
            sock.sendall(first)
            sock.settimeout(10)
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        sock.sendall(sent)
        sock.settimeout(timeout + 10)
        start = time.monotonic()
        assert sock.recv(1024) == b""  # closed by the server, with no response
        assert timeout - 0.5 < time.monotonic() - start < timeout + 5
    assert httpx.get(server.base_url + "/health").status_code == 200
