"""The command line: engine options generated from EngineConfig, and `generate`."""
from __future__ import annotations

import dataclasses

import pytest

from paged_jax import cli
from paged_jax.config import EngineConfig


def test_every_engine_option_is_a_flag():
    parser = cli.build_parser()
    args = parser.parse_args(["serve", "--model", "m", "--dtype", "bfloat16", "--block-size",
                              "32", "--num-kv-blocks", "100", "--kv-cache-memory-bytes", "2G",
                              "--max-model-len", "512", "--max-num-seqs", "8",
                              "--max-num-batched-tokens", "1024", "--precompile",
                              "--attention-backend", "xla", "--seed", "3",
                              "--tensor-parallel-size", "2", "--cache-dir", "/tmp/c"])
    config = cli.engine_config(args)
    assert config == EngineConfig(model="m", dtype="bfloat16", block_size=32, num_kv_blocks=100,
                                  kv_cache_memory_bytes=2 << 30, max_model_len=512,
                                  max_num_seqs=8, max_num_batched_tokens=1024, precompile=True,
                                  attention_backend="xla", seed=3, tensor_parallel_size=2,
                                  cache_dir="/tmp/c")
    defaults = cli.engine_config(parser.parse_args(["serve"]))
    assert defaults == EngineConfig(precompile=True)  # a server starts ready
    assert cli.engine_config(parser.parse_args(["generate", "--prompt", "x"])) == EngineConfig()
    assert not cli.engine_config(parser.parse_args(["serve", "--no-precompile"])).precompile
    assert (args.host, args.port) == ("127.0.0.1", 8000)
    flags = {a.dest for a in parser._subparsers._group_actions[0].choices["serve"]._actions}
    assert {f.name for f in dataclasses.fields(EngineConfig)} <= flags


def test_invalid_engine_option_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["serve", "--block-size", "7"])
    assert info.value.code == 2
    assert "--block-size: invalid choice: 7" in capsys.readouterr().err


def test_every_engine_option_has_a_help_text_that_help_shows(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["serve", "--help"])
    assert info.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for field in dataclasses.fields(EngineConfig):
        text = field.metadata.get("help")
        assert text and len(text) > 10, field.name
        assert "--" + field.name.replace("_", "-") in shown
        assert " ".join(text.split()) in shown, field.name
        for choice in field.metadata.get("choices") or ():
            if choice is not None:
                assert str(choice) in shown


def test_generate_prints_llm_output(tiny_chat_model_dir, capsys):
    cli.main(["generate", "--model", str(tiny_chat_model_dir), "--prompt", "Hello",
              "--max-tokens", "4", "--max-model-len", "64", "--num-kv-blocks", "8",
              "--max-num-seqs", "1"])
    printed = capsys.readouterr().out
    assert printed.strip()


def test_convert_writes_an_orbax_checkpoint_that_loads_the_same(tiny_chat_model_dir, tmp_path,
                                                                capsys):
    import numpy as np
    from flax import nnx

    from paged_jax.models.loader import load_model

    cli.main(["convert", "--model", str(tiny_chat_model_dir), "--output",
              str(tmp_path / "ckpt")])
    folder = capsys.readouterr().out.strip()
    assert folder
    flat = {p: v[...] for p, v in nnx.to_flat_state(load_model(folder).params)}
    want = {p: v[...] for p, v in nnx.to_flat_state(load_model(str(tiny_chat_model_dir)).params)}
    assert flat.keys() == want.keys()
    assert all(np.array_equal(np.asarray(flat[p]), np.asarray(want[p])) for p in want)


@pytest.mark.parametrize("model, words", [
    ("/no/such/folder", "model folder /no/such/folder does not exist"),
    ("/no/such/model.gguf", "GGUF file /no/such/model.gguf does not exist"),
    ("NoOrg/no-such-model", "model 'NoOrg/no-such-model' (revision main) is not a local path "
     "and not in the Hugging Face hub cache"),
])
def test_a_missing_model_is_one_line_on_stderr_and_exit_1(model, words):
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "paged_jax", "generate", "--model", model,
                          "--prompt", "Hi"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"paged-jax generate: error: {words}")
