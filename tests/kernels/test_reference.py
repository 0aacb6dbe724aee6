"""The jnp references in pallas_kernels/reference.py equal the NumPy reference."""
import jax.numpy as jnp
import numpy as np

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
