"""Hugging Face tensors -> the model's parameter state, with shape checks that name the tensor."""
from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from paged_jax.models.config import ModelConfig
from paged_jax.models.llama import abstract_model
from paged_jax import sharding


EXPERT_WEIGHTS = ("w1", "w2", "w3")  # SparseMoE's stacked expert weights [E, in, out]


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
    _fill(pure, (), tensors, jnp.dtype(cfg.dtype), cfg.head_dim, kv_repeat, place)
    nnx.replace_by_pure_dict(state, pure)
    return graphdef, state


def _placer(cfg: ModelConfig, state, mesh):
    """(path, host value) -> the parameter on its shards of `mesh`."""
    rules = sharding.rules_for(cfg, sharding.tp_size(mesh))
    names = sharding.logical_names(state)

    def place(path, value):
        spec = sharding.spec(names[path], rules)
        return sharding.put(value, sharding.NamedSharding(mesh, spec), cfg.dtype)

    return place


def _fill(tree: dict, prefix: tuple, tensors, dtype, head_dim, kv_repeat, place):
    for key, node in tree.items():
        path = prefix + (key,)
        if isinstance(node, dict):
            _fill(node, path, tensors, dtype, head_dim, kv_repeat, place)
            continue
        name, transposed = hf_name(path)
        if "{}" in name:  # experts: one tensor each, stacked on a leading axis
            names = [name.format(e) for e in range(node.shape[0])]
            missing = [n for n in names if n not in tensors]
            if missing:
                raise ValueError(f"checkpoint is missing tensor {missing[0]!r} (needed for "
                                 f"{path})")
            want = tuple(node.shape[1:][::-1])  # each expert's [out, in]
            for n in names:
                if tuple(np.shape(tensors[n])) != want:
                    raise ValueError(f"tensor {n!r} has shape {tuple(np.shape(tensors[n]))}, "
                                     f"expected {want}")
            value = np.stack([np.asarray(tensors[n]).T for n in names])
            name = names[0]
        else:
            if name not in tensors:
                raise ValueError(f"checkpoint is missing tensor {name!r} (needed for {path})")
            value = np.asarray(tensors[name])
            value = value.T if transposed else value
        if kv_repeat > 1 and sharding.is_kv_projection(path):
            value = sharding.repeat_kv_heads(value, kv_repeat, head_dim)
        if value.shape != tuple(node.shape):
            raise ValueError(f"tensor {name!r} has shape {tuple(np.asarray(tensors[name]).shape)}, "
                             f"expected {tuple(reversed(node.shape)) if transposed else node.shape}")
        tree[key] = jnp.asarray(value, dtype=dtype) if place is None else place(path, value)
