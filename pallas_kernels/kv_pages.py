"""The page dtypes the kernels read, and what an 8-bit page means (paged_jax/kv_quant.py).

  float32, bfloat16, float16  plain values [Hkv, N, B, D], in q's dtype
  float8_e4m3fn, float8_e5m2  [Hkv, N, B, D]: value = fp8 * scale, scale the per-tensor
                              k_scale (or v_scale), a static Python float
  int8                        [Hkv, N, B, D + 2]: a row's D values, then 2 bytes holding its
                              float16 scale; value = int8 * row scale

The kernels load 8-bit pages as they are stored (8-bit memory traffic) and convert inside.
Converting an 8-bit value to q's dtype is exact (fp8 and |int8| <= 127 fit in bf16, f16 and
f32), so the kernels apply the scales to scores and probabilities instead of to each loaded
element: s_j = scale * k_scale * (q . k8_j) * kscale_j and out = v_scale * sum_j p_j vscale_j
v8_j, where kscale_j / vscale_j are int8 row scales (1 for fp8). The per-tensor scales fold
into the static softmax scale and a final multiply.

This module is plain jnp (the references dequantize with it); it does not import paged_jax.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
FP8_DTYPES = (jnp.dtype(jnp.float8_e4m3fn), jnp.dtype(jnp.float8_e5m2))
INT8 = jnp.dtype(jnp.int8)
SCALE_BYTES = 2  # an int8 row's float16 scale, after its values (kv_quant.SCALE_BYTES)


def is_fp8(dtype) -> bool:
  return jnp.dtype(dtype) in FP8_DTYPES


def is_int8(dtype) -> bool:
  return jnp.dtype(dtype) == INT8


def is_8bit(dtype) -> bool:
  return is_fp8(dtype) or is_int8(dtype)


def row_width(head_size: int, dtype) -> int:
  """The last axis of pages of `dtype` holding heads of `head_size`."""
  return head_size + SCALE_BYTES if is_int8(dtype) else head_size


def validate(q, k_cache, v_cache, k_scale: float, v_scale: float) -> None:
  """Checks q's dtype against the pages' and the scales; raises ValueError naming the
  mismatch. (Shapes and the rest: paged_attention.validate_cache_args.)"""
  if q.dtype not in FLOAT_DTYPES:
    raise ValueError(f"q dtype {q.dtype} not one of float32, bfloat16, float16")
  if k_cache.dtype != v_cache.dtype:
    raise ValueError(f"k_cache dtype {k_cache.dtype} != v_cache dtype {v_cache.dtype}")
  if not (k_cache.dtype == q.dtype or is_8bit(k_cache.dtype)):
    raise ValueError(f"q dtype {q.dtype} != k_cache dtype {k_cache.dtype}, which is not an "
                     f"8-bit page dtype either (float8_e4m3fn, float8_e5m2, int8)")
  for name, value in (("k_scale", k_scale), ("v_scale", v_scale)):
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
      raise ValueError(f"{name} must be a finite Python float > 0 (it is static), got "
                       f"{value!r}")
    # Only fp8 pages have a per-tensor scale; anything else would be silently ignored,
    # which hides a caller's mix-up.
    if value != 1.0 and not is_fp8(k_cache.dtype):
      raise ValueError(f"{name} {value} given for {k_cache.dtype} pages: only fp8 pages "
                       f"take a per-tensor scale (int8 rows carry their own)")


def int8_row_scales(pages: jax.Array, head_size: int) -> jax.Array:
  """int8 pages [..., D + 2] -> the rows' scales [...] as float32."""
  return jax.lax.bitcast_convert_type(pages[..., head_size:head_size + SCALE_BYTES],
                                      jnp.float16).astype(jnp.float32)


def half_from_bytes(low: jax.Array, high: jax.Array) -> jax.Array:
  """The float16s whose little-endian bytes are the int8s `low` and `high`, as float32 (for
  kernels, whose bitcasts are only between types of one width: Triton's, Mosaic's). The
  bytes are joined in an int32 that lies in int16's range (`high` sign-extended), so
  narrowing it to int16 is exact; that is bitcast."""
  word = (high.astype(jnp.int32) << 8) | (low.astype(jnp.int32) & 0xFF)
  return jax.lax.bitcast_convert_type(word.astype(jnp.int16),
                                      jnp.float16).astype(jnp.float32)


def dequantize(pages: jax.Array, head_size: int, scale: float = 1.0) -> jax.Array:
  """Pages of any dtype above -> float32 [..., D]; scale: fp8's per-tensor scale."""
  if is_int8(pages.dtype):
    return (pages[..., :head_size].astype(jnp.float32)
            * int8_row_scales(pages, head_size)[..., None])
  values = pages.astype(jnp.float32)
  return values * scale if is_fp8(pages.dtype) and scale != 1.0 else values
