"""Tensor parallelism: the device mesh, the parameter and KV-cache shardings, multi-host start-up.

The mesh has axes ("dp", "tp"); dp is 1 for now (room for data parallelism later) and tp is
`tensor_parallel_size`, taken from jax.devices() (every process's devices: one global mesh).
Parameters carry logical axis names (models/llama.py); LOGICAL_RULES maps them to mesh axes:

    q_heads, kv_heads, mlp -> tp   column-parallel q/k/v, gate/up (output dim), row-parallel
                                   o, down (input dim): one all-reduce after o and after down
    vocab               -> tp      vocab-parallel embedding and LM head (replicated if the
                                   vocabulary does not divide)
    embed, norm         -> None    replicated
    experts             -> None    Mixtral: every device holds every expert's slice of mlp
                                   (expert weights [E, H, I] split on I, as dense MLPs are)

The KV cache [Hkv, N, B, D] is sharded on axis 0. When tp exceeds the KV head count (tp a
multiple of it), every KV head is repeated tp // Hkv times in the k/v projections at load time
(as vLLM does), so the model runs with tp KV heads, one per device: each device holds only the
KV head its q heads read, and the cache stays sharded rather than replicated.

Attention runs under shard_map over the tp axis (`attention_per_kv_head`): attention is
independent per KV head group, so each device writes and attends its own heads with the XLA
path or the Pallas kernels, with no communication.
"""
from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from paged_jax.models.config import ModelConfig

log = logging.getLogger(__name__)

DP, TP = "dp", "tp"
LOGICAL_RULES = {"embed": None, "norm": None, "experts": None, "q_heads": TP, "kv_heads": TP,
                 "mlp": TP, "vocab": TP}


# ---- mesh and specs ------------------------------------------------------------------------

def make_mesh(tensor_parallel_size: int) -> Mesh:
    devices = jax.devices()
    tp = tensor_parallel_size
    if tp > len(devices):
        raise ValueError(f"tensor_parallel_size {tp} exceeds the {len(devices)} devices "
                         f"available ({jax.process_count()} process(es))")
    if jax.process_count() > 1 and tp != len(devices):
        raise ValueError(f"with {jax.process_count()} processes tensor_parallel_size must "
                         f"equal the total device count {len(devices)}, got {tp}")
    return Mesh(np.array(devices[:tp]).reshape(1, tp), (DP, TP),
                axis_types=(AxisType.Auto, AxisType.Auto))


def tp_size(mesh: Mesh | None) -> int:
    return 1 if mesh is None else mesh.shape[TP]


def tp_model_config(cfg: ModelConfig, tp: int) -> tuple[ModelConfig, int]:
    """(the config the sharded model runs with, how many times each KV head is repeated).

    Refuses head and MLP sizes that do not divide, naming them."""
    if tp == 1:
        return cfg, 1
    for name in ("num_heads", "intermediate_size"):
        if getattr(cfg, name) % tp:
            raise ValueError(f"{name} {getattr(cfg, name)} is not divisible by "
                             f"tensor_parallel_size {tp}")
    hkv = cfg.num_kv_heads
    if hkv % tp == 0:
        return cfg, 1
    if tp % hkv:
        raise ValueError(f"num_kv_heads {hkv} is not divisible by tensor_parallel_size {tp} "
                         f"(nor is tensor_parallel_size a multiple of it)")
    return dataclasses.replace(cfg, num_kv_heads=tp), tp // hkv


def rules_for(cfg: ModelConfig, tp: int) -> dict:
    rules = dict(LOGICAL_RULES)
    if cfg.vocab_size % tp:
        rules["vocab"] = None
        log.info("vocab_size %d does not divide by tp %d: embedding and LM head replicated",
                 cfg.vocab_size, tp)
    return rules


def spec(names, rules: dict) -> P:
    return P(*(rules[n] for n in names))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def kv_cache_sharding(mesh: Mesh) -> NamedSharding:
    """[Hkv, N, B, D] split on the KV heads."""
    return NamedSharding(mesh, P(TP))


def logical_names(state) -> dict[tuple, tuple]:
    """Parameter path -> its logical axis names (the nnx.Param `out_sharding` metadata)."""
    from flax import nnx

    return {tuple(path): var.get_metadata()["out_sharding"]
            for path, var in nnx.to_flat_state(state)}


def put(value, sharding: NamedSharding, dtype) -> jax.Array:
    """A host array onto its shards: each device receives only its slice (no whole copy on any
    device); in a multi-process mesh every process supplies its own devices' slices."""
    value = np.asarray(value)
    dtype = np.dtype(dtype)
    return jax.make_array_from_callback(value.shape, sharding,
                                        lambda index: np.asarray(value[index], dtype))


def repeat_kv_heads(value: np.ndarray, repeat: int, head_dim: int) -> np.ndarray:
    """[..., Hkv * D] -> [..., Hkv * repeat * D], each head repeated in place (head h of the
    result is head h // repeat of the input)."""
    if repeat == 1:
        return value
    lead = value.shape[:-1]
    heads = value.reshape(*lead, -1, head_dim)
    return np.repeat(heads, repeat, axis=-2).reshape(*lead, -1)


def is_kv_projection(path: tuple) -> bool:
    parts = [str(p) for p in path]
    return len(parts) >= 2 and parts[-2] in ("k_proj", "v_proj")


def shard_model(model, mesh: Mesh):
    """A LoadedModel whose parameters sit on the mesh. A model loaded for this mesh is returned
    as is; an unsharded one (e.g. loaded with mesh=None) is placed parameter by parameter."""
    from flax import nnx

    from paged_jax.models.llama import abstract_model

    tp = tp_size(mesh)
    if all(isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding)
           and x.sharding.mesh == mesh for x in jax.tree.leaves(model.params)):
        return model
    cfg, repeat = tp_model_config(model.config, tp)
    rules = rules_for(cfg, tp)
    graphdef, state = nnx.split(abstract_model(cfg))
    names = logical_names(state)
    old = {tuple(p): v for p, v in nnx.to_flat_state(model.params)}
    pure = nnx.to_pure_dict(state)

    def fill(tree, prefix):
        for key, node in tree.items():
            path = prefix + (key,)
            if isinstance(node, dict):
                fill(node, path)
                continue
            value = np.asarray(old[path][...])
            if is_kv_projection(path):
                value = repeat_kv_heads(value, repeat, cfg.head_dim)
            tree[key] = put(value, NamedSharding(mesh, spec(names[path], rules)), cfg.dtype)

    fill(pure, ())
    nnx.replace_by_pure_dict(state, pure)
    return dataclasses.replace(model, config=cfg, graphdef=graphdef, params=state)


# ---- attention under shard_map ---------------------------------------------------------------

def attention_per_kv_head(fn, q, k, v, kv_cache, md, **kwargs):
    """fn(q, k, v, kv_cache, md, **kwargs) on each device's KV heads when traced under a mesh
    with tp > 1 (jax.set_mesh, as the ModelRunner lowers its steps); fn itself otherwise.

    q [T, Hq, D] and k, v [T, Hkv, D] split on axis 1, the caches [Hkv, N, B, D] on axis 0,
    the metadata replicated: attention never mixes KV head groups, so no collective runs."""
    mesh = jax.sharding.get_abstract_mesh()
    if kv_cache is None or mesh.empty or TP not in mesh.axis_names or mesh.shape[TP] == 1:
        return fn(q, k, v, kv_cache, md, **kwargs)
    heads, cache = P(None, TP, None), P(TP)
    per_shard = jax.shard_map(functools.partial(fn, **kwargs), mesh=mesh,
                              in_specs=(heads, heads, heads, (cache, cache), P()),
                              out_specs=(heads, (cache, cache)), check_vma=False)
    return per_shard(q, k, v, tuple(kv_cache), md)
