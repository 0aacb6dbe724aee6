"""One live `python -m paged_jax serve` process on a loopback port, shared by the server tests
(session scope: starting it and compiling its step shapes is most of the suite's time).

It serves a tiny random Llama with SmolLM2's tokenizer (initializer_range=0.2: peaked logits,
so greedy decoding does not flip between batch shapes), behind an API key so the 401 cases
run against the same process. Small max_num_seqs / max_model_len / max_num_batched_tokens
bound the number of step shapes JAX compiles.
"""
from __future__ import annotations

import pathlib

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("openai")

from server_testing import ENGINE_ARGS, SERVER_ARGS, start_server, stop_server  # noqa: E402


@pytest.fixture(scope="session")
def tiny_chat_model_dir(make_tiny_llama_dir) -> pathlib.Path:
    return make_tiny_llama_dir(tokenizer=True, initializer_range=0.2)


@pytest.fixture(scope="session")
def server(tiny_chat_model_dir, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    # JSON without free whitespace: the random model, given the choice, writes whitespace
    # until max_tokens (test_server_structured.py).
    live = start_server(tiny_chat_model_dir, log_path, {**ENGINE_ARGS, **SERVER_ARGS,
                                                        "disable_any_whitespace": None})
    try:
        yield live
    finally:
        stop_server(live)


@pytest.fixture(scope="session")
def client(server):
    with server.client() as c:
        yield c
