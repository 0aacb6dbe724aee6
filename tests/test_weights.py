"""Checkpoint reading: GGUF conversion against transformers' own GGUF loader, caching, safetensors, errors."""

from __future__ import annotations

import json
import logging
import pathlib
import subprocess
import sys
import textwrap
import time

import ml_dtypes
import numpy as np
import pytest

from paged_jax import weights
from paged_jax.checkpoint.gguf_convert import hf_tensor_name
from paged_jax.tokenizer import apply_chat_template, load_tokenizer

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------
# helpers


def _llama_cpp_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf `permute` (the transform the converter must undo)."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape
    )


_HF_TO_GGUF = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _gguf_name(hf_name: str) -> str:
    base, suffix = hf_name.rsplit(".", 1)
    if base in _HF_TO_GGUF:
        return f"{_HF_TO_GGUF[base]}.{suffix}"
    _, _, layer, leaf = base.split(".", 3)  # model.layers.N.<leaf>
    return f"blk.{layer}.{_HF_TO_GGUF[leaf]}.{suffix}"


def write_tiny_gguf(hf_dir: pathlib.Path, path: pathlib.Path, quantize: bool = False, arch: str = "llama"):
    """A GGUF of a tiny HF Llama folder the way llama.cpp writes one (names, Q/K permutation, byte vocab)."""
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    config = json.loads((hf_dir / "config.json").read_text())
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny-llama")
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(config["head_dim"])
    writer.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    alphabet = list(bytes_to_unicode().values())
    writer.add_token_list(alphabet[: config["vocab_size"]])
    writer.add_token_types([1] * config["vocab_size"])
    writer.add_token_scores([0.0] * config["vocab_size"])  # no merges: transformers derives them from scores
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    for name, tensor in weights.read_safetensors(hf_dir).items():
        tensor = np.asarray(tensor, dtype=np.float32)
        if ".q_proj." in name:
            tensor = _llama_cpp_permute(tensor, n_head)
        elif ".k_proj." in name:
            tensor = _llama_cpp_permute(tensor, n_kv)
        if quantize and tensor.ndim == 2:
            qtype = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(_gguf_name(name), gguf.quants.quantize(tensor, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(_gguf_name(name), np.ascontiguousarray(tensor))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def transformers_gguf_state_dict(gguf_path: pathlib.Path) -> dict[str, np.ndarray]:
    """The float32 state dict transformers' own GGUF loader produces (torch, CPU)."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    return {name: tensor.detach().numpy() for name, tensor in model.state_dict().items()}


def dequantized(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A converted folder's tensors with each projection the GGUF stored as Q8_0 (int8 values,
    their 32-value blocks' scales beside them as `<name>_scale`) multiplied out."""
    out = {}
    for name, value in tensors.items():
        if name.endswith("_scale"):
            continue
        if name + "_scale" in tensors:
            scale = np.repeat(tensors[name + "_scale"], 32, axis=1)
            value = (value.astype(np.float32) * scale).astype(np.float32)
        out[name] = np.asarray(value)
    return out


def assert_same_tensors(ours: dict[str, np.ndarray], reference: dict[str, np.ndarray], tied: bool):
    expected_names = set(reference) - ({"lm_head.weight"} if tied else set())
    assert set(ours) == expected_names
    for name in sorted(ours):
        assert ours[name].dtype == np.float32, name
        assert ours[name].shape == reference[name].shape, name
        np.testing.assert_array_equal(ours[name], reference[name], err_msg=name)  # same dequantization: exact
    if tied:
        np.testing.assert_array_equal(reference["lm_head.weight"], ours["model.embed_tokens.weight"])


# ----------------------------------------------------------------------------------------------
# SmolLM2 (the embedded GGUF)


@pytest.fixture(scope="module")
def smollm2_reference():
    return transformers_gguf_state_dict(weights.default_gguf_path())


def test_smollm2_tensors_match_transformers_gguf_loader(smollm2_dir, smollm2_reference):
    ours = weights.read_safetensors(smollm2_dir)
    assert_same_tensors(ours, smollm2_reference, tied=True)
    assert "lm_head.weight" not in ours


def test_smollm2_config(smollm2_dir):
    import transformers

    config = weights.load_hf_config(smollm2_dir)
    assert config.architectures == ["LlamaForCausalLM"]
    assert config.tie_word_embeddings is True
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (576, 30, 49152)
    gguf_path = weights.default_gguf_path()
    reference = transformers.AutoConfig.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    ignored = {"architectures", "_name_or_path", "_model_name_or_path", "transformers_version"}
    ours_dict, reference_dict = config.to_dict(), reference.to_dict()
    for key in set(ours_dict) | set(reference_dict):
        if key not in ignored:
            assert ours_dict.get(key) == reference_dict.get(key), key


def test_smollm2_tokenizer_matches_transformers_gguf_tokenizer(smollm2_dir):
    import transformers

    ours = load_tokenizer(smollm2_dir)
    gguf_path = weights.default_gguf_path()
    reference = transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    for text in ["Hello, world!", "  spaces\tand\nnewlines", "naïve café 日本語 1234567", "<|im_start|>user\nhi<|im_end|>"]:
        assert ours.encode(text) == reference.encode(text), text
    assert ours.chat_template == reference.chat_template
    assert (ours.bos_token_id, ours.eos_token_id) == (reference.bos_token_id, reference.eos_token_id) == (1, 2)


def test_smollm2_chat_template(smollm2_dir):
    tokenizer = load_tokenizer(smollm2_dir)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = apply_chat_template(tokenizer, messages)
    assert isinstance(ids, list) and all(isinstance(i, int) for i in ids)
    text = tokenizer.decode(ids)
    assert "What is the capital of France?" in text
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>assistant\n")
    assert ids.count(1) == 3  # <|im_start|> as one special token, for system, user and assistant
    without_prompt = apply_chat_template(tokenizer, messages, add_generation_prompt=False)
    assert ids[: len(without_prompt)] == without_prompt and len(without_prompt) < len(ids)


def test_chat_template_missing_is_a_clear_error(smollm2_dir, tmp_path):
    tokenizer = load_tokenizer(smollm2_dir)
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="has no chat template"):
        apply_chat_template(tokenizer, [{"role": "user", "content": "hi"}])


def test_second_resolve_hits_the_cache(smollm2_dir, paged_jax_cache_dir, caplog):
    with caplog.at_level(logging.INFO, logger="paged_jax"):
        start = time.perf_counter()
        again = weights.resolve_model(None, cache_dir=paged_jax_cache_dir)
        elapsed = time.perf_counter() - start
    assert again == smollm2_dir
    assert elapsed < 1.0
    assert any("loading cached conversion" in record.getMessage() for record in caplog.records)
    assert str(smollm2_dir) in caplog.text
    assert [p.name for p in paged_jax_cache_dir.iterdir()] == [smollm2_dir.name]  # no leftover staging folder
    source = json.loads((smollm2_dir / "paged_jax_source.json").read_text())
    assert source["gguf"] == str(weights.default_gguf_path().resolve())


def test_gguf_path_argument_and_first_conversion_log(tmp_path, make_tiny_llama_dir, caplog):
    gguf_path = write_tiny_gguf(make_tiny_llama_dir(), tmp_path / "tiny.gguf")
    with caplog.at_level(logging.INFO, logger="paged_jax"):
        folder = weights.resolve_model(str(gguf_path), cache_dir=tmp_path / "cache")
    assert folder.parent == tmp_path / "cache" and folder.name.startswith("tiny-")
    assert "converted GGUF" in caplog.text and str(gguf_path) in caplog.text


# ----------------------------------------------------------------------------------------------
# tiny GGUFs: the Q/K permutation for MHA, GQA, MQA and an odd head_dim


TINY_SHAPES = {
    "mha": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa": dict(num_attention_heads=4, num_key_value_heads=2),
    "mqa-tied": dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True),
    "head_dim80": dict(num_attention_heads=2, num_key_value_heads=1, head_dim=80),
}


@pytest.mark.parametrize("shape", TINY_SHAPES, ids=list(TINY_SHAPES))
def test_tiny_gguf_round_trip(shape, make_tiny_llama_dir, tmp_path):
    hf_dir = make_tiny_llama_dir(**TINY_SHAPES[shape])
    gguf_path = write_tiny_gguf(hf_dir, tmp_path / f"{shape}.gguf")
    folder = weights.resolve_model(gguf_path, cache_dir=tmp_path / "cache")
    ours, original = weights.read_safetensors(folder), weights.read_safetensors(hf_dir)
    assert set(ours) == set(original)
    for name in original:  # float32 in the GGUF: exactly the original tensors back
        np.testing.assert_array_equal(ours[name], original[name], err_msg=name)
    config, original_config = weights.load_hf_config(folder), weights.load_hf_config(hf_dir)
    for key in ("num_attention_heads", "num_key_value_heads", "head_dim", "hidden_size", "intermediate_size",
                "num_hidden_layers", "vocab_size", "tie_word_embeddings", "rope_parameters"):
        assert getattr(config, key) == getattr(original_config, key), key
    assert config.rms_norm_eps == pytest.approx(original_config.rms_norm_eps)


@pytest.mark.parametrize("shape", ["gqa", "head_dim80"])
def test_tiny_quantized_gguf_matches_transformers_gguf_loader(shape, make_tiny_llama_dir, tmp_path):
    gguf_path = write_tiny_gguf(make_tiny_llama_dir(**TINY_SHAPES[shape]), tmp_path / f"{shape}.gguf", quantize=True)
    folder = weights.resolve_model(gguf_path, cache_dir=tmp_path / "cache")
    stored = weights.read_safetensors(folder)
    assert stored["model.layers.0.self_attn.q_proj.weight"].dtype == np.int8  # Q8_0 kept
    assert_same_tensors(dequantized(stored), transformers_gguf_state_dict(gguf_path), tied=False)


def test_gguf_conversion_needs_no_torch(make_tiny_llama_dir, tmp_path):
    """The runtime path (convert, load config, weights and tokenizer) with torch unimportable."""
    hf_dir = make_tiny_llama_dir(num_key_value_heads=1)
    gguf_path = write_tiny_gguf(hf_dir, tmp_path / "tiny.gguf", quantize=True)
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["torch"] = None  # `import torch` now raises ImportError
        from paged_jax import weights
        from paged_jax.tokenizer import load_tokenizer
        folder = weights.resolve_model({str(gguf_path)!r}, cache_dir={str(tmp_path / "cache")!r})
        weights.load_hf_config(folder)
        names = [n for n in weights.read_safetensors(folder) if not n.endswith("_scale")]
        assert len(names) == {len(weights.read_safetensors(hf_dir))}
        tokenizer = load_tokenizer(folder)
        assert tokenizer.decode(tokenizer.encode("Hi there")) == "Hi there"
        print("OK", folder)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "OK" in result.stdout


def test_unsupported_gguf_architecture(make_tiny_llama_dir, tmp_path):
    gguf_path = write_tiny_gguf(make_tiny_llama_dir(), tmp_path / "tiny.gguf", arch="gpt2")
    with pytest.raises(ValueError, match=r"unsupported GGUF architecture 'gpt2'.*llama, qwen2, qwen3, gemma2, phi3"):
        weights.resolve_model(gguf_path, cache_dir=tmp_path / "cache")
    assert not any((tmp_path / "cache").iterdir())  # the failed conversion left nothing behind


def test_gguf_tensor_names():
    assert hf_tensor_name("blk.12.attn_q.weight") == "model.layers.12.self_attn.q_proj.weight"
    assert hf_tensor_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    assert hf_tensor_name("output.weight") == "lm_head.weight"
    assert hf_tensor_name("blk.0.ssm_conv1d.weight") is None


# ----------------------------------------------------------------------------------------------
# Hugging Face folders


def _torch_state_dict(folder: pathlib.Path) -> dict[str, np.ndarray]:
    import torch
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    return {name: tensor.detach().numpy() for name, tensor in model.state_dict().items()}


def test_sharded_index(make_tiny_llama_dir):
    sharded = make_tiny_llama_dir(max_shard_size="40KB")
    single = make_tiny_llama_dir()
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert not (sharded / "model.safetensors").exists()
    ours, whole = weights.read_safetensors(sharded), weights.read_safetensors(single)
    assert set(ours) == set(index["weight_map"]) == set(whole)
    for name in whole:
        np.testing.assert_array_equal(ours[name], whole[name], err_msg=name)
    reference = _torch_state_dict(sharded)
    for name in ours:
        np.testing.assert_array_equal(ours[name], reference[name], err_msg=name)


def test_tied_folder_has_no_lm_head(make_tiny_llama_dir):
    folder = make_tiny_llama_dir(tie_word_embeddings=True)
    assert "lm_head.weight" not in weights.read_safetensors(folder)
    assert weights.load_hf_config(folder).tie_word_embeddings is True


def test_bfloat16_weights(make_tiny_llama_dir):
    import safetensors.torch

    folder = make_tiny_llama_dir(dtype="bfloat16")
    ours = weights.read_safetensors(folder)
    reference = safetensors.torch.load_file(str(folder / "model.safetensors"))
    assert set(ours) == set(reference)
    for name, tensor in reference.items():
        assert ours[name].dtype == ml_dtypes.bfloat16, name
        np.testing.assert_array_equal(ours[name].astype(np.float32), tensor.float().numpy(), err_msg=name)


@pytest.mark.parametrize(
    "options",
    [
        dict(rope_scaling="linear"),
        dict(rope_scaling="llama3", rope_theta=500000.0),
        dict(num_key_value_heads=1, head_dim=80, tie_word_embeddings=True),
    ],
)
def test_tiny_llama_dir_configs(options, make_tiny_llama_dir):
    folder = make_tiny_llama_dir(**options)
    config = weights.load_hf_config(folder)
    assert config.architectures == ["LlamaForCausalLM"]
    tensors = weights.read_safetensors(folder)
    head_dim = options.get("head_dim", 64 // 4)
    assert tensors["model.layers.0.self_attn.q_proj.weight"].shape == (4 * head_dim, 64)
    assert tensors["model.layers.1.self_attn.k_proj.weight"].shape == (config.num_key_value_heads * head_dim, 64)
    rope = config.rope_parameters
    assert rope["rope_theta"] == options.get("rope_theta", 10000.0)
    if "rope_scaling" in options:
        assert rope["rope_type"] == options["rope_scaling"]
    assert make_tiny_llama_dir(**options) == folder  # built once per session


def test_tiny_llama_dir_with_tokenizer(make_tiny_llama_dir):
    folder = make_tiny_llama_dir(tokenizer=True)
    tokenizer = load_tokenizer(folder)
    assert len(tokenizer) <= weights.load_hf_config(folder).vocab_size
    assert tokenizer.decode(apply_chat_template(tokenizer, [{"role": "user", "content": "hey"}])).count("hey") == 1


# ----------------------------------------------------------------------------------------------
# errors name the value


def test_missing_folder(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=f"model folder {missing} does not exist"):
        weights.resolve_model(str(missing))
    with pytest.raises(FileNotFoundError, match=f"model folder {missing} does not exist"):
        weights.load_hf_config(missing)
    with pytest.raises(FileNotFoundError, match=f"model folder {missing} does not exist"):
        weights.read_safetensors(missing)
    with pytest.raises(FileNotFoundError, match=f"model folder {missing} does not exist"):
        load_tokenizer(missing)


def test_missing_gguf_file_and_other_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"GGUF file {tmp_path / 'x.gguf'} does not exist"):
        weights.resolve_model(tmp_path / "x.gguf")
    other = tmp_path / "weights.bin"
    other.write_bytes(b"")
    with pytest.raises(ValueError, match=f"{other} is neither a checkpoint folder nor a .gguf file"):
        weights.resolve_model(other)


def test_folder_is_returned_as_is(make_tiny_llama_dir):
    folder = make_tiny_llama_dir()
    assert weights.resolve_model(folder) == folder
    assert weights.resolve_model(str(folder)) == folder


def _copy(folder: pathlib.Path, destination: pathlib.Path) -> pathlib.Path:
    destination.mkdir()
    for file in folder.iterdir():
        (destination / file.name).write_bytes(file.read_bytes())
    return destination


def test_missing_config(make_tiny_llama_dir, tmp_path):
    folder = _copy(make_tiny_llama_dir(), tmp_path / "m")
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=f"no config.json in model folder {folder}"):
        weights.load_hf_config(folder)


def test_missing_weights(make_tiny_llama_dir, tmp_path):
    folder = _copy(make_tiny_llama_dir(), tmp_path / "m")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match=rf"no model.safetensors .* in model folder {folder} \(found pytorch_model.bin"):
        weights.read_safetensors(folder)


def test_index_names_missing_shard(make_tiny_llama_dir, tmp_path):
    folder = _copy(make_tiny_llama_dir(max_shard_size="40KB"), tmp_path / "m")
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"shard {shard.name} named in .*index.json does not exist in {folder}"):
        weights.read_safetensors(folder)


def test_index_names_tensor_absent_from_shard(make_tiny_llama_dir, tmp_path):
    folder = _copy(make_tiny_llama_dir(max_shard_size="40KB"), tmp_path / "m")
    index_file = folder / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"]["model.extra.weight"] = next(iter(index["weight_map"].values()))
    index_file.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"lacks tensors \['model.extra.weight'\]"):
        weights.read_safetensors(folder)


def test_unsupported_architecture(make_tiny_llama_dir, tmp_path):
    folder = _copy(make_tiny_llama_dir(), tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"unsupported model architecture GPT2LMHeadModel .*supported: LlamaForCausalLM, MistralForCausalLM, MixtralForCausalLM"):
        weights.load_hf_config(folder)


def test_architecture_from_model_type_when_not_listed():
    assert weights.check_architecture({"model_type": "mistral"}) == "MistralForCausalLM"
    with pytest.raises(ValueError, match="unsupported model architecture none"):
        weights.check_architecture({"model_type": "bert"})


def test_truncated_safetensors(tmp_path):
    bad = tmp_path / "m"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(ValueError, match=f"{bad / 'model.safetensors'} is not a safetensors file"):
        weights.read_safetensors(bad)
