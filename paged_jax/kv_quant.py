"""8-bit KV cache pages (vLLM's kv_cache_dtype): how each dtype is stored, written and read.

  fp8, fp8_e4m3, fp8_e5m2  float8 pages [Hkv, N, B, D] with a per-tensor scale per layer for
                           K and one for V (vLLM's k_scale / v_scale): x is stored as
                           x / scale in fp8, saturated at the format's largest finite
                           value, and read as fp8 * scale. The scales are 1.0 unless
                           calculate_kv_scales calibrates them (kv_scales.py); they are
                           static numbers of the compiled step
  int8                     int8 pages [Hkv, N, B, D + 2]: each (token, KV head) row holds its
                           D values quantized symmetrically to [-127, 127] and, in its last
                           2 bytes, its float16 scale (max |x| / 127, rounded to float16;
                           the values are quantized against the rounded scale, so its
                           rounding costs nothing), so a block stays self-contained: swap,
                           prefix sharing and copies move scales with their values, and the
                           pool is still one array per layer for K and one for V. A float16
                           rather than a float32 scale: rows of D + 2 bytes hold 1.94x the
                           bfloat16 tokens at head size 64, D + 4 only 1.88x
  auto (and float32, bfloat16, float16)  the model's dtype (or the one named), unscaled

Writers quantize in the step (attention.write_kv); every reader dequantizes the pages it
reads to float32: the XLA paths (xla_attention), the CPU kernel and the Pallas kernels.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from paged_jax.config import KV_CACHE_DTYPES
_FP8 = {"fp8": jnp.float8_e4m3fn, "fp8_e4m3": jnp.float8_e4m3fn, "fp8_e5m2": jnp.float8_e5m2}
SCALE_BYTES = 2  # an int8 row's float16 scale, after its values


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


def quantize(x: jax.Array, dtype, scale: float = 1.0) -> jax.Array:
    """x [..., D] in any float dtype -> rows as pages of `dtype` store them. scale: fp8's
    per-tensor scale (int8 rows carry their own; 16/32-bit pages take none)."""
    dtype = jnp.dtype(dtype)
    if is_fp8(dtype):
        # Saturate: a value past the format's range would otherwise become NaN (e4m3fn has
        # no infinity), and one NaN in a page poisons every query that reads it.
        top = float(jnp.finfo(dtype).max)
        return jnp.clip(x.astype(jnp.float32) / scale, -top, top).astype(dtype)
    if dtype != jnp.int8:
        return x.astype(dtype)
    xf = x.astype(jnp.float32)
    top = float(jnp.finfo(jnp.float16).max)  # (a row past 127 x that saturates)
    scale = jnp.minimum(jnp.max(jnp.abs(xf), axis=-1, keepdims=True) / 127.0,
                        top).astype(jnp.float16)
    # Against the stored (rounded) scale, so that values x scale is what the row reads back.
    # (Rows under ~7.8e-3 get a subnormal float16 scale, coarser than max / 127, and rows
    # under ~3.8e-6 read back as zeros: errors of that size at most.)
    wide = scale.astype(jnp.float32)
    safe = jnp.where(wide > 0, wide, 1.0)  # an all-zero (or underflowing) row: zeros
    values = jnp.clip(jnp.round(xf / safe), -127, 127).astype(jnp.int8)
    scale_bytes = jax.lax.bitcast_convert_type(scale, jnp.int8).reshape(
        *scale.shape[:-1], SCALE_BYTES)
    return jnp.concatenate([values, scale_bytes], axis=-1)


_SAME_WIDTH_UINT = {1: jnp.uint8, 2: jnp.uint16}


def widened_by_cpu_scatter(dtype) -> bool:
    """XLA's CPU scatter on 8- and 16-bit floats widens the whole operand to float32 and
    back: a copy of the pool per write."""
    dtype = jnp.dtype(dtype)
    return jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4


def set_rows(pages: jax.Array, index, values: jax.Array) -> jax.Array:
    """pages.at[index].set(values) (values in pages' dtype). 8- and 16-bit float pages are
    scattered as same-width integers: XLA's CPU still copies the pool through the bitcasts
    (~10x less than its widening). The cache writes of a step on the CPU avoid both
    (attention.write_kv: an in-place write by the CPU kernel library); swap-in uses this."""
    dtype = pages.dtype
    if not widened_by_cpu_scatter(dtype):
        return pages.at[index].set(values)
    uint = _SAME_WIDTH_UINT[dtype.itemsize]
    out = jax.lax.bitcast_convert_type(pages, uint).at[index].set(
        jax.lax.bitcast_convert_type(values.astype(dtype), uint))
    return jax.lax.bitcast_convert_type(out, dtype)


def is_fp8(dtype) -> bool:
    return jnp.dtype(dtype) in (jnp.dtype(jnp.float8_e4m3fn), jnp.dtype(jnp.float8_e5m2))


def dequantize(pages: jax.Array, head_dim: int, scale: float = 1.0) -> jax.Array:
    """Pages [..., D (+ 2)] -> float32 [..., D]; scale: fp8's per-tensor scale."""
    if is_fp8(pages.dtype):
        values = pages.astype(jnp.float32)
        return values if scale == 1.0 else values * scale
    if pages.dtype != jnp.int8:
        return pages.astype(jnp.float32)
    scale = jax.lax.bitcast_convert_type(pages[..., head_dim:], jnp.float16)  # [...]
    return pages[..., :head_dim].astype(jnp.float32) * scale.astype(jnp.float32)[..., None]
