"""paged_attention (decode) against the NumPy reference.

interpret=None throughout: compiled on a GPU, Pallas interpreter on the CPU.
"""
import itertools

import jax.numpy as jnp
import numpy as np
import pytest

import kernel_testing as kt
from pallas_kernels import DecodeConfig, paged_attention


# The default (CI, CPU-interpreter) subset: tiny shapes, every odd corner at least once.
@pytest.mark.parametrize("heads,head_size,block_size,dtype", [
    ((9, 3), 80, 8, jnp.float32),     # GQA ratio 3 (padded to 16 rows), head size padded to 128
    ((16, 1), 64, 16, jnp.bfloat16),  # MQA
    ((4, 4), 96, 32, jnp.float32),    # MHA, head size 96
], ids=kt.case_id)
def test_decode_small(heads, head_size, block_size, dtype):
  kt.check_decode(paged_attention, heads, head_size, block_size, dtype, num_seqs=4,
                  max_len=3 * block_size + 5)


@pytest.mark.parametrize("k_splits", [1, 3])
def test_decode_split_k(k_splits):
  # Splits that end up empty for short sequences must not disturb the merge.
  kt.check_decode(paged_attention, (8, 2), 64, 8, jnp.float32, num_seqs=3, max_len=61,
                  config=DecodeConfig(k_splits=k_splits, pages_per_compute_block=2))


def test_decode_padded_rows_are_zero():
  rng = np.random.default_rng(1)
  case = kt.make_case(rng, num_kv_heads=2, head_size=64, block_size=8, dtype=jnp.float32,
                      seq_lens=np.array([13, 0, 0], np.int32))
  q = kt.random_q(rng, 3, 4, 64, jnp.float32)
  out = paged_attention(q, case.k_cache, case.v_cache, jnp.asarray(case.block_tables),
                        jnp.asarray(case.seq_lens), scale=0.125)
  assert np.all(np.isfinite(np.asarray(out)))
  np.testing.assert_array_equal(np.asarray(out[1:]), 0)


@pytest.mark.full
@pytest.mark.parametrize("heads,head_size,block_size,dtype", list(itertools.product(
    kt.HEADS, kt.HEAD_SIZES, kt.BLOCK_SIZES, kt.DTYPES)), ids=kt.case_id)
def test_decode_full(heads, head_size, block_size, dtype):
  kt.check_decode(paged_attention, heads, head_size, block_size, dtype, num_seqs=7,
                  max_len=300, seed=head_size)
