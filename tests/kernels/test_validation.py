"""The public functions reject bad shapes and dtypes with a ValueError naming the mismatch."""
import jax.numpy as jnp
import pytest

from pallas_kernels import DecodeConfig, RaggedConfig, paged_attention, ragged_paged_attention


def _args(num_seqs=2, q_heads=4, kv_heads=2, head_size=64, cache_head_size=None,
          block_size=8, dtype=jnp.float32, cache_dtype=None):
  q = jnp.zeros((num_seqs, q_heads, head_size), dtype)
  cache = jnp.zeros((kv_heads, 6, block_size, cache_head_size or head_size),
                    cache_dtype or dtype)
  return q, cache, cache, jnp.zeros((num_seqs, 3), jnp.int32), jnp.ones((num_seqs,), jnp.int32)


@pytest.mark.parametrize("kwargs,message", [
    (dict(head_size=80, cache_head_size=64), "q head size 80 != k_cache head size 64"),
    (dict(q_heads=5), "q heads 5 not a multiple of kv heads 2"),
    (dict(dtype=jnp.bfloat16, cache_dtype=jnp.float32), "q dtype bfloat16 != k_cache dtype float32"),
    (dict(block_size=12), "block size 12 must be a power of two"),
    (dict(head_size=512), "head size 512 not in"),
])
def test_decode_rejects(kwargs, message):
  with pytest.raises(ValueError, match=message):
    paged_attention(*_args(**kwargs), scale=1.0)


def test_decode_rejects_table_and_lengths():
  q, k, v, tables, lens = _args()
  with pytest.raises(ValueError, match="v_cache shape"):
    paged_attention(q, k, v[:, :3], tables, lens, scale=1.0)
  with pytest.raises(ValueError, match="block_tables must be int32"):
    paged_attention(q, k, v, tables.astype(jnp.float32), lens, scale=1.0)
  with pytest.raises(ValueError, match="seq_lens must be int32"):
    paged_attention(q, k, v, tables, lens[:1], scale=1.0)
  with pytest.raises(ValueError, match="q sequences 2 != block_tables rows 3"):
    paged_attention(q, k, v, jnp.zeros((3, 3), jnp.int32), jnp.ones((3,), jnp.int32), scale=1.0)


def test_ragged_rejects_query_start_loc():
  q, k, v, tables, lens = _args()
  with pytest.raises(ValueError, match=r"query_start_loc must be int32 \[3\]"):
    ragged_paged_attention(q, k, v, tables, lens, jnp.zeros((2,), jnp.int32), scale=1.0)


def test_configs_validate():
  with pytest.raises(ValueError, match="pages_per_compute_block must be a power of two"):
    DecodeConfig(pages_per_compute_block=3)
  with pytest.raises(ValueError, match="k_splits must be >= 1"):
    DecodeConfig(k_splits=0)
  with pytest.raises(ValueError, match="block_rows must be a power of two"):
    RaggedConfig(block_rows=24)
