"""Device storage for the paged KV cache: one (K, V) pair of block arrays per layer."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from paged_jax import kv_quant
from paged_jax.models.config import ModelConfig


def block_bytes(cfg: ModelConfig, block_size: int, kv_cache_dtype: str = "auto") -> int:
    """Bytes one block takes over all layers, K and V, as stored (kv_quant.py)."""
    return kv_quant.bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim,
                                    kv_cache_dtype, cfg.dtype) * block_size


def num_blocks_for(cfg: ModelConfig, block_size: int, memory_bytes: int,
                   kv_cache_dtype: str = "auto") -> int:
    block = block_bytes(cfg, block_size, kv_cache_dtype)
    n = memory_bytes // block
    if n < 2:
        raise ValueError(f"kv_cache_memory_bytes {memory_bytes} holds {n} blocks of "
                         f"{block} bytes; at least 2 are needed")
    return int(n)


def allocate(cfg: ModelConfig, num_blocks: int, block_size: int, sharding=None,
             kv_cache_dtype: str = "auto"):
    """[(k, v)] per layer, each [Hkv, N, B, D] (int8: D + 2, kv_quant.py). Built by a jitted
    zeros so that, with a sharding, every device materializes only its own shard."""
    dtype, extra = kv_quant.storage(kv_cache_dtype, cfg.dtype)
    shape = (cfg.num_kv_heads, num_blocks, block_size, cfg.head_dim + extra)
    make = jax.jit(lambda: [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
                            for _ in range(cfg.num_layers)],
                   out_shardings=sharding)
    return make()
