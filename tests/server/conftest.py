"""One live `python -m paged_jax serve` process on a loopback port, shared by the server tests
(session scope: starting it and compiling its step shapes is most of the suite's time).

It serves a tiny random Llama with SmolLM2's tokenizer (initializer_range=0.2: peaked logits,
so greedy decoding does not flip between batch shapes), behind an API key so the 401 cases
run against the same process. Small max_num_seqs / max_model_len / max_num_batched_tokens
bound the number of step shapes JAX compiles.
"""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("openai")

from server_testing import (API_KEY, ENGINE_ARGS, MODEL_NAME, REPO, LiveServer,  # noqa: E402
                            free_port, wait_healthy)


@pytest.fixture(scope="session")
def tiny_chat_model_dir(make_tiny_llama_dir) -> pathlib.Path:
    return make_tiny_llama_dir(tokenizer=True, initializer_range=0.2)


@pytest.fixture(scope="session")
def server(tiny_chat_model_dir, tmp_path_factory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in ENGINE_ARGS.items()]
    cmd = [sys.executable, "-m", "paged_jax", "serve", "--model", str(tiny_chat_model_dir),
           "--port", str(port), "--api-key", API_KEY, "--served-model-name", MODEL_NAME,
           "--no-access-log", *flags]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    with open(log_path, "wb") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                   cwd=REPO)
    live = LiveServer(f"http://127.0.0.1:{port}", MODEL_NAME, API_KEY, tiny_chat_model_dir,
                      process, log_path)
    try:
        wait_healthy(live)
        yield live
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def client(server):
    with server.client() as c:
        yield c
