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
    quant_groups        -> None    a quantized weight's scales [G, out] are split on out only
                                   (models/quant.py); GSPMD slices them for row-parallel layers

The KV cache [Hkv, N, B, D] is sharded on axis 0. When tp exceeds the KV head count (tp a
multiple of it), every KV head is repeated tp // Hkv times in the k/v projections at load time
(as vLLM does), so the model runs with tp KV heads, one per device: each device holds only the
KV head its q heads read, and the cache stays sharded rather than replicated.

Attention runs under shard_map over the tp axis (`attention.attention_per_kv_head`): attention is
independent per KV head group, so each device writes and attends its own heads with the XLA
path or the Pallas kernels, with no communication.
"""
from __future__ import annotations

import dataclasses
import logging

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from paged_jax.models.config import ModelConfig

log = logging.getLogger(__name__)

DP, TP = "dp", "tp"
LOGICAL_RULES = {"embed": None, "norm": None, "experts": None, "q_heads": TP, "kv_heads": TP,
                 "mlp": TP, "vocab": TP, "quant_groups": None}


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
