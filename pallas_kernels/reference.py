"""Plain jnp float32 references for the paged-attention kernels (gather pages, then attend).

They take the pages the kernels take (kv_pages.py): 16/32-bit, fp8 with per-tensor k_scale /
v_scale, int8 rows with their scales, dequantized to float32 before attending."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import kv_pages


def gather_pages(cache: jax.Array, block_tables: jax.Array) -> jax.Array:
  """[Hkv, N, B, D] pages through [S, MB] tables -> contiguous [S, Hkv, MB * B, D]."""
  num_kv_heads, _, block_size, head_size = cache.shape
  num_seqs, max_blocks = block_tables.shape
  pages = cache[:, block_tables]  # [Hkv, S, MB, B, D]
  pages = pages.reshape(num_kv_heads, num_seqs, max_blocks * block_size, head_size)
  return pages.transpose(1, 0, 2, 3)


def _attend(q, k, v, mask, scale, softcap):
  """q [R, Hkv, G, D]; k, v [R, Hkv, L, D]; mask [R, L] -> [R, Hkv, G, D] float32."""
  logits = jnp.einsum("rhgd,rhld->rhgl", q, k, precision="highest") * scale
  if softcap is not None:
    logits = softcap * jnp.tanh(logits / softcap)
  logits = jnp.where(mask[:, None, None, :], logits, -jnp.inf)
  # Rows with no visible key (padding) get zeros rather than NaN.
  weights = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True, initial=-1e30))
  denom = jnp.sum(weights, axis=-1, keepdims=True)
  weights = weights / jnp.where(denom == 0, 1, denom)
  return jnp.einsum("rhgl,rhld->rhgd", weights, v, precision="highest")


def _pages(cache, head_size, scale, block_tables):
  """Dequantized float32 pages gathered through the tables: [S, Hkv, MB * B, D]."""
  return gather_pages(kv_pages.dequantize(cache, head_size, scale), block_tables)


@functools.partial(jax.jit, static_argnames=("scale", "softcap", "sliding_window", "k_scale",
                                             "v_scale"))
def paged_attention_reference(q, k_cache, v_cache, block_tables, seq_lens, *, scale: float,
                              softcap: float | None = None,
                              sliding_window: int | None = None, k_scale: float = 1.0,
                              v_scale: float = 1.0):
  """Decode attention: q [S, Hq, D] -> [S, Hq, D] float32.

  softcap: scaled scores s -> softcap * tanh(s / softcap), before masking. sliding_window:
  the query, at p = seq_len - 1, sees keys k with p - sliding_window < k <= p. k_scale,
  v_scale: fp8 pages' per-tensor scales (value = fp8 * scale)."""
  num_seqs, num_q_heads, head_size = q.shape
  num_kv_heads = k_cache.shape[0]
  k = _pages(k_cache, head_size, k_scale, block_tables)
  v = _pages(v_cache, head_size, v_scale, block_tables)
  key = jnp.arange(k.shape[2])[None, :]
  mask = key < seq_lens[:, None]
  if sliding_window is not None:
    mask &= seq_lens[:, None] - 1 - key < sliding_window
  q = q.astype(jnp.float32).reshape(num_seqs, num_kv_heads, -1, head_size)
  return _attend(q, k, v, mask, scale, softcap).reshape(num_seqs, num_q_heads, head_size)


@functools.partial(jax.jit, static_argnames=("scale", "softcap", "sliding_window", "k_scale",
                                             "v_scale"))
def ragged_paged_attention_reference(q, k_cache, v_cache, block_tables, seq_lens,
                                     query_start_loc, *, scale: float,
                                     softcap: float | None = None,
                                     sliding_window: int | None = None,
                                     k_scale: float = 1.0, v_scale: float = 1.0):
  """Ragged causal attention: q [T, Hq, D] -> [T, Hq, D] float32; padding tokens get zeros.

  softcap as in paged_attention_reference; sliding_window: the query at position p sees
  keys k with p - sliding_window < k <= p. k_scale, v_scale: fp8 pages' scales."""
  num_tokens, num_q_heads, head_size = q.shape
  num_kv_heads = k_cache.shape[0]
  num_seqs = block_tables.shape[0]
  token = jnp.arange(num_tokens)
  # Sequence of each flat token; tokens past query_start_loc[S] get index S (padding).
  seq = jnp.searchsorted(query_start_loc, token, side="right") - 1
  valid = (token < query_start_loc[-1]) & (seq < num_seqs)
  seq = jnp.clip(seq, 0, num_seqs - 1)
  q_len = query_start_loc[seq + 1] - query_start_loc[seq]
  position = seq_lens[seq] - q_len + (token - query_start_loc[seq])
  k = _pages(k_cache, head_size, k_scale, block_tables)[seq]  # [T, Hkv, L, D]
  v = _pages(v_cache, head_size, v_scale, block_tables)[seq]
  key = jnp.arange(k.shape[2])[None, :]
  mask = (key <= position[:, None]) & valid[:, None]
  if sliding_window is not None:
    mask &= position[:, None] - key < sliding_window
  q = q.astype(jnp.float32).reshape(num_tokens, num_kv_heads, -1, head_size)
  return _attend(q, k, v, mask, scale, softcap).reshape(num_tokens, num_q_heads, head_size)
