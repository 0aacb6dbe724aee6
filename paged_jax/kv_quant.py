"""8-bit KV cache pages (vLLM's kv_cache_dtype): how each dtype is stored, written and read.

  fp8, fp8_e4m3, fp8_e5m2  float8 pages [Hkv, N, B, D], per-tensor scale 1.0 (vLLM's
                           default k_scale / v_scale): a value is stored as itself in fp8
  int8                     int8 pages [Hkv, N, B, D + 4]: each (token, KV head) row holds its
                           D values quantized symmetrically to [-127, 127] and, in its last
                           4 bytes, its float32 scale (max |x| / 127), so a block stays
                           self-contained: swap, prefix sharing and copies move scales with
                           their values, and the pool is still one array per layer for K
                           and one for V
  auto (and float32, bfloat16, float16)  the model's dtype (or the one named), unscaled

Writers quantize in the step (attention.write_kv); readers dequantize the pages they gather
to float32 (xla_attention). The CPU and Pallas kernels read 16/32-bit pages only, so an
8-bit cache runs on the XLA path (plan.pick_backend refuses the others by name).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from paged_jax.config import KV_CACHE_DTYPES
_FP8 = {"fp8": jnp.float8_e4m3fn, "fp8_e4m3": jnp.float8_e4m3fn, "fp8_e5m2": jnp.float8_e5m2}
SCALE_BYTES = 4  # an int8 row's float32 scale, after its values


def storage(kv_cache_dtype: str, model_dtype: str) -> tuple[jnp.dtype, int]:
    """(the pages' dtype, the extra entries each row's last axis holds)."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got "
                         f"{kv_cache_dtype!r}")
    if kv_cache_dtype == "int8":
        return jnp.dtype(jnp.int8), SCALE_BYTES
    if kv_cache_dtype in _FP8:
        return jnp.dtype(_FP8[kv_cache_dtype]), 0
    return jnp.dtype(model_dtype if kv_cache_dtype == "auto" else kv_cache_dtype), 0


def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, kv_cache_dtype: str,
                    model_dtype: str) -> int:
    """K and V of one token over all layers, as stored (int8: with its scales)."""
    dtype, extra = storage(kv_cache_dtype, model_dtype)
    return 2 * num_layers * num_kv_heads * (head_dim + extra) * dtype.itemsize


def quantize(x: jax.Array, dtype) -> jax.Array:
    """x [..., D] in any float dtype -> rows as pages of `dtype` store them."""
    dtype = jnp.dtype(dtype)
    if dtype != jnp.int8:
        return x.astype(dtype)
    xf = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(xf), axis=-1, keepdims=True) / 127.0
    safe = jnp.where(scale > 0, scale, 1.0)  # an all-zero row: zeros, scale 0
    values = jnp.clip(jnp.round(xf / safe), -127, 127).astype(jnp.int8)
    scale_bytes = jax.lax.bitcast_convert_type(scale, jnp.int8).reshape(
        *scale.shape[:-1], SCALE_BYTES)
    return jnp.concatenate([values, scale_bytes], axis=-1)


def dequantize(pages: jax.Array, head_dim: int) -> jax.Array:
    """Pages [..., D (+ 4)] -> float32 [..., D]."""
    if pages.dtype != jnp.int8:
        return pages.astype(jnp.float32)
    scale = jax.lax.bitcast_convert_type(pages[..., head_dim:], jnp.float32)  # [...]
    return pages[..., :head_dim].astype(jnp.float32) * scale[..., None]
