"""GGUF (llama.cpp) files -> Hugging Face checkpoint folders, without torch.

A converted folder holds config.json (built from the GGUF metadata with transformers' own key
mapping), generation_config.json (special tokens and llama.cpp's `general.sampling.*` defaults), model.safetensors (under the Hugging Face names and in the Hugging Face layout:
the projections stored as Q8_0 kept as int8 `<name>` [out, in] beside their block scales
`<name>_scale` [out, in / 32] float32, which models/params.py reads as int8 weights; every other
tensor dequantized to float32) and the tokenizer with its chat template (saved with save_pretrained).

transformers can read GGUF itself, but its config and tensor paths import torch, so the metadata
is read here with the `gguf` package and only transformers' torch-free tables and tokenizer
builders are used. The tensors match `AutoModelForCausalLM.from_pretrained(..., gguf_file=...)`.

Families: `general.architecture` llama (also Mistral, which llama.cpp writes as llama), qwen2,
qwen3, gemma2 and phi3 (GGUF_ARCHITECTURES). Tensor names come from the `gguf` package's own
name map (what llama.cpp's convert_hf_to_gguf writes), inverted over each family's Hugging Face
names; the values are put back the way transformers' GGUF TensorProcessors do: llama's Q/K rows
un-permuted, Gemma's norms (stored as weight + 1) less one, the others as stored (Phi-3's fused
qkv_proj / gate_up_proj stay fused, as in its Hugging Face checkpoints).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import pathlib
import re
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from paged_jax.checkpoint.hf import check_architecture, write_safetensors_header

logger = logging.getLogger(__name__)

# Bump when the files a conversion writes change, so older cache folders are not reused.
CONVERTER_VERSION = 4  # 2: generation_config.json; 3: qwen2, qwen3, gemma2, phi3; Mistral's window;
# 4: Q8_0 projections kept as int8 with their scales

# GGUF `general.architecture` -> the Hugging Face architecture it is converted to.
GGUF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "phi3": "Phi3ForCausalLM",
}
# The name the errors give each family.
_FAMILY_NAMES = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "gemma2": "Gemma 2", "phi3": "Phi-3"}

# Each family's Hugging Face tensors (without .weight/.bias): what the gguf package's name map is
# inverted over, as transformers' get_gguf_hf_weights_map does with a model's state dict. Listed
# per family because the map is not one-to-one across them (gate_up_proj is ffn_up in every
# family; post_attention_layernorm is ffn_norm in Llama and post_attention_norm in Gemma 2).
_GLOBAL_HF_TENSORS = ("model.embed_tokens", "model.norm", "lm_head")
_LLAMA_LAYER = ("input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
                "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_HF_LAYER_TENSORS = {
    "llama": _LLAMA_LAYER,
    "qwen2": _LLAMA_LAYER,  # (+ q/k/v biases: the same names, .bias)
    "qwen3": _LLAMA_LAYER + ("self_attn.q_norm", "self_attn.k_norm"),
    "gemma2": _LLAMA_LAYER + ("pre_feedforward_layernorm", "post_feedforward_layernorm"),
    "phi3": ("input_layernorm", "post_attention_layernorm", "self_attn.qkv_proj", "self_attn.o_proj",
             "mlp.gate_up_proj", "mlp.down_proj"),
}
# Tensors llama.cpp adds that have no Hugging Face counterpart (llama3 rope factors, precomputed).
_SKIPPED_TENSORS = {"rope_freqs.weight"}
# Phi-3 LongRoPE (the 128k models): llama.cpp writes the factors as tensors; they go to the config.
_LONGROPE_TENSORS = ("rope_factors_long.weight", "rope_factors_short.weight")


@functools.lru_cache(maxsize=None)
def _name_map(architecture: str) -> tuple[dict[str, str], dict[str, str]]:
    """`(global, per layer)` GGUF -> Hugging Face base names of a family, from gguf's name map."""
    import gguf

    arch = next((key for key, name in gguf.MODEL_ARCH_NAMES.items() if name == architecture), None)
    if arch is None:
        raise ValueError(f"the installed gguf package has no architecture {architecture!r}; "
                         "upgrade it (pip install -U gguf)")
    name_map = gguf.get_tensor_name_map(arch, 1)
    hf_names = {**{name: name for name in _GLOBAL_HF_TENSORS},
                **{f"model.layers.0.{leaf}": leaf for leaf in _HF_LAYER_TENSORS[architecture]}}
    global_names, layer_names = {}, {}
    for hf_name, leaf in hf_names.items():
        gguf_name = name_map.get_name(hf_name)
        if gguf_name is None:  # not a tensor llama.cpp writes for this family (Gemma 2's lm_head)
            continue
        table, key = ((layer_names, gguf_name.removeprefix("blk.0.")) if gguf_name.startswith("blk.0.")
                      else (global_names, gguf_name))
        assert key not in table, f"{architecture}: {hf_name} and {table[key]} are both GGUF {gguf_name}"
        table[key] = leaf
    return global_names, layer_names


def hf_tensor_name(gguf_name: str, architecture: str = "llama") -> str | None:
    """The Hugging Face name of a GGUF tensor (`blk.3.attn_q.weight` -> ...), None if unknown."""
    base, _, suffix = gguf_name.rpartition(".")
    if suffix not in ("weight", "bias"):
        return None
    global_names, layer_names = _name_map(architecture)
    if base in global_names:
        return f"{global_names[base]}.{suffix}"
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if match and match.group(2) in layer_names:
        return f"model.layers.{match.group(1)}.{layer_names[match.group(2)]}.{suffix}"
    return None


def reverse_rope_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (convert_hf_to_gguf's `permute`) for `n_head` heads.

    llama.cpp stores each head's rows in interleaved-pair rotary order; Hugging Face keeps the two
    halves apart (rotate_half). Same as transformers' LlamaTensorProcessor._reverse_permute_weights.
    """
    half = weight.shape[0] // n_head // 2
    return weight.reshape(n_head, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def undo_llama_cpp_transform(weight: np.ndarray, gguf_name: str, architecture: str, n_head: int,
                             n_kv_head: int) -> np.ndarray:
    """A tensor as Hugging Face has it, from the one llama.cpp's convert_hf_to_gguf wrote.

    As transformers' GGUF TensorProcessors: llama's Q/K rows un-permuted (LlamaTensorProcessor);
    Gemma 2's norms, every `*norm.weight`, stored as weight + 1, less one (Gemma2TensorProcessor,
    in float32 as there); Qwen2, Qwen3 and Phi-3 tensors as they are (llama.cpp leaves them so).
    """
    if architecture == "llama":
        if ".attn_q." in gguf_name:
            return reverse_rope_permute(weight, n_head)
        if ".attn_k." in gguf_name:
            return reverse_rope_permute(weight, n_kv_head)
    elif architecture == "gemma2" and gguf_name.endswith("norm.weight"):
        return weight - np.float32(1)
    return weight


Q8_0_BLOCK = 32  # a Q8_0 block: a float16 scale, then 32 int8 values (34 bytes)


def _kept_q8_0(hf_name: str, tensor) -> bool:
    """A projection (attention or MLP, fused or not) stored as Q8_0: its blocks are kept."""
    import gguf

    return (tensor.tensor_type == gguf.GGMLQuantizationType.Q8_0
            and hf_name.endswith("_proj.weight"))


def q8_0_blocks(data: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A Q8_0 tensor's raw bytes -> (int8 values [out, in], float32 scales [out, in / 32]):
    value * its block's scale is the weight, as gguf.quants.dequantize computes it."""
    rows, cols = shape
    blocks = np.asarray(data, np.uint8).reshape(rows, cols // Q8_0_BLOCK, 2 + Q8_0_BLOCK)
    scales = blocks[..., :2].copy().view("<f2")[..., 0].astype(np.float32)
    values = blocks[..., 2:].copy().view(np.int8).reshape(rows, cols)
    return values, scales


def read_gguf(path: str | os.PathLike):
    """`(reader, metadata)`: a gguf.GGUFReader and its metadata as plain Python values."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    metadata = {key: field.contents() for key, field in reader.fields.items()}
    return reader, metadata


def gguf_config_dict(metadata: dict[str, Any], tensor_names: list[str], source: Any = None,
                     rope_factors: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """The transformers config dict of a GGUF, as transformers' GGUF loader builds it.

    On top of that, what the loader leaves out that llama.cpp writes and the engine needs:
    `architectures`; linear/yarn rope scaling (`<arch>.rope.scaling.*`); the sliding window of
    Mistral (which llama.cpp writes as llama) and Phi-3 (`<arch>.attention.sliding_window`; the
    loader maps Gemma 2's itself); Gemma 2's soft caps (`gemma2.attn_logit_softcapping`,
    `gemma2.final_logit_softcapping`); the head width where the loader's table has none
    (`<arch>.attention.key_length`: Qwen3's 128 is not hidden / heads) and a rotary width short of
    it (`<arch>.rope.dimension_count`) as partial_rotary_factor, which the engine refuses by name;
    Phi-3's LongRoPE, from the `rope_factors_long` / `rope_factors_short` tensors (`rope_factors`:
    their values by tensor name; without them such a GGUF is refused, naming them) and
    `phi3.rope.scaling.original_context_length` (transformers' loader drops it).
    """
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    architecture = metadata.get("general.architecture")
    if architecture not in GGUF_ARCHITECTURES:
        raise ValueError(
            f"unsupported GGUF architecture {architecture!r} in {source}; supported: {', '.join(GGUF_ARCHITECTURES)}"
        )
    if metadata.get(f"{architecture}.expert_count"):
        # llama.cpp writes Mixtral as "llama" with experts: refuse it before converting half.
        raise ValueError(
            f"mixture-of-experts GGUF ({metadata[f'{architecture}.expert_count']} experts) in {source} "
            "is not supported; load the Hugging Face (safetensors) checkpoint instead"
        )
    longrope = [name for name in _LONGROPE_TENSORS if name in tensor_names]
    if longrope and (architecture != "phi3" or len(longrope) != 2 or rope_factors is None
                     or not metadata.get(f"{architecture}.rope.scaling.original_context_length")):
        raise ValueError(
            f"GGUF {source} holds {' and '.join(longrope)} (Phi-3 longrope rope scaling) without "
            "the rest of it (both factor tensors, their values and "
            "phi3.rope.scaling.original_context_length): it cannot be converted"
        )
    config: dict[str, Any] = {"model_type": architecture, "architectures": [GGUF_ARCHITECTURES[architecture]]}
    for key, value in metadata.items():
        prefix, _, rest = key.partition(".")
        if prefix not in (architecture, "tokenizer"):
            continue
        target = GGUF_CONFIG_MAPPING[prefix].get(rest)
        if target is not None and target != -1:
            config[target] = value
    # llama.cpp writes output.weight only when the output projection is not the embedding matrix
    config["tie_word_embeddings"] = "output.weight" not in tensor_names
    if "vocab_size" not in config and "tokenizer.ggml.tokens" in metadata:
        config["vocab_size"] = len(metadata["tokenizer.ggml.tokens"])

    def key(name: str):
        return metadata.get(f"{architecture}.{name}")

    if architecture != "llama":  # (llama's table takes head_dim from rope.dimension_count, as before)
        if "head_dim" not in config and key("attention.key_length"):
            config["head_dim"] = int(key("attention.key_length"))
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        if key("attention.value_length") and int(key("attention.value_length")) != head_dim:
            raise ValueError(  # (a head here has one width for its key and its value)
                f"GGUF {source} has keys of {head_dim} and values of {key('attention.value_length')} "
                "per head, which is not supported"
            )
        rotary = key("rope.dimension_count")
        if rotary and int(rotary) != head_dim:
            config["partial_rotary_factor"] = int(rotary) / head_dim
    # The window: Mistral's (llama.cpp writes MistralForCausalLM as "llama" and, where the config
    # has one, its window) and Phi-3's (0 for Phi-4, which has none). Gemma 2's is in the loader's
    # table. Qwen's would only apply with use_sliding_window, which llama.cpp does not write.
    if architecture in ("llama", "phi3") and key("attention.sliding_window"):
        config["sliding_window"] = int(key("attention.sliding_window"))
    if architecture == "gemma2":
        for name in ("attn_logit_softcapping", "final_logit_softcapping"):
            if key(name) is not None:  # (a float32: its shortest decimal, 0.8 not 0.800000011920929)
                config[name] = float(str(np.float32(key(name))))
        # A GGUF has no query_pre_attn_scalar: llama.cpp derives it from the model size, the
        # head size except for 27B (46 layers), whose is hidden / heads (144). transformers'
        # loader leaves Gemma2Config's 256, right for 2B and 9B only; this follows llama.cpp.
        heads = config["num_attention_heads"]
        config["query_pre_attn_scalar"] = (config["hidden_size"] // heads
                                           if config["num_hidden_layers"] == 46
                                           else config.get("head_dim",
                                                           config["hidden_size"] // heads))
        # Left to Gemma2Config's defaults, as transformers' loader does: hidden_activation
        # (gelu_pytorch_tanh) and layer_types (sliding on even layers, full on odd ones, as
        # llama.cpp's swa pattern 2).
    scaling = key("rope.scaling.type")
    factor = key("rope.scaling.factor")
    if longrope:  # (llama.cpp writes no rope.scaling.type for it)
        # as Phi-3's config.json has it: the factors (float32 in the file: each its shortest
        # decimal) in rope_scaling, original_max_position_embeddings beside it
        config["rope_scaling"] = {"rope_type": "longrope", **{
            f"{kind}_factor": [float(str(f)) for f in np.asarray(rope_factors[f"rope_factors_{kind}.weight"],
                                                                 np.float32).ravel()]
            for kind in ("long", "short")}}
        original = config["original_max_position_embeddings"] = int(key("rope.scaling.original_context_length"))
        # llama.cpp's attn_factor is transformers' default (sqrt(1 + ln s / ln original), s the
        # context extension): the config leaves it out unless the file says otherwise.
        extension = config["max_position_embeddings"] / original
        default = math.sqrt(1 + math.log(extension) / math.log(original)) if extension > 1 else 1.0
        attention = key("rope.scaling.attn_factor")
        if attention is not None and not math.isclose(attention, default, rel_tol=1e-6):
            config["rope_scaling"]["attention_factor"] = float(str(np.float32(attention)))
    elif scaling == "linear" and factor:
        config["rope_scaling"] = {"rope_type": "linear", "factor": float(factor)}
    elif scaling == "yarn" and factor:
        config["rope_scaling"] = {"rope_type": "yarn", "factor": float(factor)}
        original = key("rope.scaling.original_context_length")
        if original:
            config["rope_scaling"]["original_max_position_embeddings"] = int(original)
    elif scaling not in (None, "none"):
        raise ValueError(f"unsupported rope scaling {scaling!r} in GGUF {source}")
    if "rope_freqs.weight" in tensor_names:
        logger.warning(
            "GGUF %s has rope_freqs.weight (llama3-style rope scaling), which its metadata does not "
            "describe; the converted config has no rope scaling",
            source,
        )
    check_architecture(config, source)
    return config


def gguf_tokenizer(metadata: dict[str, Any]):
    """The tokenizer (with chat template) a GGUF's metadata describes, as transformers builds it."""
    from transformers import PreTrainedTokenizerFast

    try:
        from transformers.integrations.gguf import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer
    except ImportError:  # transformers 4.x keeps them here
        from transformers.integrations.ggml import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

    tokenizer_dict, tokenizer_config = (
        {name: metadata[f"tokenizer.{key}"] for key, name in GGUF_TOKENIZER_MAPPING[group].items()
         if f"tokenizer.{key}" in metadata}
        for group in ("tokenizer", "tokenizer_config")
    )
    if tokenizer_dict.get("tokenizer_type") == "llama":
        tokenizer_config.setdefault("add_bos_token", True)  # llama.cpp's default for sentencepiece vocabularies
    tokens = tokenizer_dict["tokens"]
    for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding")):
        token_id = metadata.get(f"tokenizer.ggml.{key}_token_id")
        tokenizer_config[name] = tokens[token_id] if token_id is not None else None
    backend, extra = convert_gguf_tokenizer(metadata["general.architecture"], tokenizer_dict)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config, **extra)


def gguf_generation_config(metadata: dict[str, Any]) -> dict[str, Any]:
    """generation_config.json of a GGUF: its special token ids and sampling defaults, if any."""
    from paged_jax.generation_defaults import defaults_from_gguf

    config = {f"{name}_token_id": metadata[f"tokenizer.ggml.{key}_token_id"]
              for name, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"))
              if metadata.get(f"tokenizer.ggml.{key}_token_id") is not None}
    return {**config, **defaults_from_gguf(metadata)}


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> pathlib.Path:
    """Write the Hugging Face folder of a GGUF file into `out_dir` (created; may exist empty)."""
    import gguf
    import transformers

    gguf_path, out = pathlib.Path(gguf_path), pathlib.Path(out_dir)
    reader, metadata = read_gguf(gguf_path)
    tensor_names = [tensor.name for tensor in reader.tensors]
    rope_factors = {tensor.name: gguf.quants.dequantize(tensor.data, tensor.tensor_type)
                    for tensor in reader.tensors if tensor.name in _LONGROPE_TENSORS}
    config_dict = gguf_config_dict(metadata, tensor_names, gguf_path, rope_factors)
    architecture = metadata["general.architecture"]
    n_head, n_kv_head = config_dict["num_attention_heads"], config_dict.get("num_key_value_heads")
    n_kv_head = n_kv_head or n_head

    plan = {}  # hf name -> (gguf tensor, hf shape)
    for tensor in reader.tensors:
        if tensor.name in _SKIPPED_TENSORS or tensor.name in _LONGROPE_TENSORS:
            continue
        name = hf_tensor_name(tensor.name, architecture)
        if name is None:
            raise ValueError(
                f"GGUF {gguf_path} holds tensor {tensor.name}, which has no Hugging Face "
                f"{_FAMILY_NAMES[architecture]} name"
            )
        # ggml lists dimensions fastest-moving first; numpy (and the HF layout) the other way round
        plan[name] = (tensor, tuple(int(d) for d in reversed(tensor.shape.tolist())))

    out.mkdir(parents=True, exist_ok=True)
    config = transformers.AutoConfig.for_model(**config_dict)
    config.save_pretrained(out)
    gguf_tokenizer(metadata).save_pretrained(out)
    (out / "generation_config.json").write_text(json.dumps(gguf_generation_config(metadata), indent=2) + "\n")

    entries = {}  # safetensors name -> (dtype, shape)
    for name, (tensor, shape) in plan.items():
        if _kept_q8_0(name, tensor):
            entries[name] = ("I8", shape)
            entries[name + "_scale"] = ("F32", (shape[0], shape[1] // Q8_0_BLOCK))
        else:
            entries[name] = ("F32", shape)
    with open(out / "model.safetensors", "wb") as f:
        f.write(write_safetensors_header(entries, {"format": "pt"}))
        # A bar in a terminal or a notebook (tqdm leaves it out elsewhere): SmolLM2 takes ~20 s.
        for name, (tensor, shape) in tqdm(plan.items(), desc=f"Converting {gguf_path.name}",
                                          unit="tensor", disable=None, leave=False):
            def as_hf(x):
                return undo_llama_cpp_transform(x, tensor.name, architecture, n_head, n_kv_head)

            if _kept_q8_0(name, tensor):  # (written in the header's order: values, scales)
                values, scales = q8_0_blocks(tensor.data, shape)
                f.write(np.ascontiguousarray(as_hf(values)).tobytes())
                f.write(np.ascontiguousarray(as_hf(scales), dtype="<f4").tobytes())
                continue
            weight = as_hf(gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape))
            f.write(np.ascontiguousarray(weight, dtype="<f4").tobytes())
    stat = gguf_path.stat()
    source = {"gguf": str(gguf_path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
              "converter_version": CONVERTER_VERSION}
    (out / "paged_jax_source.json").write_text(json.dumps(source, indent=2) + "\n")
    return out
