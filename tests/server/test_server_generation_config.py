"""The server samples with the model's generation_config.json where a request leaves a field
unset (vLLM's --generation-config), through the openai client against a live server."""
from __future__ import annotations

import json

import pytest
from server_testing import start_server, stop_server

pytest.importorskip("openai")

MESSAGES = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def server(tiny_chat_model_dir, tmp_path_factory):
    # The defaults come from a folder of their own (--generation-config DIR), so the shared
    # tiny model keeps its plain generation config: greedy, 6 tokens.
    folder = tmp_path_factory.mktemp("generation_config")
    (folder / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.0, "max_new_tokens": 6}))
    live = start_server(tiny_chat_model_dir, folder / "log", dict(
        num_kv_blocks=32, max_model_len=64, max_num_seqs=4, max_num_batched_tokens=64,
        generation_config=str(folder), no_precompile=None))
    try:
        yield live
    finally:
        stop_server(live)


def test_unset_fields_take_the_models_defaults_and_set_ones_win(server):
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
