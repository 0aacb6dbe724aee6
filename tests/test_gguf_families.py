"""GGUF conversion of the families beside Llama: qwen2, qwen3, gemma2 and phi3.

Each tiny random Hugging Face folder is written to a GGUF the way llama.cpp's convert_hf_to_gguf
writes one (the gguf package's tensor names, Gemma's norms + 1 and no lm_head, Phi-3's fused
projections, each family's metadata and a realistic vocabulary), converted back, and checked
against transformers' own GGUF loader (tensors) and the original folder (config, logits).
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from paged_jax import weights
from paged_jax.models.forward import dense_logits
from paged_jax.models.loader import load_model
from paged_jax.tokenizer import load_tokenizer
from test_model_families import make_hf_dir
from test_weights import REPO_ROOT, assert_same_tensors, dequantized

pytestmark = pytest.mark.slow  # torch, transformers and a compiled model per family

# GGUF architecture -> (transformers config kind, make_hf_dir overrides). A sentencepiece
# vocabulary (gemma2, phi3) needs room for its 256 byte tokens beside the specials and pieces.
_GEMMA2 = dict(head_dim=16, num_hidden_layers=3, sliding_window=24, vocab_size=320,
               layer_types=["sliding_attention", "full_attention", "sliding_attention"],
               # a GGUF has no query_pre_attn_scalar: it converts to the head size, as
               # llama.cpp derives it for every Gemma 2 but 27B
               query_pre_attn_scalar=16, attn_logit_softcapping=0.5, final_logit_softcapping=0.8,
               tie_word_embeddings=True)  # (llama.cpp writes no lm_head for Gemma 2)
_QWEN_VOCAB = dict(vocab_size=259, bos_token_id=256, eos_token_id=258, pad_token_id=256)  # 256 bytes + 3
FAMILIES = {
    "qwen2": ("Qwen2", _QWEN_VOCAB),
    "qwen3": ("Qwen3", dict(_QWEN_VOCAB, head_dim=32, tie_word_embeddings=True)),  # head_dim != hidden / heads
    "gemma2": ("Gemma2", _GEMMA2),
    "phi3": ("Phi3", dict(sliding_window=24, vocab_size=320)),
}


# ----------------------------------------------------------------------------------------------
# a GGUF as llama.cpp writes it


def _sentencepiece_vocab(arch: str, size: int) -> tuple[list[str], list[float], list[int], dict[str, int]]:
    """A "llama" (sentencepiece) vocabulary as llama.cpp writes Gemma's and Phi-3's: the specials,
    the 256 byte-fallback tokens, then pieces by score; token types 1 normal, 2 unknown, 3
    control, 6 byte. Returns (tokens, scores, types, special token ids)."""
    if arch == "gemma2":
        # (GemmaTokenizer adds a <mask> the vocabulary lacks: Gemma's has it, as id 4)
        specials, types = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"], [3, 3, 3, 2, 3]
        ids = dict(padding=0, eos=1, bos=2, unknown=3)
    else:
        specials, types = ["<unk>", "<s>", "</s>"], [2, 3, 3]
        ids = dict(unknown=0, bos=1, eos=2, padding=2)
    tokens = specials + [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    pieces = ["\u2581", *"etaoinshrdlucmHT", "\u2581t", "he", "\u2581the", "er", "re", "\u2581H", "\u2581Hi",
              "\u2581a", "in", "th", "\u2581there", "on", "at", "en", "\u2581i", "\u2581s", "es", "or", "ti",
              "\u2581to", "\u2581th", "ed", "an", "\u2581o", "\u2581w", "nd", "\u2581c", "ar", "is", "ou",
              "\u2581f", "it", "al", "le", "\u2581in", "\u2581b", "\u2581m", "ing"]
    pieces += [f"\u2581{a}{b}" for a in "xyz" for b in "aeiou"]  # (room for a larger vocabulary)
    tokens += pieces[: size - len(tokens)]
    assert len(tokens) == size, len(tokens)
    scores = [0.0] * (len(specials) + 256) + [-float(i) for i in range(size - len(specials) - 256)]
    types += [1] * (size - len(types))
    return tokens, scores, types, ids


def write_family_gguf(hf_dir: pathlib.Path, path: pathlib.Path, arch: str, quantize: bool = False,
                      extra_tensors: dict[str, np.ndarray] | None = None) -> pathlib.Path:
    """The GGUF llama.cpp's convert_hf_to_gguf writes of `hf_dir` (a Qwen2, Qwen3, Gemma 2 or
    Phi-3 folder): its metadata keys, tensor names from gguf's name map, Gemma's norms + 1."""
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    config = json.loads((hf_dir / "config.json").read_text())
    n_embd, n_head, n_layer = config["hidden_size"], config["num_attention_heads"], config["num_hidden_layers"]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny-{arch}")
    writer.add_block_count(n_layer)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(n_embd)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    theta = config["rope_parameters"]["rope_theta"]
    if arch in ("qwen2", "qwen3"):  # TextModel.set_gguf_parameters
        writer.add_rope_freq_base(theta)
        if config.get("head_dim") is not None:
            writer.add_key_length(config["head_dim"])
            writer.add_value_length(config["head_dim"])
    elif arch == "gemma2":  # Gemma2Model: no rope theta (10000, the default), the caps, the window
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])
        writer.add_attn_logit_softcapping(config["attn_logit_softcapping"])
        writer.add_final_logit_softcapping(config["final_logit_softcapping"])
        writer.add_sliding_window(config["sliding_window"])
    elif arch == "phi3":  # Phi3MiniModel (set_gguf_parameters, generate_extra_tensors)
        original = config.get("original_max_position_embeddings") or config["max_position_embeddings"]
        writer.add_rope_scaling_orig_ctx_len(original)
        writer.add_rope_dimension_count(n_embd // n_head)
        writer.add_rope_freq_base(theta)
        writer.add_sliding_window(config.get("sliding_window") or 0)
        rope = config["rope_parameters"]
        if rope.get("rope_type") == "longrope":
            scale = config["max_position_embeddings"] / original
            writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)))
            extra_tensors = {f"rope_factors_{kind}.weight": np.asarray(rope[f"{kind}_factor"], np.float32)
                             for kind in ("long", "short")} | (extra_tensors or {})
    vocab_size = config["vocab_size"]
    if arch in ("qwen2", "qwen3"):  # byte-level BPE (as test_weights' Llama; no merges: from scores)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("qwen2")
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # (Qwen2Tokenizer adds the first)
        writer.add_token_list(list(bytes_to_unicode().values()) + specials)
        writer.add_token_types([1] * 256 + [3] * len(specials))
        writer.add_token_scores([0.0] * vocab_size)
        writer.add_bos_token_id(256)
        writer.add_eos_token_id(258)
        writer.add_pad_token_id(256)
        writer.add_add_bos_token(False)
    else:
        tokens, scores, types, ids = _sentencepiece_vocab(arch, vocab_size)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_bos_token_id(ids["bos"])
        writer.add_eos_token_id(ids["eos"])
        writer.add_unk_token_id(ids["unknown"])
        writer.add_pad_token_id(ids["padding"])
        writer.add_add_bos_token(True)
        if arch == "gemma2":
            writer.add_add_space_prefix(False)

    arch_id = next(key for key, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)
    name_map = gguf.get_tensor_name_map(arch_id, n_layer)
    tensors = dict(weights.read_safetensors(hf_dir))
    for name, tensor in {**tensors, **(extra_tensors or {})}.items():
        if arch == "gemma2" and name == "lm_head.weight":
            continue  # Gemma2Model.filter_tensors
        tensor = np.asarray(tensor, dtype=np.float32)
        if arch == "gemma2" and name.endswith("norm.weight"):
            tensor = tensor + np.float32(1)  # Gemma2Model.modify_tensors
        if name in (extra_tensors or {}):
            gguf_name = name
        else:
            base, suffix = name.rsplit(".", 1)
            gguf_name = f"{name_map.get_name(base)}.{suffix}"
            assert not gguf_name.startswith("None"), name
        if quantize and tensor.ndim == 2:
            qtype = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(gguf_name, gguf.quants.quantize(tensor, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name, np.ascontiguousarray(tensor))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def transformers_state_dict(gguf_path: pathlib.Path, hf_dir: pathlib.Path) -> dict[str, np.ndarray]:
    """The float32 state dict transformers' GGUF loader reads (its names and TensorProcessors),
    into a model of the original config: transformers' GGUF config has no head_dim for Qwen3
    (it falls back to Qwen3Config's 128)."""
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(hf_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, config=config, dtype=torch.float32)
    return {name: tensor.detach().numpy() for name, tensor in model.state_dict().items()}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """(arch, original folder, float32 GGUF, converted folder)."""
    arch = request.param
    kind, overrides = FAMILIES[arch]
    tmp = tmp_path_factory.mktemp(f"gguf_{arch}")
    hf_dir = make_hf_dir(tmp / "hf", kind, **overrides)
    gguf_path = write_family_gguf(hf_dir, tmp / f"tiny-{arch}.gguf", arch)
    return arch, hf_dir, gguf_path, weights.resolve_model(gguf_path, cache_dir=tmp / "cache")


# ----------------------------------------------------------------------------------------------
# the four families


def test_tensors_match_transformers_gguf_loader(family):
    arch, hf_dir, gguf_path, folder = family
    ours = weights.read_safetensors(folder)
    assert_same_tensors(ours, transformers_state_dict(gguf_path, hf_dir), tied=arch in ("qwen3", "gemma2"))
    original = weights.read_safetensors(hf_dir)
    assert set(ours) == set(original)  # the Hugging Face names (Phi-3's fused ones kept)
    for name in original:  # float32: the original back (Gemma's norms through + 1 - 1)
        exact = not (arch == "gemma2" and name.endswith("norm.weight"))
        np.testing.assert_allclose(ours[name], original[name], rtol=0, atol=0 if exact else 1e-7, err_msg=name)


def test_config_tokenizer_and_logits_match_the_original(family):
    arch, hf_dir, _, folder = family
    config, original_config = weights.load_hf_config(folder), weights.load_hf_config(hf_dir)
    assert config.architectures == original_config.architectures
    for key in ("num_attention_heads", "num_key_value_heads", "hidden_size", "intermediate_size",
                "num_hidden_layers", "vocab_size", "tie_word_embeddings", "max_position_embeddings",
                "sliding_window", "attn_logit_softcapping", "final_logit_softcapping",
                "query_pre_attn_scalar", "layer_types"):
        assert getattr(config, key, None) == getattr(original_config, key, None), key
    assert config.rope_parameters["rope_theta"] == original_config.rope_parameters["rope_theta"]

    converted, original = (load_model(str(f), with_tokenizer=False) for f in (folder, hf_dir))
    ours, theirs = dataclasses.asdict(converted.config), dataclasses.asdict(original.config)
    # (the GGUF stores epsilon as a float32)
    assert ours.pop("rms_norm_eps") == pytest.approx(theirs.pop("rms_norm_eps"), rel=1e-6)
    assert ours == theirs  # heads, head_dim, window, soft caps, rope theta, ...
    ids = np.random.default_rng(0).integers(3, original.config.vocab_size, 40).tolist()  # past the window
    np.testing.assert_allclose(dense_logits(converted.graphdef, converted.params, ids),
                               dense_logits(original.graphdef, original.params, ids), rtol=1e-5, atol=1e-5)

    tokenizer = load_tokenizer(folder)
    assert len(tokenizer) == config.vocab_size
    ids = tokenizer.encode("Hi there", add_special_tokens=False)
    assert tokenizer.unk_token_id not in ids and tokenizer.decode(ids).strip() == "Hi there"


def test_q8_0_gguf_loads_as_int8_and_matches_transformers(tmp_path):
    """A Q8_0 file's projections stay int8 with their block scales (models/quant.py), exact:
    the same tensors and logits as transformers' GGUF loader, which widens them to float32."""
    import torch
    import transformers
    from flax import nnx

    hf_dir = make_hf_dir(tmp_path / "hf", "Phi3", num_hidden_layers=1, vocab_size=320)
    gguf_path = write_family_gguf(hf_dir, tmp_path / "phi3-q8_0.gguf", "phi3", quantize=True)
    folder = weights.resolve_model(gguf_path, cache_dir=tmp_path / "cache")
    stored = weights.read_safetensors(folder)
    assert stored["model.layers.0.self_attn.qkv_proj.weight"].dtype == np.int8
    assert stored["model.layers.0.self_attn.qkv_proj.weight_scale"].shape == (64 + 2 * 32, 2)
    assert stored["model.embed_tokens.weight"].dtype == np.float32  # (not a projection)
    assert_same_tensors(dequantized(stored), transformers_state_dict(gguf_path, hf_dir), tied=False)

    m = load_model(str(folder), with_tokenizer=False)
    assert m.config.weight_quant == ("int8", 32)
    params = {".".join(map(str, p)): v[...] for p, v in nnx.to_flat_state(m.params)}
    assert params["layers.0.self_attn.k_proj.kernel"].dtype == np.int8
    assert params["layers.0.self_attn.k_proj.kernel_scale"].shape == (2, 32)
    ids = np.random.default_rng(0).integers(3, 320, 40).tolist()
    config = transformers.AutoConfig.from_pretrained(hf_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=gguf_path.name, config=config, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    ours = dense_logits(m.graphdef, m.params, ids)
    assert np.max(np.abs(ours - ref)) / np.max(np.abs(ref)) < 1e-4


# ----------------------------------------------------------------------------------------------
# metadata alone: Mistral's window, Phi-4's none, a partial rotary width


def _metadata(arch: str, **keys) -> dict:
    return {"general.architecture": arch, f"{arch}.block_count": 2, f"{arch}.embedding_length": 64,
            f"{arch}.feed_forward_length": 96, f"{arch}.attention.head_count": 4,
            f"{arch}.attention.head_count_kv": 2, f"{arch}.context_length": 512,
            f"{arch}.attention.layer_norm_rms_epsilon": 1e-5, f"{arch}.vocab_size": 256,
            **{f"{arch}.{key.replace('__', '.')}": value for key, value in keys.items()}}


@pytest.mark.parametrize("arch, keys, window, partial", [
    ("llama", dict(attention__sliding_window=4096), 4096, None),  # Mistral, as llama.cpp writes it
    ("llama", {}, None, None),
    ("phi3", dict(attention__sliding_window=2047, rope__dimension_count=16), 2047, None),
    ("phi3", dict(attention__sliding_window=0, rope__dimension_count=16), None, None),  # Phi-4
    ("phi3", dict(attention__sliding_window=0, rope__dimension_count=12), None, 0.75),  # Phi-4-mini
])
def test_config_from_metadata(arch, keys, window, partial):
    import transformers

    from paged_jax.checkpoint.gguf_convert import GGUF_ARCHITECTURES, gguf_config_dict
    from paged_jax.checkpoint.hf import check_architecture
    from paged_jax.models.config import ModelConfig

    config_dict = gguf_config_dict(_metadata(arch, **keys), ["token_embd.weight", "output.weight"])
    assert config_dict.get("sliding_window") == window
    assert check_architecture(config_dict) == GGUF_ARCHITECTURES[arch]
    config = transformers.AutoConfig.for_model(**config_dict)
    if partial is None:
        assert ModelConfig.from_hf(config).sliding_window == window  # the engine applies it
    else:  # (refused by name when loaded: every head dimension is rotated here)
        assert config.rope_parameters["partial_rotary_factor"] == partial
        with pytest.raises(ValueError, match="partial_rotary_factor 0.75"):
            ModelConfig.from_hf(config)


@pytest.mark.parametrize("layers, hidden, heads, head_dim, scalar", [
    (26, 2304, 8, 256, 256),  # Gemma 2 2B: the head size
    (46, 4608, 32, 128, 144)])  # 27B: hidden / heads, as llama.cpp derives it
def test_gemma2_query_scale_from_the_model_size(layers, hidden, heads, head_dim, scalar):
    from paged_jax.checkpoint.gguf_convert import gguf_config_dict

    metadata = _metadata("gemma2", attention__key_length=head_dim,
                         attention__value_length=head_dim)
    metadata.update({"gemma2.block_count": layers, "gemma2.embedding_length": hidden,
                     "gemma2.attention.head_count": heads})
    config = gguf_config_dict(metadata, ["token_embd.weight"])
    assert config["query_pre_attn_scalar"] == scalar


# ----------------------------------------------------------------------------------------------
# Phi-3 LongRoPE, and the path without torch


def test_phi3_longrope_gguf(tmp_path):
    """LongRoPE (Phi-3 128k): llama.cpp writes the factors as tensors and the original context
    as metadata; the converted config has them back (transformers' own loader drops them), and
    the short and the long factors give the original's logits."""
    rng = np.random.default_rng(5)
    rope = dict(rope_type="longrope", rope_theta=10000.0, original_max_position_embeddings=64,
                short_factor=rng.uniform(1.0, 1.2, 8).round(4).tolist(),  # (float32 in the GGUF)
                long_factor=rng.uniform(1.0, 8.0, 8).round(4).tolist())
    hf_dir = make_hf_dir(tmp_path / "hf", "Phi3", num_hidden_layers=1, head_dim=16, vocab_size=320,
                         rope_parameters=rope, original_max_position_embeddings=64)
    gguf_path = write_family_gguf(hf_dir, tmp_path / "phi3-128k.gguf", "phi3")
    folder = weights.resolve_model(gguf_path, cache_dir=tmp_path / "cache")
    assert "rope_factors_long.weight" not in weights.read_safetensors(folder)
    converted, original = (load_model(str(f), with_tokenizer=False) for f in (folder, hf_dir))
    assert converted.config.rope_scaling == original.config.rope_scaling  # factors, attention factor
    for n, max_model_len in ((40, 64), (80, 128)):  # the short factors, then the long ones
        ours, theirs = (m.with_config(m.config.for_max_model_len(max_model_len)) for m in (converted, original))
        assert ours.config.rope_scaling_dict["long"] == (max_model_len > 64)
        ids = rng.integers(3, 320, n).tolist()
        np.testing.assert_allclose(dense_logits(ours.graphdef, ours.params, ids),
                                   dense_logits(theirs.graphdef, theirs.params, ids), rtol=1e-5, atol=1e-5)


def test_phi3_gguf_with_half_its_longrope_is_refused_by_name(tmp_path):
    hf_dir = make_hf_dir(tmp_path / "hf", "Phi3", num_hidden_layers=1, vocab_size=320)
    gguf_path = write_family_gguf(hf_dir, tmp_path / "phi3.gguf", "phi3",
                                  extra_tensors={"rope_factors_long.weight": np.ones(8, np.float32)})
    with pytest.raises(ValueError, match=r"rope_factors_long\.weight \(Phi-3 longrope"):
        weights.resolve_model(gguf_path, cache_dir=tmp_path / "cache")
    assert not any((tmp_path / "cache").iterdir())


def test_gemma2_conversion_needs_no_torch(tmp_path):
    """A sentencepiece family with a value transform, converted with torch unimportable."""
    hf_dir = make_hf_dir(tmp_path / "hf", "Gemma2", **{**_GEMMA2, "num_hidden_layers": 1,
                                                      "layer_types": ["sliding_attention"]})
    gguf_path = write_family_gguf(hf_dir, tmp_path / "gemma2.gguf", "gemma2", quantize=True)
    names = sorted(set(weights.read_safetensors(hf_dir)) - {"lm_head.weight"})
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["torch"] = None  # `import torch` now raises ImportError
        from paged_jax import weights
        from paged_jax.tokenizer import load_tokenizer
        folder = weights.resolve_model({str(gguf_path)!r}, cache_dir={str(tmp_path / "cache")!r})
        config = weights.load_hf_config(folder)
        assert config.model_type == "gemma2" and config.attn_logit_softcapping == 0.5, config
        names = sorted(n for n in weights.read_safetensors(folder) if not n.endswith("_scale"))
        assert names == {names!r}  # (Gemma 2: no lm_head; Q8_0 projections' scales beside)
        tokenizer = load_tokenizer(folder)
        assert tokenizer.decode(tokenizer.encode("Hi there", add_special_tokens=False)) == "Hi there"
        print("OK", folder)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "OK" in result.stdout
