"""ragged_paged_attention (mixed prefill / chunked prefill / decode) against NumPy."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernel_testing as kt
from pallas_kernels import (RaggedConfig, ragged_paged_attention,
                            ragged_paged_attention_reference)


def _mixed_batch(rng, block_size, max_len):
  """(seq_lens, query lengths): decode tokens, whole prefills, chunks over a cached prefix,
  a block-boundary prefill, a one-token prompt, and a padded sequence (0 / 0) last."""
  seq_lens = [max_len, 1, 2 * block_size, 37, 50, block_size + 1, 0]
  q_lens = [1, 1, 2 * block_size, 37, 19, block_size // 2, 0]  # decode, prefill x3, chunks
  order = [*rng.permutation(len(seq_lens) - 1), len(seq_lens) - 1]  # padding stays last
  return (np.array([seq_lens[i] for i in order], np.int32),
          np.array([q_lens[i] for i in order], np.int32))


def _check(heads, head_size, block_size, dtype, *, max_len, config=None, pad_tokens=5, seed=0):
  rng = np.random.default_rng(seed)
  num_q_heads, num_kv_heads = heads
  seq_lens, q_lens = _mixed_batch(rng, block_size, max_len)
  case = kt.make_case(rng, num_kv_heads=num_kv_heads, head_size=head_size,
                      block_size=block_size, dtype=dtype, seq_lens=seq_lens)
  query_start_loc = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
  q = kt.random_q(rng, int(query_start_loc[-1]) + pad_tokens, num_q_heads, head_size, dtype)
  scale = head_size ** -0.5
  out = ragged_paged_attention(q, case.k_cache, case.v_cache, jnp.asarray(case.block_tables),
                               jnp.asarray(case.seq_lens), jnp.asarray(query_start_loc),
                               scale=scale, config=config)
  assert out.shape == q.shape and out.dtype == q.dtype
  expected = kt.ragged_reference_np(q, case, query_start_loc, scale)
  np.testing.assert_allclose(kt.as_f64(out), expected, **kt.tolerance(dtype))


@pytest.mark.parametrize("heads,head_size,block_size,dtype", [
    ((9, 3), 80, 8, jnp.float32),
    ((16, 1), 128, 16, jnp.bfloat16),
    ((4, 4), 64, 32, jnp.float32),
], ids=kt.case_id)
def test_ragged_small(heads, head_size, block_size, dtype):
  _check(heads, head_size, block_size, dtype, max_len=70)


def test_ragged_small_tiles():
  # Tiles of 4 queries: a prefill spans many tiles, each with its own causal limit.
  _check((8, 2), 64, 8, jnp.float32, max_len=70,
         config=RaggedConfig(block_rows=16, pages_per_compute_block=2))


def test_ragged_decode_only_matches_decode_kernel():
  from pallas_kernels import paged_attention
  rng = np.random.default_rng(3)
  lens = kt.seq_lengths(rng, 5, 40, 8)
  case = kt.make_case(rng, num_kv_heads=2, head_size=64, block_size=8, dtype=jnp.float32,
                      seq_lens=lens)
  q = kt.random_q(rng, 5, 6, 64, jnp.float32)
  args = (q, case.k_cache, case.v_cache, jnp.asarray(case.block_tables), jnp.asarray(lens))
  ragged = ragged_paged_attention(*args, jnp.arange(6, dtype=jnp.int32), scale=0.125)
  decode = paged_attention(*args, scale=0.125)
  np.testing.assert_allclose(np.asarray(ragged), np.asarray(decode), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- softcap and sliding window

@pytest.mark.parametrize("heads,block_size,dtype,features,config", [
    # GQA, default tiles
    ((8, 2), 8, jnp.float32, dict(softcap=2.0), None),
    # MQA, a window shorter than a block; tiles of 4 queries, each starting at its own step
    ((4, 1), 16, jnp.bfloat16, dict(sliding_window=5),
     RaggedConfig(block_rows=16, pages_per_compute_block=1)),
    # both, a window over several blocks; 2 pages a step
    ((9, 3), 8, jnp.float32, dict(softcap=2.0, sliding_window=37),
     RaggedConfig(block_rows=16, pages_per_compute_block=2)),
], ids=["gqa-softcap", "mqa-bf16-window5-tiles4", "gqa-softcap-window37-tiles4"])
def test_ragged_features(heads, block_size, dtype, features, config):
  rng = np.random.default_rng(6)
  num_q_heads, num_kv_heads = heads
  # A decode past the window, a one-token prompt, a prompt crossing the window, a chunk over
  # a cached prefix, a prompt shorter than the window, padding.
  seq_lens = np.array([61, 1, 20, 50, 4, 0], np.int32)
  q_lens = np.array([1, 1, 20, 19, 4, 0], np.int32)
  query_start_loc = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
  case = kt.make_case(rng, num_kv_heads=num_kv_heads, head_size=32, block_size=block_size,
                      dtype=dtype, seq_lens=seq_lens)
  q = kt.random_q(rng, int(query_start_loc[-1]) + 3, num_q_heads, 32, dtype) * 3  # reach the cap
  intact = (case.k_cache, case.v_cache, jnp.asarray(case.block_tables), jnp.asarray(seq_lens),
            jnp.asarray(query_start_loc))
  ref = lambda **f: ragged_paged_attention_reference(q, *intact, scale=0.2, **f)
  expected = ref(**features)
  args = intact
  if "sliding_window" in features:
    dropped = kt.drop_dead_blocks(case, seq_lens - q_lens, features["sliding_window"])
    args = (*dropped, *intact[3:])
  out = ragged_paged_attention(q, *args, scale=0.2, config=config, **features)
  assert out.dtype == dtype
  np.testing.assert_allclose(kt.as_f64(out), np.asarray(expected), **kt.tolerance(dtype))
  for name in features:  # each feature is in force, by far more than the tolerance
    kt.assert_differs(out, ref(**{f: x for f, x in features.items() if f != name}), dtype)


def test_ragged_features_lower_to_triton():
  # Interpret mode never meets Triton's lowering rules (tanh, a loop with a traced start).
  spec = jax.ShapeDtypeStruct
  cache = spec((2, 32, 16, 128), jnp.bfloat16)
  traced = ragged_paged_attention.trace(
      spec((40, 8, 128), jnp.bfloat16), cache, cache, spec((3, 8), jnp.int32),
      spec((3,), jnp.int32), spec((4,), jnp.int32), scale=0.1, softcap=50.0,
      sliding_window=7, interpret=False,
      config=RaggedConfig(block_rows=64, pages_per_compute_block=2, num_warps=4, num_stages=2))
  assert "triton" in traced.lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.full
@pytest.mark.parametrize("heads,head_size,block_size,dtype", list(itertools.product(
    kt.HEADS, kt.HEAD_SIZES, kt.BLOCK_SIZES, kt.DTYPES)), ids=kt.case_id)
def test_ragged_full(heads, head_size, block_size, dtype):
  _check(heads, head_size, block_size, dtype, max_len=200, seed=head_size)
