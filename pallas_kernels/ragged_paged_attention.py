"""Ragged paged attention: prefills, chunked prefills and decode tokens in one batch.

The flat tokens are cut into tiles of up to `block_q` consecutive queries of one sequence
(a schedule computed with jnp before the kernel). Grid (tile, KV head): a program holds
block_q tokens x the padded query heads of one KV group as the rows of one matrix, and
streams that sequence's pages up to its last query's position, reading each page once for
the whole group. Queries are the sequence's last q_len positions; masking is causal, and
with a sliding window a tile's loop starts at its first query's window.

Pages as paged_attention.py reads them: q's dtype, fp8 (per-tensor k_scale / v_scale) or
int8 rows with their scales, 8-bit pages loaded as 8-bit and converted in the kernel.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import backend, tuning
from pallas_kernels.paged_attention import (MASK_VALUE, load_page_rows, online_softmax_step,
                                            validate_cache_args, validate_features)


def _ragged_kernel(
    tile_seq_ref,         # [num_tiles]  int32, the sequence each tile belongs to
    tile_first_ref,       # [num_tiles]  int32, index of its first query within the sequence
    tile_count_ref,       # [num_tiles]  int32, its number of queries (0: unused tile)
    query_start_loc_ref,  # [S + 1]      int32
    seq_lens_ref,         # [S]          int32
    block_tables_ref,     # [S, MB]      int32
    q_ref,                # [T, G, D]    this KV group's query heads of every token
    k_ref,                # [N, B, W]    every page of this KV head (W: D, int8 D + 2)
    v_ref,                # [N, B, W]
    o_init_ref,           # [T, G, D]    zeros, aliased to o_ref (padding tokens stay 0)
    o_ref,                # [T, G, D]
    *, scale: float, v_scale: float, softcap: float | None, window: int | None,
    group_pad: int, rows: int, head_pad: int, tokens_per_step: int,
):
  # scale includes fp8's k_scale; v_scale (fp8's, else 1) multiplies the output.
  del o_init_ref
  tile = pl.program_id(0)
  _, group, head_size = q_ref.shape
  block_size = k_ref.shape[1]
  seq = tile_seq_ref[tile]
  first = tile_first_ref[tile]
  count = tile_count_ref[tile]
  q_start = query_start_loc_ref[seq]
  context_start = seq_lens_ref[seq] - (query_start_loc_ref[seq + 1] - q_start)

  # Row r of the tile is query token r // group_pad, query head r % group_pad of the group.
  row = jnp.arange(rows)
  query = row // group_pad
  head = row % group_pad
  row_ok = (query < count) & (head < group)
  token = q_start + first + query
  position = context_start + first + query
  cols = jnp.arange(head_pad)
  io_mask = row_ok[:, None] & (cols < head_size)[None, :]
  io_index = (token[:, None], head[:, None], cols[None, :])
  q = plgpu.load(q_ref.at[io_index], mask=io_mask, other=0)

  kv_end = jnp.where(count > 0, context_start + first + count, 0)
  first_step = 0
  if window is not None:
    # The first key any query of the tile sees: its first query's window start. Earlier
    # steps are skipped and earlier keys never read (their table entries may be block 0).
    kv_start = jnp.maximum(context_start + first - window + 1, 0)
    first_step = kv_start // tokens_per_step

  def body(step, carry):
    key = step * tokens_per_step + jnp.arange(tokens_per_step)
    key_ok = key < kv_end
    if window is not None:
      key_ok &= key >= kv_start
    page = plgpu.load(block_tables_ref.at[seq, key // block_size], mask=key_ok, other=0)
    k, k_rows = load_page_rows(k_ref, page, key, cols, key_ok, head_size, q.dtype)
    v, v_rows = load_page_rows(v_ref, page, key, cols, key_ok, head_size, q.dtype)
    visible = key[None, :] <= position[:, None]
    if window is not None:
      # A later query of the tile may see nothing in the first steps, summing keys at
      # exp2(MASK_VALUE - MASK_VALUE) = 1: finite (keys >= kv_start are live pages, the rest
      # load as 0), and wiped by alpha = 0 at its first visible key.
      visible &= position[:, None] - key[None, :] < window
    return online_softmax_step(q, k, v, visible, carry, scale=scale, softcap=softcap,
                               k_rows=k_rows, v_rows=v_rows)

  init = (jnp.zeros((rows, head_pad), jnp.float32),
          jnp.full((rows,), MASK_VALUE, jnp.float32),
          jnp.zeros((rows,), jnp.float32))
  acc, _, l = lax.fori_loop(first_step, pl.cdiv(kv_end, tokens_per_step), body, init)
  if v_scale != 1.0:
    acc = acc * v_scale
  out = acc / jnp.where(l == 0, 1, l)[:, None]
  plgpu.store(o_ref.at[io_index], out.astype(o_ref.dtype), mask=io_mask)


def tile_schedule(query_start_loc, num_tiles: int, block_q: int):
  """Cuts each sequence's queries into tiles of <= block_q: (seq, first, count) per tile."""
  q_lens = query_start_loc[1:] - query_start_loc[:-1]
  tiles = (q_lens + block_q - 1) // block_q
  ends = jnp.cumsum(tiles)
  t = jnp.arange(num_tiles, dtype=jnp.int32)
  used = t < ends[-1]
  seq = jnp.minimum(jnp.searchsorted(ends, t, side="right"), q_lens.shape[0] - 1)
  seq = jnp.where(used, seq, 0).astype(jnp.int32)
  first = ((t - (ends[seq] - tiles[seq])) * block_q).astype(jnp.int32)
  count = jnp.where(used, jnp.minimum(block_q, q_lens[seq] - first), 0).astype(jnp.int32)
  return seq, first, count


def num_tiles_bound(num_tokens: int, num_seqs: int, block_q: int) -> int:
  # sum_s ceil(q_s / block_q) <= (T + S (block_q - 1)) / block_q, and every tile holds a token.
  return max(1, min(num_tokens, (num_tokens + num_seqs * (block_q - 1)) // block_q))


def _ragged_call(q3, k_cache, v_cache, block_tables, seq_lens, query_start_loc, *,
                 scale, v_scale, softcap, window, config, interpret):
  """q3 [T, Hkv, G, D] -> [T, Hkv, G, D]."""
  num_tokens, num_kv_heads, group, head_size = q3.shape
  _, num_blocks, block_size, width = k_cache.shape
  num_seqs, max_blocks = block_tables.shape
  group_pad = tuning.next_pow2(group)
  rows = max(config.block_rows, 16, group_pad)  # Triton's dot needs >= 16 rows
  block_q = rows // group_pad
  num_tiles = num_tiles_bound(num_tokens, num_seqs, block_q)
  schedule = tile_schedule(query_start_loc, num_tiles, block_q)
  kernel = functools.partial(
      _ragged_kernel, scale=scale, v_scale=v_scale, softcap=softcap, window=window,
      group_pad=group_pad, rows=rows,
      head_pad=max(16, tuning.next_pow2(head_size)),
      tokens_per_step=config.pages_per_compute_block * block_size)
  whole = lambda shape: pl.BlockSpec(shape, lambda t, h: (0,) * len(shape))
  head_slice = pl.BlockSpec((num_tokens, None, group, head_size), lambda t, h: (0, h, 0, 0))
  cache_spec = pl.BlockSpec((None, num_blocks, block_size, width),
                            lambda t, h: (h, 0, 0, 0))
  return pl.pallas_call(
      kernel,
      grid=(num_tiles, num_kv_heads),
      in_specs=[
          whole((num_tiles,)),  # tile_seq
          whole((num_tiles,)),  # tile_first
          whole((num_tiles,)),  # tile_count
          whole((num_seqs + 1,)),  # query_start_loc
          whole((num_seqs,)),  # seq_lens
          whole((num_seqs, max_blocks)),  # block_tables
          head_slice,  # q: all tokens of one KV head's group; the tile's rows are gathered
          cache_spec,  # k_cache: one KV head's whole pool, pages gathered inside
          cache_spec,  # v_cache
          head_slice,  # o_init
      ],
      out_specs=head_slice,  # o: the tile's rows are scattered back with a masked store
      out_shape=jax.ShapeDtypeStruct(q3.shape, q3.dtype),
      input_output_aliases={9: 0},
      compiler_params=backend.triton_params(config.num_warps, config.num_stages),
      interpret=interpret,
      name="ragged_paged_attention",
  )(*schedule, query_start_loc, seq_lens, block_tables, q3, k_cache, v_cache,
    jnp.zeros_like(q3))


@functools.partial(jax.jit, static_argnames=("scale", "softcap", "sliding_window", "k_scale",
                                             "v_scale", "config", "interpret"))
def ragged_paged_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                           block_tables: jax.Array, seq_lens: jax.Array,
                           query_start_loc: jax.Array, *, scale: float,
                           softcap: float | None = None, sliding_window: int | None = None,
                           k_scale: float = 1.0, v_scale: float = 1.0,
                           config: tuning.RaggedConfig | None = None,
                           interpret: bool | None = None) -> jax.Array:
  """Causal attention for a flat batch of new tokens over the paged KV cache.

  q [T, Hq, D]; k_cache, v_cache [Hkv, N, B, D] (or 8-bit pages, as paged_attention takes
  them); block_tables [S, MB]; seq_lens [S];
  query_start_loc [S + 1] int32. Sequence s owns tokens query_start_loc[s]..[s+1]-1, its
  last q_len context positions (their K/V already in the cache). Returns [T, Hq, D] in q's
  dtype; tokens past query_start_loc[S] get zeros.

  softcap: the scaled scores s become softcap * tanh(s / softcap) (Gemma 2).
  sliding_window: a query at position p sees keys k with p - sliding_window < k <= p; table
  entries wholly before a sequence's first query's window are never read (they may be 0).
  k_scale, v_scale: fp8 pages' per-tensor scales (static); 1.0 for other pages.
  """
  validate_cache_args(q, k_cache, v_cache, block_tables, seq_lens, k_scale, v_scale)
  validate_features(softcap, sliding_window)
  num_seqs = block_tables.shape[0]
  if query_start_loc.shape != (num_seqs + 1,) or query_start_loc.dtype != jnp.int32:
    raise ValueError(f"query_start_loc must be int32 [{num_seqs + 1}] (sequences + 1), got "
                     f"{query_start_loc.dtype} {query_start_loc.shape}")
  num_tokens, num_q_heads, head_size = q.shape
  num_kv_heads, _, block_size, _ = k_cache.shape
  config = tuning.resolve_ragged(config, block_size=block_size, head_size=head_size)
  q3 = q.reshape(num_tokens, num_kv_heads, num_q_heads // num_kv_heads, head_size)
  out = _ragged_call(q3, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                     scale=scale * k_scale, v_scale=v_scale, softcap=softcap,
                     window=sliding_window, config=config,
                     interpret=backend.use_interpret(interpret))
  return out.reshape(q.shape)
