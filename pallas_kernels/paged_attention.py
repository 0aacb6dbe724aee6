"""Paged decode attention: one query token per sequence, keys read through the block table.

Pages: q's dtype (float32, bfloat16, float16), float8_e4m3fn / float8_e5m2 with per-tensor
k_scale / v_scale, or int8 rows with their float16 scales (kv_pages.py). 8-bit pages are
loaded as 8-bit and converted to q's dtype in registers (exact), their scales applied to
the scores and probabilities (online_softmax_step); an int8 row's scale is read as 2 bytes
and assembled into a float16 (load_row_scales).

Grid (sequence, KV head, split): a program loads its KV group's query heads once, then
streams the pages of one slice of the context, so each page of a KV head is read once and
shared by all the query heads of its group. With k_splits > 1 the splits' partial softmax
states are merged afterwards (flash-decoding), so small batches still fill the GPU.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import backend, kv_pages, tuning

LOG2E = math.log2(math.e)
# Finite, so a row with nothing visible yields garbage-but-finite values, never NaN.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


# ---------------------------------------------------------------- kernel pieces (on refs)

def load_rows(ref, rows, cols, row_ok, num_cols):
  """Masked 2-D gather load: ref[rows[i], cols[j]] for the valid (i, j), zeros elsewhere.

  Triton tensors must have power-of-two sizes, so head counts and head sizes such as 80
  are padded to the next power of two here and masked.
  """
  mask = row_ok[:, None] & (cols < num_cols)[None, :]
  return plgpu.load(ref.at[rows[:, None], cols[None, :]], mask=mask, other=0)


def load_kv(cache_ref, page, token, cols, token_ok, head_size):
  """Gathers K or V of `token` (positions in pages `page`) from [N, B, W] -> [len, Dp], in
  the pages' dtype (8-bit pages are read as 8-bit)."""
  block_size = cache_ref.shape[1]
  mask = token_ok[:, None] & (cols < head_size)[None, :]
  index = (page[:, None], (token % block_size)[:, None], cols[None, :])
  # A zero of the pages' dtype: Triton's lowering casts no integer to fp8.
  return plgpu.load(cache_ref.at[index], mask=mask, other=jnp.zeros((), cache_ref.dtype))


def load_row_scales(cache_ref, page, token, token_ok, head_size):
  """int8 pages [N, B, D + 2]: the scales of `token`'s rows as float32 -> [len] (0 where
  not token_ok).

  Triton bitcasts only between types of one width, so the 2 little-endian scale bytes are
  loaded as 2 byte columns and assembled into a float16 (kv_pages.half_from_bytes)."""
  block_size = cache_ref.shape[1]
  row = (page, token % block_size)
  low, high = (plgpu.load(cache_ref.at[(*row, head_size + i)], mask=token_ok, other=0)
               for i in range(kv_pages.SCALE_BYTES))
  return kv_pages.half_from_bytes(low, high)


def load_page_rows(cache_ref, page, token, cols, token_ok, head_size, dtype):
  """K or V rows of `token` as `dtype` [len, Dp] (exact for 8-bit pages), and their int8
  row scales [len] float32, or None for pages without them."""
  rows = load_kv(cache_ref, page, token, cols, token_ok, head_size).astype(dtype)
  if not kv_pages.is_int8(cache_ref.dtype):
    return rows, None
  return rows, load_row_scales(cache_ref, page, token, token_ok, head_size)


def online_softmax_step(q, k, v, visible, carry, *, scale, softcap=None, k_rows=None,
                        v_rows=None):
  """One flash-attention step in float32, in base 2 (scores are pre-multiplied by log2 e).

  k_rows, v_rows: int8 pages' row scales [len] (None: 1). A key's scale multiplies its
  score column and a value's scale its probability column, which is the same as scaling
  the rows themselves, at a [rows, len] multiply instead of a [len, D] one."""
  acc, m_prev, l_prev = carry
  s = plgpu.dot(q, k, trans_b=True, precision=lax.Precision.HIGHEST)
  if k_rows is not None:
    s = s * k_rows[None, :]
  if softcap is None:
    s = s * (scale * LOG2E)
  else:
    # softcap * tanh(scale * qk / softcap) is capped in natural units; only then to base 2.
    s = jnp.tanh(s * (scale / softcap)) * (softcap * LOG2E)
  s = jnp.where(visible, s, MASK_VALUE)
  m_next = jnp.maximum(m_prev, s.max(axis=1))
  alpha = jnp.exp2(m_prev - m_next)
  p = jnp.exp2(s - m_next[:, None])
  l_next = alpha * l_prev + p.sum(axis=1)
  if v_rows is not None:
    p = p * v_rows[None, :]
  pv = plgpu.dot(p.astype(v.dtype), v, precision=lax.Precision.HIGHEST)
  return acc * alpha[:, None] + pv, m_next, l_next


def _decode_kernel(
    block_tables_ref,  # [MB]       int32, this sequence's row
    seq_lens_ref,      # [S]        int32, all of them (read at program_id(0))
    q_ref,             # [G, D]     this sequence's query heads of this KV group
    k_ref,             # [N, B, W]  every page of this KV head (W: D, int8 D + 2)
    v_ref,             # [N, B, W]
    o_ref,             # [G, D]     k_splits == 1: normalised output; else unnormalised f32
    *stat_refs,        # k_splits > 1: m [G], l [G] float32 (base-2 running max, sum)
    scale: float, v_scale: float, softcap: float | None, window: int | None, rows: int,
    head_pad: int, tokens_per_step: int, tokens_per_split: int,
):
  # scale includes fp8's k_scale; v_scale (fp8's, else 1) multiplies the output.
  seq = pl.program_id(0)
  split = pl.program_id(2)
  group, head_size = q_ref.shape
  block_size = k_ref.shape[1]
  seq_len = seq_lens_ref[seq]

  row = jnp.arange(rows)
  cols = jnp.arange(head_pad)
  q = load_rows(q_ref, row, cols, row < group, head_size)

  start = split * tokens_per_split
  end = jnp.minimum(seq_len, start + tokens_per_split)
  num_steps = pl.cdiv(jnp.maximum(end - start, 0), tokens_per_step)
  first_step = 0
  if window is not None:
    # Keys before `lo` are out of the window: start at the step holding lo, so a split
    # wholly before it runs no step and leaves the empty state (m = MASK_VALUE, l = 0).
    lo = seq_len - window
    first_step = jnp.maximum(lo - start, 0) // tokens_per_step

  def body(step, carry):
    token = start + step * tokens_per_step + jnp.arange(tokens_per_step)
    token_ok = token < end
    if window is not None:
      # Never read out-of-window keys: their table entries may point at block 0.
      token_ok &= token >= lo
    page = plgpu.load(block_tables_ref.at[token // block_size], mask=token_ok, other=0)
    k, k_rows = load_page_rows(k_ref, page, token, cols, token_ok, head_size, q.dtype)
    v, v_rows = load_page_rows(v_ref, page, token, cols, token_ok, head_size, q.dtype)
    return online_softmax_step(q, k, v, token_ok[None, :], carry, scale=scale,
                               softcap=softcap, k_rows=k_rows, v_rows=v_rows)

  init = (jnp.zeros((rows, head_pad), jnp.float32),
          jnp.full((rows,), MASK_VALUE, jnp.float32),
          jnp.zeros((rows,), jnp.float32))
  acc, m, l = lax.fori_loop(first_step, num_steps, body, init)
  if v_scale != 1.0:
    acc = acc * v_scale

  out_mask = (row < group)[:, None] & (cols < head_size)[None, :]
  out_index = (row[:, None], cols[None, :])
  if stat_refs:
    m_ref, l_ref = stat_refs
    plgpu.store(o_ref.at[out_index], acc, mask=out_mask)
    plgpu.store(m_ref.at[row], m, mask=row < group)
    plgpu.store(l_ref.at[row], l, mask=row < group)
  else:
    out = acc / jnp.where(l == 0, 1, l)[:, None]  # l == 0 only for empty (padded) rows
    plgpu.store(o_ref.at[out_index], out.astype(o_ref.dtype), mask=out_mask)


# ---------------------------------------------------------------- pallas_call wrapper

def _decode_call(q4, k_cache, v_cache, block_tables, seq_lens, *, scale, v_scale, softcap,
                 window, config, interpret):
  """q4 [S, Hkv, G, D] -> out [S, Hkv, G, D] (k_splits == 1) or partial (o, m, l)."""
  num_seqs, num_kv_heads, group, head_size = q4.shape
  _, num_blocks, block_size, width = k_cache.shape
  max_blocks = block_tables.shape[1]
  splits = config.k_splits
  tokens_per_step = config.pages_per_compute_block * block_size
  steps_per_split = pl.cdiv(pl.cdiv(max_blocks * block_size, tokens_per_step), splits)
  kernel = functools.partial(
      _decode_kernel, scale=scale, v_scale=v_scale, softcap=softcap, window=window,
      rows=max(16, tuning.next_pow2(group)),  # Triton's dot needs >= 16 rows
      head_pad=max(16, tuning.next_pow2(head_size)),
      tokens_per_step=tokens_per_step,
      tokens_per_split=steps_per_split * tokens_per_step)
  cache_spec = pl.BlockSpec((None, num_blocks, block_size, width),
                            lambda s, h, k: (h, 0, 0, 0))
  in_specs = [
      pl.BlockSpec((None, max_blocks), lambda s, h, k: (s, 0)),  # block_tables: one row
      pl.BlockSpec((num_seqs,), lambda s, h, k: (0,)),  # seq_lens: whole (tiny)
      pl.BlockSpec((None, None, group, head_size), lambda s, h, k: (s, h, 0, 0)),  # q
      cache_spec,  # k_cache: one KV head's whole pool, pages gathered inside
      cache_spec,  # v_cache
  ]
  if splits == 1:
    out_specs = pl.BlockSpec((None, None, group, head_size), lambda s, h, k: (s, h, 0, 0))
    out_shape = jax.ShapeDtypeStruct(q4.shape, q4.dtype)
  else:
    out_specs = [
        pl.BlockSpec((None, None, None, group, head_size),
                     lambda s, h, k: (k, s, h, 0, 0)),  # o: per split, unnormalised
        pl.BlockSpec((None, None, None, group), lambda s, h, k: (k, s, h, 0)),  # m
        pl.BlockSpec((None, None, None, group), lambda s, h, k: (k, s, h, 0)),  # l
    ]
    out_shape = [jax.ShapeDtypeStruct((splits, *q4.shape), jnp.float32),
                 jax.ShapeDtypeStruct((splits, *q4.shape[:3]), jnp.float32),
                 jax.ShapeDtypeStruct((splits, *q4.shape[:3]), jnp.float32)]
  return pl.pallas_call(
      kernel,
      grid=(num_seqs, num_kv_heads, splits),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=backend.triton_params(config.num_warps, config.num_stages),
      interpret=interpret,
      name="paged_attention_decode",
  )(block_tables, seq_lens, q4, k_cache, v_cache)


def merge_splits(o, m, l):
  """Merges per-split (unnormalised o, base-2 max m, sum l) along axis 0."""
  m_all = m.max(axis=0)
  weight = jnp.exp2(m - m_all[None])
  l_all = (l * weight).sum(axis=0)
  o_all = (o * weight[..., None]).sum(axis=0)
  return o_all / jnp.where(l_all == 0, 1, l_all)[..., None]


# ---------------------------------------------------------------- validation

def validate_cache_args(q, k_cache, v_cache, block_tables, seq_lens, k_scale=1.0,
                        v_scale=1.0):
  """Checks what the decode and ragged kernels share; raises ValueError naming the
  mismatch."""
  if q.ndim != 3:
    raise ValueError(f"q must be 3-D [tokens, q heads, head size], got shape {q.shape}")
  if k_cache.ndim != 4:
    raise ValueError(f"k_cache must be 4-D [kv heads, blocks, block size, head size], "
                     f"got shape {k_cache.shape}")
  if v_cache.shape != k_cache.shape:
    raise ValueError(f"v_cache shape {v_cache.shape} != k_cache shape {k_cache.shape}")
  kv_pages.validate(q, k_cache, v_cache, k_scale, v_scale)
  head_size = q.shape[2]
  width = kv_pages.row_width(head_size, k_cache.dtype)
  if k_cache.shape[3] != width:
    if kv_pages.is_int8(k_cache.dtype):
      raise ValueError(f"int8 k_cache rows of {k_cache.shape[3]} bytes != q head size "
                       f"{head_size} + {kv_pages.SCALE_BYTES} (the values, then a float16 "
                       f"scale)")
    raise ValueError(f"q head size {head_size} != k_cache head size {k_cache.shape[3]}")
  if q.shape[1] % k_cache.shape[0]:
    raise ValueError(f"q heads {q.shape[1]} not a multiple of kv heads {k_cache.shape[0]}")
  block_size = k_cache.shape[2]
  if block_size & (block_size - 1) or not 1 <= block_size <= 256:
    raise ValueError(f"block size {block_size} must be a power of two <= 256")
  if not 16 <= head_size <= 256:
    raise ValueError(f"head size {head_size} not in [16, 256]")
  if block_tables.ndim != 2 or block_tables.dtype != jnp.int32:
    raise ValueError(f"block_tables must be int32 [S, MB], got {block_tables.dtype} "
                     f"{block_tables.shape}")
  if seq_lens.shape != block_tables.shape[:1] or seq_lens.dtype != jnp.int32:
    raise ValueError(f"seq_lens must be int32 [{block_tables.shape[0]}] like block_tables' "
                     f"rows, got {seq_lens.dtype} {seq_lens.shape}")


def validate_features(softcap, sliding_window):
  """Checks the optional attention features; raises ValueError naming the bad one."""
  if softcap is not None and not softcap > 0:
    raise ValueError(f"softcap must be > 0, got {softcap}")
  if sliding_window is not None and (int(sliding_window) != sliding_window
                                     or sliding_window < 1):
    raise ValueError(f"sliding_window must be an integer >= 1, got {sliding_window}")


# ---------------------------------------------------------------- public function

@functools.partial(jax.jit, static_argnames=("scale", "softcap", "sliding_window", "k_scale",
                                             "v_scale", "config", "interpret"))
def paged_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                    block_tables: jax.Array, seq_lens: jax.Array, *, scale: float,
                    softcap: float | None = None, sliding_window: int | None = None,
                    k_scale: float = 1.0, v_scale: float = 1.0,
                    config: tuning.DecodeConfig | None = None,
                    interpret: bool | None = None) -> jax.Array:
  """Decode attention over the paged KV cache.

  q [S, Hq, D] float32, bfloat16 or float16; k_cache, v_cache [Hkv, N, B, D] in q's dtype,
  float8_e4m3fn or float8_e5m2 (value = fp8 * k_scale, or v_scale), or int8 [Hkv, N, B,
  D + 2] (each row's D values and its float16 scale; kv_pages.py); block_tables [S, MB]
  int32; seq_lens [S] int32 (0 for padded rows, whose output is zeros). Returns [S, Hq, D]
  in q's dtype: softmax(scale * q k^T) v over key positions 0..seq_lens[s]-1.

  softcap: the scaled scores s become softcap * tanh(s / softcap) (Gemma 2).
  sliding_window: only the last sliding_window positions are attended to; table entries
  before them are never read (they may be 0).
  k_scale, v_scale: fp8 pages' per-tensor scales (static); 1.0 for other pages.
  """
  validate_cache_args(q, k_cache, v_cache, block_tables, seq_lens, k_scale, v_scale)
  validate_features(softcap, sliding_window)
  if q.shape[0] != block_tables.shape[0]:
    raise ValueError(f"q sequences {q.shape[0]} != block_tables rows {block_tables.shape[0]}")
  num_seqs, num_q_heads, head_size = q.shape
  num_kv_heads, _, block_size, _ = k_cache.shape
  config = tuning.resolve_decode(
      config, num_seqs=num_seqs, num_kv_heads=num_kv_heads,
      max_blocks=block_tables.shape[1], block_size=block_size, head_size=head_size)
  q4 = q.reshape(num_seqs, num_kv_heads, num_q_heads // num_kv_heads, head_size)
  out = _decode_call(q4, k_cache, v_cache, block_tables, seq_lens, scale=scale * k_scale,
                     v_scale=v_scale, softcap=softcap, window=sliding_window, config=config,
                     interpret=backend.use_interpret(interpret))
  if config.k_splits > 1:
    out = merge_splits(*out)
  return out.reshape(q.shape).astype(q.dtype)
