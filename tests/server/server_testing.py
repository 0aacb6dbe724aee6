"""Helpers for the server tests: the live server process, its clients and its /metrics."""
from __future__ import annotations

import dataclasses
import os
import pathlib
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
API_KEY = "test-key"
MODEL_NAME = "tiny-llama"
ENGINE_ARGS = dict(num_kv_blocks=128, max_model_len=256, max_num_seqs=16,
                   max_num_batched_tokens=256)
# Server flags (not engine options) of the shared server: small limits, to test them.
# Tool choice "auto" with the hermes parser (test_server_tools.py).
SERVER_ARGS = dict(max_request_body_bytes=6 << 20, header_read_timeout=2,
                   max_sequences_per_request=64, enable_auto_tool_choice=None,
                   tool_call_parser="hermes")
STARTUP_TIMEOUT_S = 180


@dataclasses.dataclass
class LiveServer:
    base_url: str
    model: str
    api_key: str
    model_dir: pathlib.Path
    process: subprocess.Popen
    log_path: pathlib.Path

    def http(self, timeout: float = 60, **kwargs) -> "httpx.Client":
        headers = {"Authorization": f"Bearer {self.api_key}"}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout, **kwargs)

    def client(self, **kwargs) -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.base_url + "/v1", api_key=self.api_key,
                             max_retries=0, timeout=120, **kwargs)

    def async_client(self, **kwargs) -> "openai.AsyncOpenAI":
        return openai.AsyncOpenAI(base_url=self.base_url + "/v1", api_key=self.api_key,
                                  max_retries=0, timeout=120, **kwargs)

    def metrics(self) -> dict[str, float]:
        """name{labels} -> value, labels reduced to finished_reason where present."""
        text = httpx.get(self.base_url + "/metrics", timeout=30).text
        return parse_metrics(text)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_server(model_dir: pathlib.Path, log_path: pathlib.Path, args: dict,
                 script: pathlib.Path | None = None, script_args: tuple = ()) -> LiveServer:
    """`python -m paged_jax serve` (or `python script serve`, a wrapper that patches the
    engine first) on a free loopback port with the test key and model name; returns once
    /health answers 200. args: flag name -> value (None: a flag without one)."""
    port = free_port()
    flags = [f"--{k.replace('_', '-')}" + ("" if v is None else f"={v}")
             for k, v in args.items()]
    entry = [str(script), *script_args] if script is not None else ["-m", "paged_jax"]
    cmd = [sys.executable, *entry, "serve", "--model", str(model_dir), "--port", str(port),
           "--api-key", API_KEY, "--served-model-name", MODEL_NAME, "--no-access-log", *flags]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    with open(log_path, "wb") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                   cwd=REPO)
    live = LiveServer(f"http://127.0.0.1:{port}", MODEL_NAME, API_KEY, model_dir, process,
                      log_path)
    try:
        wait_healthy(live)
    except BaseException:
        stop_server(live)
        raise
    return live


def stop_server(live: LiveServer) -> None:
    live.process.terminate()
    try:
        live.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        live.process.kill()
        live.process.wait()


def parse_metrics(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, value = line.rsplit(" ", 1)
        name = name_labels.split("{", 1)[0]
        if 'finished_reason="' in name_labels:
            name += "{" + name_labels.split('finished_reason="', 1)[1].split('"', 1)[0] + "}"
        out[name] = float(value)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(live: LiveServer) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if live.process.poll() is not None:
            pytest.fail(f"the server exited with {live.process.returncode}:\n{live.log()}")
        try:
            if httpx.get(live.base_url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    pytest.fail(f"the server was not healthy after {STARTUP_TIMEOUT_S}s:\n{live.log()}")


def wait_idle(server: LiveServer, timeout: float = 30.0) -> dict[str, float]:
    """Polls /metrics until nothing runs, waits or holds KV blocks; returns the last scrape."""
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        idle = (m["paged_jax:num_requests_running"] == 0
                and m["paged_jax:num_requests_waiting"] == 0
                and m["paged_jax:kv_cache_usage_perc"] == 0)
        if idle or time.monotonic() > deadline:
            return m
        time.sleep(0.1)
