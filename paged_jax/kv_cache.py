"""Device storage for the paged KV cache: one (K, V) pair of block arrays per layer."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from paged_jax.models.config import ModelConfig


def block_bytes(cfg: ModelConfig, block_size: int) -> int:
    """Bytes one block takes over all layers, K and V."""
    return cfg.kv_bytes_per_token * block_size


def num_blocks_for(cfg: ModelConfig, block_size: int, memory_bytes: int) -> int:
    n = memory_bytes // block_bytes(cfg, block_size)
    if n < 2:
        raise ValueError(f"kv_cache_memory_bytes {memory_bytes} holds {n} blocks of "
                         f"{block_bytes(cfg, block_size)} bytes; at least 2 are needed")
    return int(n)


def allocate(cfg: ModelConfig, num_blocks: int, block_size: int, sharding=None):
    """[(k, v)] per layer, each [Hkv, N, B, D]. Built by a jitted zeros so that, with a
    sharding, every device materializes only its own shard."""
    shape = (cfg.num_kv_heads, num_blocks, block_size, cfg.head_dim)
    dtype = jnp.dtype(cfg.dtype)
    make = jax.jit(lambda: [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
                            for _ in range(cfg.num_layers)],
                   out_shardings=sharding)
    return make()
