"""Shared helpers of the kernel tests: random paged caches (8-bit pages too) and a float64
NumPy reference.

The NumPy reference walks each sequence's block table token by token, independently of the
jnp references in pallas_kernels/reference.py (which gather whole pages).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from paged_jax import kv_quant

HEADS = [(40, 40), (64, 8), (32, 8), (9, 3), (16, 1)]
HEAD_SIZES = [64, 80, 96, 128, 256]
BLOCK_SIZES = [8, 16, 32]
DTYPES = [jnp.float32, jnp.bfloat16]


def case_id(value) -> str:
  """Readable pytest ids: heads (9, 3) -> 'q9kv3', dtypes by name."""
  if isinstance(value, tuple):
    return f"q{value[0]}kv{value[1]}"
  if isinstance(value, int):
    return str(value)
  return jnp.dtype(value).name


def tolerance(dtype) -> dict:
  # bf16: the kernel feeds bf16 probabilities to the PV product (2^-8 relative rounding).
  return dict(atol=1e-3, rtol=1e-3) if dtype == jnp.float32 else dict(atol=2e-2, rtol=2e-2)


@dataclasses.dataclass
class PagedCase:
  k_cache: jax.Array      # [Hkv, N, B, D]
  v_cache: jax.Array
  block_tables: np.ndarray  # [S, MB] int32
  seq_lens: np.ndarray      # [S] int32


def seq_lengths(rng, num_seqs: int, max_len: int, block_size: int) -> np.ndarray:
  """Random in [1, max] with one at max, one at 1, and some on exact block boundaries."""
  lens = rng.integers(1, max_len + 1, size=num_seqs)
  lens[0] = max_len
  if num_seqs > 1:
    lens[1] = 1
  for i in range(2, num_seqs, 3):
    lens[i] = block_size * rng.integers(1, max_len // block_size + 1)
  return lens.astype(np.int32)


def make_case(rng, *, num_kv_heads: int, head_size: int, block_size: int, dtype,
              seq_lens: np.ndarray, spare_blocks: int = 3) -> PagedCase:
  """Caches full of random data (never zeros), tables of randomly permuted blocks >= 1."""
  blocks_needed = -(-seq_lens // block_size)
  max_blocks = int(max(blocks_needed.max(), 1))
  num_blocks = 1 + int(blocks_needed.sum()) + spare_blocks
  physical = rng.permutation(np.arange(1, num_blocks))
  tables = np.zeros((len(seq_lens), max_blocks), np.int32)
  used = 0
  for s, n in enumerate(blocks_needed):
    tables[s, :n] = physical[used:used + n]
    used += n
  shape = (num_kv_heads, num_blocks, block_size, head_size)
  k = jnp.asarray(rng.standard_normal(shape, dtype=np.float32), dtype)
  v = jnp.asarray(rng.standard_normal(shape, dtype=np.float32), dtype)
  return PagedCase(k, v, tables, np.asarray(seq_lens, np.int32))


# 8-bit KV pages (kv_quant.py). name: (page dtype, k_scale, v_scale); fp8 scales away from 1
# (and unlike for K and V) so a scale that goes missing, or lands on the wrong one of K and
# V, shows. (int8 rows carry their own scales: 1.0, the only ones its readers take.)
PAGES_8BIT = {
    "fp8_e4m3": (jnp.float8_e4m3fn, 0.05, 3.0),
    "fp8_e5m2": (jnp.float8_e5m2, 3.0, 0.05),
    "int8": (jnp.int8, 1.0, 1.0),
}


@dataclasses.dataclass
class QuantCase:
  k: jax.Array          # pages as stored
  v: jax.Array
  exact: PagedCase      # the float32 values they were quantized from
  read: PagedCase       # the stored pages dequantized: what a kernel must see
  k_scale: float
  v_scale: float
  qsl: np.ndarray | None = None  # query_start_loc, for cases of ragged batches

  def args(self):
    """(k, v, block_tables, seq_lens): the decode kernels' page arguments, after q."""
    return self.k, self.v, jnp.asarray(self.read.block_tables), jnp.asarray(self.read.seq_lens)


def quantize_case(exact: PagedCase, dtype, k_scale: float = 1.0, v_scale: float = 1.0,
                  qsl=None) -> QuantCase:
  """A float32 case's caches stored as `dtype` pages, and the case as those pages read back."""
  head_size = exact.k_cache.shape[-1]
  k = kv_quant.quantize(exact.k_cache, dtype, k_scale)
  v = kv_quant.quantize(exact.v_cache, dtype, v_scale)
  read = dataclasses.replace(exact, k_cache=kv_quant.dequantize(k, head_size, k_scale),
                             v_cache=kv_quant.dequantize(v, head_size, v_scale))
  return QuantCase(k, v, exact, read, k_scale, v_scale, qsl)


def quant_case(rng, page, heads, head_size: int, block_size: int, seq_lens, *, qsl=None,
               outlier: bool = False) -> QuantCase:
  """Random float32 pages (randomly placed, make_case) quantized as `page`, a (page dtype,
  k_scale, v_scale) entry of PAGES_8BIT or the like. outlier: one channel of every row 16x
  the others, as real keys have: int8's row scale then rounds the rest coarsely enough for
  the quantization to show through a 16-bit kernel's own rounding."""
  exact = make_case(rng, num_kv_heads=heads[1], head_size=head_size, block_size=block_size,
                    dtype=jnp.float32, seq_lens=seq_lens)
  if outlier:
    exact = dataclasses.replace(exact, k_cache=exact.k_cache.at[..., 3].multiply(16),
                                v_cache=exact.v_cache.at[..., 3].multiply(16))
  return quantize_case(exact, *page, qsl=qsl)


def random_q(rng, num_tokens: int, num_q_heads: int, head_size: int, dtype) -> jax.Array:
  return jnp.asarray(rng.standard_normal((num_tokens, num_q_heads, head_size), np.float32), dtype)


def _attend_np(q, keys, values, scale, softcap=None):
  """q [Hq, D]; keys, values [L, Hkv, D] -> [Hq, D] (float64); query head h uses KV head
  h // (Hq // Hkv); softcap: logits capped at +-softcap by tanh (Gemma 2)."""
  num_kv_heads = keys.shape[1]
  qg = q.reshape(num_kv_heads, -1, q.shape[-1])              # [Hkv, G, D]
  logits = np.einsum("hgd,lhd->hgl", qg, keys) * scale
  if softcap is not None:
    logits = softcap * np.tanh(logits / softcap)
  w = np.exp(logits - logits.max(axis=-1, keepdims=True))
  w /= w.sum(axis=-1, keepdims=True)
  return np.einsum("hgl,lhd->hgd", w, values).reshape(q.shape)


def _context_np(case: PagedCase, s: int, length: int):
  """Keys and values of positions 0..length-1 of sequence s: [length, Hkv, D] (float64)."""
  k = np.asarray(case.k_cache.astype(jnp.float32), np.float64)
  v = np.asarray(case.v_cache.astype(jnp.float32), np.float64)
  block_size = k.shape[2]
  pos = np.arange(length)
  blocks = case.block_tables[s, pos // block_size]
  return k[:, blocks, pos % block_size].transpose(1, 0, 2), v[:, blocks, pos % block_size].transpose(1, 0, 2)


def decode_reference_np(q, case: PagedCase, scale: float) -> np.ndarray:
  q = np.asarray(q.astype(jnp.float32), np.float64)
  out = np.zeros_like(q)
  for s, length in enumerate(case.seq_lens):
    if length:
      out[s] = _attend_np(q[s], *_context_np(case, s, int(length)), scale)
  return out


def ragged_reference_np(q, case: PagedCase, query_start_loc: np.ndarray, scale: float):
  q = np.asarray(q.astype(jnp.float32), np.float64)
  out = np.zeros_like(q)
  for s, length in enumerate(case.seq_lens):
    start, end = int(query_start_loc[s]), int(query_start_loc[s + 1])
    if end == start:
      continue
    keys, values = _context_np(case, s, int(length))
    for i, token in enumerate(range(start, end)):
      position = int(length) - (end - start) + i
      out[token] = _attend_np(q[token], keys[:position + 1], values[:position + 1], scale)
  return out


def as_f64(x) -> np.ndarray:
  return np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)


def check_decode(attend, heads, head_size, block_size, dtype, *, num_seqs, max_len,
                 seed=0, **kwargs):
  """Runs a decode kernel `attend(q, k_cache, v_cache, tables, lens, scale=, **kwargs)` on a
  random paged case and compares it with decode_reference_np."""
  rng = np.random.default_rng(seed)
  num_q_heads, num_kv_heads = heads
  lens = seq_lengths(rng, num_seqs, max_len, block_size)
  case = make_case(rng, num_kv_heads=num_kv_heads, head_size=head_size,
                   block_size=block_size, dtype=dtype, seq_lens=lens)
  q = random_q(rng, num_seqs, num_q_heads, head_size, dtype)
  scale = head_size ** -0.5
  out = attend(q, case.k_cache, case.v_cache, jnp.asarray(case.block_tables),
               jnp.asarray(case.seq_lens), scale=scale, **kwargs)
  assert out.shape == q.shape and out.dtype == q.dtype
  np.testing.assert_allclose(as_f64(out), decode_reference_np(q, case, scale),
                             **tolerance(dtype))


def assert_differs(out, other, dtype):
  """A feature must change the result by far more than the tolerance, or its test is blind."""
  assert np.abs(as_f64(out) - np.asarray(other, np.float64)).max() > 20 * tolerance(dtype)["atol"]


def drop_dead_blocks(case: PagedCase, first_positions, window: int, fill=None):
  """What the engine does to a windowed sequence: table entries of blocks wholly before its
  first query's window point at block 0. Block 0 then holds `fill` (default NaN, so a kernel
  that reads it, even masked afterwards, 0 * NaN in p @ V, fails): (k, v, tables)."""
  block_size = case.k_cache.shape[2]
  tables = case.block_tables.copy()
  for s, p in enumerate(first_positions):
    tables[s, :max(0, p - window + 1) // block_size] = 0
  assert (tables != case.block_tables).any()
  page = lambda c: c.at[:, 0].set(jnp.nan if fill is None else fill(c.shape[2:]).astype(c.dtype))
  return page(case.k_cache), page(case.v_cache), jnp.asarray(tables)
