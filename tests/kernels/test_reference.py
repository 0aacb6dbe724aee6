"""The jnp references in pallas_kernels/reference.py equal the NumPy reference."""
import jax.numpy as jnp
import numpy as np
import pytest

import kernel_testing as kt
from pallas_kernels import paged_attention_reference, ragged_paged_attention_reference


def test_decode_reference_matches_numpy():
  rng = np.random.default_rng(0)
  lens = np.array([29, 1, 16, 0], np.int32)
  case = kt.make_case(rng, num_kv_heads=3, head_size=80, block_size=8, dtype=jnp.float32,
                      seq_lens=lens)
  q = kt.random_q(rng, 4, 9, 80, jnp.float32)
  out = paged_attention_reference(q, case.k_cache, case.v_cache,
                                  jnp.asarray(case.block_tables), jnp.asarray(lens), scale=0.1)
  np.testing.assert_allclose(np.asarray(out), kt.decode_reference_np(q, case, 0.1),
                             atol=1e-5, rtol=1e-5)


def test_ragged_reference_matches_numpy():
  rng = np.random.default_rng(1)
  lens = np.array([20, 1, 9, 0], np.int32)
  q_lens = np.array([1, 1, 5, 0], np.int32)  # decode, one-token prompt, chunk, padding
  query_start_loc = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
  case = kt.make_case(rng, num_kv_heads=2, head_size=64, block_size=8, dtype=jnp.float32,
                      seq_lens=lens)
  q = kt.random_q(rng, 9, 4, 64, jnp.float32)  # 2 padding tokens at the end
  out = ragged_paged_attention_reference(
      q, case.k_cache, case.v_cache, jnp.asarray(case.block_tables), jnp.asarray(lens),
      jnp.asarray(query_start_loc), scale=0.125)
  expected = kt.ragged_reference_np(q, case, query_start_loc, 0.125)
  np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- softcap and sliding window

FEATURES = [dict(softcap=1.5), dict(sliding_window=5), dict(softcap=1.5, sliding_window=19)]


def _dense_np(q, keys, values, positions, scale, softcap=None, sliding_window=None):
  """Dense attention of one sequence's queries in float64: q [n, Hq, D] at `positions` [n];
  keys, values [L, Hkv, D] its contiguous context -> [n, Hq, D]."""
  n, num_q_heads, head_size = q.shape
  num_kv_heads = keys.shape[1]
  qg = q.reshape(n, num_kv_heads, -1, head_size)
  logits = np.einsum("nhgd,lhd->nhgl", qg, keys) * scale
  if softcap is not None:
    logits = softcap * np.tanh(logits / softcap)
  key = np.arange(len(keys))
  mask = key[None, :] <= positions[:, None]
  if sliding_window is not None:
    mask &= positions[:, None] - key[None, :] < sliding_window
  logits = np.where(mask[:, None, None, :], logits, -np.inf)
  w = np.exp(logits - logits.max(axis=-1, keepdims=True))
  w /= w.sum(axis=-1, keepdims=True)
  return np.einsum("nhgl,lhd->nhgd", w, values).reshape(q.shape)


def _contiguous_np(case, s):
  """Sequence s's keys and values [seq_len, Hkv, D] (float64), gathered token by token."""
  pos = np.arange(case.seq_lens[s])
  pages = case.block_tables[s, pos // case.k_cache.shape[2]]
  offsets = pos % case.k_cache.shape[2]
  return tuple(kt.as_f64(c)[:, pages, offsets].transpose(1, 0, 2)
               for c in (case.k_cache, case.v_cache))


@pytest.mark.parametrize("features", FEATURES, ids=lambda f: "-".join(f))
def test_decode_reference_features_match_numpy(features):
  rng = np.random.default_rng(2)
  lens = np.array([45, 1, 16, 4, 0], np.int32)
  case = kt.make_case(rng, num_kv_heads=2, head_size=32, block_size=8, dtype=jnp.float32,
                      seq_lens=lens)
  q = 3 * kt.random_q(rng, 5, 6, 32, jnp.float32)
  expected = np.zeros(q.shape)
  for s, n in enumerate(lens):
    if n:
      expected[s] = _dense_np(kt.as_f64(q[s:s + 1]), *_contiguous_np(case, s),
                              np.array([n - 1]), 0.2, **features)[0]
  args = (jnp.asarray(case.block_tables), jnp.asarray(lens))
  out = paged_attention_reference(q, case.k_cache, case.v_cache, *args, scale=0.2, **features)
  np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5, rtol=1e-5)
  plain = paged_attention_reference(q, case.k_cache, case.v_cache, *args, scale=0.2)
  assert np.abs(np.asarray(plain) - expected).max() > 0.05  # the feature is in force
  window = features.get("sliding_window")
  if window:
    k, v, tables = kt.drop_dead_blocks(case, lens - 1, window,
                                       fill=lambda shape: 1e4 * rng.standard_normal(shape))
    out = paged_attention_reference(q, k, v, tables, args[1], scale=0.2, **features)
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("features", FEATURES, ids=lambda f: "-".join(f))
def test_ragged_reference_features_match_numpy(features):
  rng = np.random.default_rng(3)
  lens = np.array([40, 1, 30, 3, 0], np.int32)
  q_lens = np.array([1, 1, 12, 3, 0], np.int32)  # decode, one-token prompt, chunk, prompt
  query_start_loc = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
  case = kt.make_case(rng, num_kv_heads=1, head_size=32, block_size=8, dtype=jnp.float32,
                      seq_lens=lens)
  q = 3 * kt.random_q(rng, 19, 4, 32, jnp.float32)  # 2 padding tokens at the end
  expected = np.zeros(q.shape)
  for s, (n, m) in enumerate(zip(lens, q_lens)):
    rows = slice(query_start_loc[s], query_start_loc[s + 1])
    if m:
      expected[rows] = _dense_np(kt.as_f64(q[rows]), *_contiguous_np(case, s),
                                 np.arange(n - m, n), 0.2, **features)
  args = (jnp.asarray(case.block_tables), jnp.asarray(lens), jnp.asarray(query_start_loc))
  out = ragged_paged_attention_reference(q, case.k_cache, case.v_cache, *args, scale=0.2,
                                         **features)
  np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5, rtol=1e-5)
  plain = ragged_paged_attention_reference(q, case.k_cache, case.v_cache, *args, scale=0.2)
  assert np.abs(np.asarray(plain) - expected).max() > 0.05  # the feature is in force
  window = features.get("sliding_window")
  if window:
    k, v, tables = kt.drop_dead_blocks(case, lens - q_lens, window,
                                       fill=lambda shape: 1e4 * rng.standard_normal(shape))
    out = ragged_paged_attention_reference(q, k, v, tables, *args[1:], scale=0.2, **features)
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5, rtol=1e-5)
