"""GGUF (llama.cpp) files -> Hugging Face checkpoint folders, without torch.

A converted folder holds config.json (built from the GGUF metadata with transformers' own key
mapping), generation_config.json (special tokens and llama.cpp's `general.sampling.*` defaults), model.safetensors (every tensor dequantized to float32, under its Hugging Face name and in
the Hugging Face layout) and the tokenizer with its chat template (saved with save_pretrained).

transformers can read GGUF itself, but for Llama its config and tokenizer paths import torch, so the
metadata is read here with the `gguf` package and only transformers' torch-free tables and tokenizer
builders are used. The tensors match `AutoModelForCausalLM.from_pretrained(..., gguf_file=...)`.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import re
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from paged_jax.checkpoint.hf import check_architecture, write_safetensors_header

logger = logging.getLogger(__name__)

# Bump when the files a conversion writes change, so older cache folders are not reused.
CONVERTER_VERSION = 2  # 2: generation_config.json

# GGUF `general.architecture` -> the Hugging Face architecture it is converted to.
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM"}

_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Tensors llama.cpp adds that have no Hugging Face counterpart (llama3 rope factors, precomputed).
_SKIPPED_TENSORS = {"rope_freqs.weight"}


def hf_tensor_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a Llama GGUF tensor (`blk.3.attn_q.weight` -> ...), None if unknown."""
    base, _, suffix = gguf_name.rpartition(".")
    if suffix not in ("weight", "bias"):
        return None
    if base in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[base]}.{suffix}"
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if match and match.group(2) in _LAYER_TENSORS:
        return f"model.layers.{match.group(1)}.{_LAYER_TENSORS[match.group(2)]}.{suffix}"
    return None


def reverse_rope_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (convert_hf_to_gguf's `permute`) for `n_head` heads.

    llama.cpp stores each head's rows in interleaved-pair rotary order; Hugging Face keeps the two
    halves apart (rotate_half). Same as transformers' LlamaTensorProcessor._reverse_permute_weights.
    """
    half = weight.shape[0] // n_head // 2
    return weight.reshape(n_head, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def read_gguf(path: str | os.PathLike):
    """`(reader, metadata)`: a gguf.GGUFReader and its metadata as plain Python values."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    metadata = {key: field.contents() for key, field in reader.fields.items()}
    return reader, metadata


def gguf_config_dict(metadata: dict[str, Any], tensor_names: list[str], source: Any = None) -> dict[str, Any]:
    """The transformers config dict of a Llama GGUF, as transformers' GGUF loader builds it.

    On top of that: `architectures` (the loader leaves it out) and linear/yarn rope scaling, which
    llama.cpp writes as `<arch>.rope.scaling.*` and the loader ignores.
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
    scaling = metadata.get(f"{architecture}.rope.scaling.type")
    factor = metadata.get(f"{architecture}.rope.scaling.factor")
    if scaling == "linear" and factor:
        config["rope_scaling"] = {"rope_type": "linear", "factor": float(factor)}
    elif scaling == "yarn" and factor:
        config["rope_scaling"] = {"rope_type": "yarn", "factor": float(factor)}
        original = metadata.get(f"{architecture}.rope.scaling.original_context_length")
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
    """Write the Hugging Face folder of a Llama GGUF file into `out_dir` (created; may exist empty)."""
    import gguf
    import transformers

    gguf_path, out = pathlib.Path(gguf_path), pathlib.Path(out_dir)
    reader, metadata = read_gguf(gguf_path)
    tensor_names = [tensor.name for tensor in reader.tensors]
    config_dict = gguf_config_dict(metadata, tensor_names, gguf_path)
    n_head, n_kv_head = config_dict["num_attention_heads"], config_dict.get("num_key_value_heads")
    n_kv_head = n_kv_head or n_head

    plan = {}  # hf name -> (gguf tensor, hf shape)
    for tensor in reader.tensors:
        if tensor.name in _SKIPPED_TENSORS:
            continue
        name = hf_tensor_name(tensor.name)
        if name is None:
            raise ValueError(f"GGUF {gguf_path} holds tensor {tensor.name}, which has no Hugging Face Llama name")
        # ggml lists dimensions fastest-moving first; numpy (and the HF layout) the other way round
        plan[name] = (tensor, tuple(int(d) for d in reversed(tensor.shape.tolist())))

    out.mkdir(parents=True, exist_ok=True)
    config = transformers.AutoConfig.for_model(**config_dict)
    config.save_pretrained(out)
    gguf_tokenizer(metadata).save_pretrained(out)
    (out / "generation_config.json").write_text(json.dumps(gguf_generation_config(metadata), indent=2) + "\n")

    header = write_safetensors_header({name: ("F32", shape) for name, (_, shape) in plan.items()}, {"format": "pt"})
    with open(out / "model.safetensors", "wb") as f:
        f.write(header)
        # A bar in a terminal or a notebook (tqdm leaves it out elsewhere): SmolLM2 takes ~20 s.
        for name, (tensor, shape) in tqdm(plan.items(), desc=f"Converting {gguf_path.name}",
                                          unit="tensor", disable=None, leave=False):
            weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape)
            if ".attn_q." in tensor.name:
                weight = reverse_rope_permute(weight, n_head)
            elif ".attn_k." in tensor.name:
                weight = reverse_rope_permute(weight, n_kv_head)
            f.write(np.ascontiguousarray(weight, dtype="<f4").tobytes())
    stat = gguf_path.stat()
    source = {"gguf": str(gguf_path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
              "converter_version": CONVERTER_VERSION}
    (out / "paged_jax_source.json").write_text(json.dumps(source, indent=2) + "\n")
    return out
