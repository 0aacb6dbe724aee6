"""Sampling defaults from the model's generation_config.json (vLLM's --generation-config):
the loader's mapping and checks, the GGUF conversion's file, and LLM.generate without params.
The server's use of them is tested against a live server in
tests/server/test_server_startup.py."""
from __future__ import annotations

import json
import shutil

import pytest

from paged_jax.checkpoint.gguf_convert import gguf_generation_config
from paged_jax.generation_defaults import defaults_from_gguf, load_sampling_defaults
from paged_jax.sampling_params import SamplingParams
from paged_jax.server import protocol as p


def write(folder, config: dict):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "generation_config.json").write_text(json.dumps(config))
    return folder


def test_reads_the_sampling_keys_and_leaves_the_rest(tmp_path):
    write(tmp_path, {"bos_token_id": 1, "eos_token_id": [2, 7], "do_sample": True,
                     "temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.05,
                     "repetition_penalty": 1.1, "max_new_tokens": 300, "num_beams": 1})
    assert load_sampling_defaults(tmp_path) == dict(
        temperature=0.6, top_p=0.95, top_k=20, min_p=0.05, repetition_penalty=1.1,
        max_tokens=300)


def test_top_k_zero_is_disabled_and_null_values_are_skipped(tmp_path):
    write(tmp_path, {"top_k": 0, "temperature": None})
    assert load_sampling_defaults(tmp_path) == {"top_k": -1}


def test_vllm_ignores_the_file_and_a_folder_source_reads_its_own(tmp_path):
    model = write(tmp_path / "model", {"temperature": 0.3})
    other = write(tmp_path / "other", {"temperature": 0.9, "top_p": 0.5})
    assert load_sampling_defaults(model, "vllm") == {}
    assert load_sampling_defaults(model, str(other)) == {"temperature": 0.9, "top_p": 0.5}


def test_a_model_without_the_file_has_no_defaults_but_a_named_folder_must_hold_one(tmp_path):
    assert load_sampling_defaults(tmp_path) == {}
    with pytest.raises(FileNotFoundError, match="generation_config.json"):
        load_sampling_defaults(tmp_path, str(tmp_path / "nowhere"))


@pytest.mark.parametrize("config, named", [
    ({"temperature": -0.5}, "temperature"), ({"top_p": 1.5}, "top_p"),
    ({"top_k": "many"}, "top_k"), ({"max_new_tokens": 0}, "max_tokens"),
    ({"temperature": True}, "temperature")])
def test_a_value_no_request_could_take_is_refused_naming_file_and_field(tmp_path, config,
                                                                        named):
    write(tmp_path, config)
    with pytest.raises(ValueError, match=named) as err:
        load_sampling_defaults(tmp_path)
    assert "generation_config.json" in str(err.value)


def test_unreadable_json_names_the_file(tmp_path):
    (tmp_path / "generation_config.json").write_text("{temperature: 0.5")
    with pytest.raises(ValueError, match="not readable JSON"):
        load_sampling_defaults(tmp_path)


def test_gguf_sampling_metadata_becomes_a_generation_config():
    metadata = {"general.sampling.temp": 0.7, "general.sampling.top_k": 40,
                "general.sampling.top_p": 0.9, "general.sampling.penalty_repeat": 1.05,
                "general.sampling.mirostat": 0, "tokenizer.ggml.bos_token_id": 1,
                "tokenizer.ggml.eos_token_id": 2}
    assert defaults_from_gguf(metadata) == dict(temperature=0.7, top_k=40, top_p=0.9,
                                                repetition_penalty=1.05)
    assert gguf_generation_config(metadata) == dict(
        bos_token_id=1, eos_token_id=2, temperature=0.7, top_k=40, top_p=0.9,
        repetition_penalty=1.05)


def test_request_fields_win_over_the_defaults_which_win_over_openais():
    defaults = dict(temperature=0.25, top_k=7, max_tokens=33)
    chat = p.ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}])
    got = chat.sampling_params(chat.requested_max_tokens, None, defaults)
    assert (got.temperature, got.top_k, got.max_tokens, got.top_p) == (0.25, 7, 33, 1.0)
    chat = p.ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}],
                                   temperature=0.9, max_tokens=4, top_k=0)
    got = chat.sampling_params(chat.requested_max_tokens, None, defaults)
    assert (got.temperature, got.top_k, got.max_tokens) == (0.9, -1, 4)
    # Without defaults: OpenAI's temperature 1, completions' 16 tokens, chat's whole context.
    completion = p.CompletionRequest(prompt="hi")
    got = completion.sampling_params(completion.max_tokens, None, {})
    assert (got.temperature, got.max_tokens) == (1.0, 16)
    assert completion.sampling_params(None, None, defaults).max_tokens == 33
    assert chat.sampling_params(None, None, {}).max_tokens is None


@pytest.fixture(scope="module")
def model_with_defaults(make_tiny_llama_dir, tmp_path_factory):
    """A tiny Llama whose generation config asks for greedy decoding of 5 tokens."""
    folder = tmp_path_factory.mktemp("with_defaults") / "model"
    # test_engine.py's tiny model (built once a session)
    shutil.copytree(make_tiny_llama_dir(tokenizer=True, initializer_range=0.2,
                                        num_hidden_layers=2, hidden_size=64,
                                        num_attention_heads=4, num_key_value_heads=2), folder)
    config = json.loads((folder / "generation_config.json").read_text())
    write(folder, {**config, "temperature": 0.0, "max_new_tokens": 5})
    return folder


@pytest.mark.slow  # two engines, compiled
def test_llm_generate_without_params_samples_with_the_models_defaults(model_with_defaults):
    from paged_jax import LLM

    options = dict(num_kv_blocks=32, max_model_len=64, max_num_seqs=4, attention_backend="xla")
    llm = LLM(str(model_with_defaults), **options)
    assert llm.get_default_sampling_params() == SamplingParams(temperature=0.0, max_tokens=5)
    prompts = [{"prompt_token_ids": [5, 9, 31, 77]}, {"prompt_token_ids": [100, 3, 4]}]
    plain = llm.generate(prompts, use_tqdm=False)
    greedy = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=5),
                          use_tqdm=False)
    assert [o.outputs[0].token_ids for o in plain] == [o.outputs[0].token_ids for o in greedy]
    assert all(len(o.outputs[0].token_ids) == 5 for o in plain)
    # --generation-config vllm: SamplingParams' own defaults (16 tokens, temperature 1).
    ignored = LLM(str(model_with_defaults), generation_config="vllm", **options)
    assert ignored.get_default_sampling_params() == SamplingParams()
