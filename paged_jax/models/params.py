"""Hugging Face tensors -> the model's parameter state, with shape checks that name the tensor."""
from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from paged_jax.models import quant as wq
from paged_jax.models.config import ModelConfig
from paged_jax.models.llama import abstract_model
from paged_jax import sharding


EXPERT_WEIGHTS = ("w1", "w2", "w3")  # SparseMoE's stacked expert weights [E, in, out]
# Qwen-MoE's names of them (gate, down and up projections)
_QWEN_EXPERT_NAMES = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}


def hf_name(path: tuple) -> tuple[str, bool]:
    """Our parameter path -> (Hugging Face tensor name, whether it is stored transposed)."""
    parts = [str(p) for p in path]
    if parts == ["embed_tokens"]:
        return "model.embed_tokens.weight", False
    if parts == ["lm_head"]:
        return "lm_head.weight", True
    leaf = parts[-1]
    stem = ".".join(parts[:-1])
    if leaf in EXPERT_WEIGHTS:  # stacked from one [out, in] tensor per expert
        return f"model.{stem}.experts.{{}}.{leaf}.weight", True
    if leaf == "kernel":
        return f"model.{stem}.weight", True
    return f"model.{stem}.{leaf}", False


def load_params(cfg: ModelConfig, tensors: Mapping[str, np.ndarray], mesh=None,
                kv_repeat: int = 1):
    """Returns (graphdef, params) with every parameter taken from `tensors` in cfg.dtype.

    mesh: place each parameter straight onto its shards (paged_jax/sharding.py), so no device
    ever holds a whole copy of the model; cfg is then the tensor-parallel config
    (sharding.tp_model_config) and kv_repeat how many times each checkpoint KV head repeats."""
    graphdef, state = nnx.split(abstract_model(cfg))
    pure = nnx.to_pure_dict(state)
    place = None if mesh is None else _placer(cfg, state, mesh)
    _fill(pure, (), tensors, jnp.dtype(cfg.dtype), cfg, kv_repeat, place)
    nnx.replace_by_pure_dict(state, pure)
    return graphdef, state


def _placer(cfg: ModelConfig, state, mesh):
    """(path, host value, dtype) -> the parameter on its shards of `mesh`."""
    rules = sharding.rules_for(cfg, sharding.tp_size(mesh))
    names = sharding.logical_names(state)

    def place(path, value, dtype):
        spec = sharding.spec(names[path], rules)
        return sharding.put(value, sharding.NamedSharding(mesh, spec), dtype)

    return place


def scale_key(key: str) -> str:
    """The leaf holding a quantized weight's scales (models/layers.quantized_param)."""
    return "kernel_scale" if key == "kernel" else f"{key}_scale"


def _fill(tree: dict, prefix: tuple, tensors, dtype, cfg: ModelConfig, kv_repeat, place):
    head_dim = cfg.head_dim
    for key, node in tree.items():
        path = prefix + (key,)
        if isinstance(node, dict):
            _fill(node, path, tensors, dtype, cfg, kv_repeat, place)
            continue
        if str(key).endswith("_scale"):  # filled with its weight, below
            continue
        name, transposed = hf_name(path)
        scale = None
        if "{}" in name:  # experts: stacked on a leading axis
            name, value = _experts(name, path, tensors, tuple(node.shape))
        else:
            name = _fused_router_name(name, tensors)
            if name not in tensors and _unfused(name, tensors, cfg) is not None:
                name, value, scale = _unfused(name, tensors, cfg)
            elif name not in tensors:
                raise ValueError(f"checkpoint is missing tensor {name!r} (needed for {path})")
            else:
                value = np.asarray(tensors[name])
                scale = _stored_scale(name, tensors)
            if transposed:
                value, scale = value.T, None if scale is None else scale.T
        if kv_repeat > 1 and sharding.is_kv_projection(path):
            value = sharding.repeat_kv_heads(value, kv_repeat, head_dim)
            if scale is not None:
                scale = sharding.repeat_kv_heads(scale, kv_repeat, head_dim)
        if value.shape != tuple(node.shape):
            raise ValueError(f"tensor {name!r} has shape {tuple(np.asarray(tensors[name]).shape)}, "
                             f"expected {tuple(reversed(node.shape)) if transposed else node.shape}")
        quantized = scale_key(key) in tree
        if scale is not None and not (quantized and scale.shape == tree[scale_key(key)].shape):
            value, scale = np.asarray(wq.dequantize(value, scale)), None  # stored otherwise
        if quantized and scale is None:
            value, scale = wq.quantize(value, cfg.weight_quant)
        leaf_dtype = value.dtype if quantized else dtype
        tree[key] = (jnp.asarray(value, dtype=leaf_dtype) if place is None
                     else place(path, value, leaf_dtype))
        if quantized:
            skey = scale_key(key)
            tree[skey] = (jnp.asarray(scale, jnp.float32) if place is None
                          else place(prefix + (skey,), scale, jnp.float32))


def _stored_scale(name: str, tensors) -> np.ndarray | None:
    """A weight the checkpoint stores quantized (a GGUF file's Q8_0 blocks, kept int8 by
    checkpoint/gguf_convert.py) has its scales [out, G] beside it as `<name>_scale`."""
    return np.asarray(tensors[name + "_scale"]) if name + "_scale" in tensors else None


# Phi-3 fuses projections: self_attn.qkv_proj [(Hq + 2 Hkv) D, H] (q rows, then k, then v)
# and mlp.gate_up_proj [2 I, H] (gate rows first). Split into the separate projections.
_FUSED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
          "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}


def _unfused(name: str, tensors, cfg: ModelConfig) -> tuple | None:
    """(the fused tensor's name, this projection's rows [out, in], their stored scales or
    None) for a projection the checkpoint stores fused, else None."""
    parts = name.split(".")
    if len(parts) < 3 or parts[-1] != "weight" or parts[-2] not in _FUSED:
        return None
    fused = ".".join(parts[:-2] + [_FUSED[parts[-2]], "weight"])
    if fused not in tensors:
        return None
    q, kv, i = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, \
        cfg.intermediate_size
    start, size = {"q_proj": (0, q), "k_proj": (q, kv), "v_proj": (q + kv, kv),
                   "gate_proj": (0, i), "up_proj": (i, i)}[parts[-2]]
    value = np.asarray(tensors[fused])
    want = q + 2 * kv if _FUSED[parts[-2]] == "qkv_proj" else 2 * i
    if value.shape[0] != want:
        raise ValueError(f"tensor {fused!r} has {value.shape[0]} rows, expected {want}")
    scale = _stored_scale(fused, tensors)
    return (fused, value[start:start + size],
            None if scale is None else scale[start:start + size])


# transformers 5 can also save Mixtral's experts fused (save_original_format=False):
# mlp.experts.gate_up_proj [E, 2I, H] (gate rows first), mlp.experts.down_proj [E, H, I] and
# the router as mlp.gate.weight.
def _fused_router_name(name: str, tensors) -> str:
    fused = name.replace(".block_sparse_moe.gate.", ".mlp.gate.")
    return fused if name not in tensors and fused != name and fused in tensors else name


def _experts(template: str, path: tuple, tensors, shape: tuple) -> tuple[str, np.ndarray]:
    """(a tensor name for messages, the [E, in, out] stack) of SparseMoE weight w1, w3 or w2,
    from one [out, in] tensor per expert (experts.{e}.wN.weight, or Qwen-MoE's
    experts.{e}.gate_proj / up_proj / down_proj) or the fused layout."""
    names = [template.format(e) for e in range(shape[0])]
    qwen = [n.replace(f".{path[-1]}.", f".{_QWEN_EXPERT_NAMES[path[-1]]}.") for n in names]
    if names[0] not in tensors and qwen[0] in tensors:
        names = qwen
    missing = [n for n in names if n not in tensors]
    if not missing:
        want = shape[1:][::-1]  # each expert's [out, in]
        for n in names:
            if tuple(np.shape(tensors[n])) != want:
                raise ValueError(f"tensor {n!r} has shape {tuple(np.shape(tensors[n]))}, "
                                 f"expected {want}")
        return names[0], np.stack([np.asarray(tensors[n]).T for n in names])
    stem = template.split(".experts.")[0].replace(".block_sparse_moe", ".mlp") + ".experts."
    leaf = path[-1]
    fused = stem + ("down_proj" if leaf == "w2" else "gate_up_proj")
    if fused not in tensors:
        raise ValueError(f"checkpoint is missing tensor {missing[0]!r} (or the fused {fused!r}; "
                         f"needed for {path})")
    e, n_in, n_out = shape
    want = (e, n_out, n_in) if leaf == "w2" else (e, 2 * n_out, n_in)
    if tuple(np.shape(tensors[fused])) != want:
        raise ValueError(f"tensor {fused!r} has shape {tuple(np.shape(tensors[fused]))}, "
                         f"expected {want}")
    value = np.asarray(tensors[fused])
    if leaf != "w2":  # w1 is the gate half, w3 the up half
        value = value[:, :n_out] if leaf == "w1" else value[:, n_out:]
    return fused, np.ascontiguousarray(value.transpose(0, 2, 1))
