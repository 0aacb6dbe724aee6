"""How a server starts, on one server of its own (tiny model, few step shapes):
- it reports healthy only once every step shape is compiled, and compiles nothing after;
- it samples with the model's generation_config.json where a request leaves a field unset
  (vLLM's --generation-config), through the openai client;
- it logs the stats line while it works and nothing while idle."""
from __future__ import annotations

import json

import pytest
from server_testing import start_server, stop_server

pytest.importorskip("openai")

MESSAGES = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def server(tiny_chat_model_dir, tmp_path_factory):
    # Few shapes (at most 4 sequences, 64 tokens) keep the compile short. The defaults come
    # from a folder of their own (--generation-config DIR), so the shared tiny model keeps its
    # plain generation config: greedy, 6 tokens.
    folder = tmp_path_factory.mktemp("generation_config")
    (folder / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.0, "max_new_tokens": 6}))
    live = start_server(tiny_chat_model_dir, folder / "log", dict(
        num_kv_blocks=32, max_model_len=64, max_num_seqs=4, max_num_batched_tokens=64,
        generation_config=str(folder), log_stats_interval=0.2))
    try:
        yield live
    finally:
        stop_server(live)


def test_serve_is_healthy_only_once_compiled_and_compiles_nothing_after(server):
    # The first test on this server: no request came before it.
    log = server.log()
    assert "precompiled" in log  # before /health first said 200
    compiled = log.count("compiled step")
    assert compiled > 1
    with server.http() as http:
        for prompts, n, max_tokens in [("Hi", 1, 8), (["a b c d e f g h"] * 3, 1, 20),
                                       ("x " * 40, 2, 4), ([[5] * 50], 1, 12)]:
            r = http.post("/v1/completions", json={
                "model": server.model, "prompt": prompts, "n": n, "max_tokens": max_tokens,
                "ignore_eos": True})
            assert r.status_code == 200, r.text
        chat = http.post("/v1/chat/completions", json={
            "model": server.model, "max_tokens": 8,
            "messages": [{"role": "user", "content": "Hello there"}]})
        assert chat.status_code == 200, chat.text
    assert server.log().count("compiled step") == compiled, server.log()


def test_unset_fields_take_the_models_defaults_and_set_ones_win(server):
    compiled = server.log().count("compiled step")
    with server.client() as client:
        def chat(**kwargs):
            out = client.chat.completions.create(model=server.model, messages=MESSAGES,
                                                 **kwargs)
            return out.choices[0], out.usage.completion_tokens

        plain = [chat() for _ in range(3)]
        # temperature 0 from the config: one answer every time (unseeded: at temperature 1
        # the draws would differ), the same as asked for
        assert len({c.message.content for c, _ in plain}) == 1
        explicit, _ = chat(temperature=0.0, max_tokens=6)
        assert plain[0][0].message.content == explicit.message.content
        # max_new_tokens 6 from the config, unless the request says otherwise
        assert all(n <= 6 for _, n in plain)
        assert plain[0][0].finish_reason != "length" or plain[0][1] == 6
        short, n = chat(max_tokens=2)
        assert n <= 2
        # a request's own temperature wins: random draws differ from the greedy answer
        hot = {chat(temperature=2.0, seed=s)[0].message.content for s in range(4)}
        assert hot - {explicit.message.content}
        completion = client.completions.create(model=server.model, prompt="a b c",
                                               extra_body={"ignore_eos": True})
        assert completion.usage.completion_tokens == 6  # the config's, not OpenAI's 16
    assert "sampling defaults from" in server.log()
    assert server.log().count("compiled step") == compiled  # still nothing new


def test_the_stats_line_appears_while_it_works_and_not_when_idle(server):
    import time

    with server.client() as client:
        for _ in range(3):
            client.completions.create(model=server.model, prompt="a b c", max_tokens=20,
                                      extra_body={"ignore_eos": True})
    time.sleep(0.5)  # the engine thread publishes after its last step
    lines = server.log().count("Avg generation throughput")
    assert lines >= 1 and "Running: " in server.log()
    time.sleep(1.0)  # five intervals of nothing
    assert server.log().count("Avg generation throughput") == lines

