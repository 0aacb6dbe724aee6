"""paged_attention (decode) against the NumPy reference.

interpret=None throughout: compiled on a GPU, Pallas interpreter on the CPU.
"""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernel_testing as kt
from pallas_kernels import DecodeConfig, paged_attention, paged_attention_reference


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


# ---------------------------------------------------------------- softcap and sliding window

@pytest.mark.parametrize("heads,block_size,dtype,features,config", [
    # GQA, whole context
    ((8, 2), 8, jnp.float32, dict(softcap=2.0), None),
    # MQA, a window shorter than a block; split-K, splits wholly before the window
    ((4, 1), 16, jnp.bfloat16, dict(sliding_window=5),
     DecodeConfig(k_splits=3, pages_per_compute_block=1)),
    # both, a window over several blocks; 2 pages a step, the first one partly windowed
    ((9, 3), 8, jnp.float32, dict(softcap=2.0, sliding_window=37),
     DecodeConfig(k_splits=2, pages_per_compute_block=2)),
], ids=["gqa-softcap", "mqa-bf16-window5-splits3", "gqa-softcap-window37-splits2"])
def test_decode_features(heads, block_size, dtype, features, config):
  rng = np.random.default_rng(4)
  num_q_heads, num_kv_heads = heads
  # Longer than the window, on a block boundary, shorter than the window, one token, padding.
  lens = np.array([61, 2 * block_size, 4, 1, 0], np.int32)
  case = kt.make_case(rng, num_kv_heads=num_kv_heads, head_size=32, block_size=block_size,
                      dtype=dtype, seq_lens=lens)
  q = kt.random_q(rng, len(lens), num_q_heads, 32, dtype) * 3  # scores reach the cap
  intact = (case.k_cache, case.v_cache, jnp.asarray(case.block_tables), jnp.asarray(lens))
  ref = lambda **f: paged_attention_reference(q, *intact, scale=0.2, **f)
  expected = ref(**features)
  args = intact
  if "sliding_window" in features:
    args = (*kt.drop_dead_blocks(case, lens - 1, features["sliding_window"]), intact[3])
  out = paged_attention(q, *args, scale=0.2, config=config, **features)
  assert out.dtype == dtype
  np.testing.assert_allclose(kt.as_f64(out), np.asarray(expected), **kt.tolerance(dtype))
  for name in features:  # each feature is in force
    kt.assert_differs(out, ref(**{f: x for f, x in features.items() if f != name}), dtype)


def test_decode_features_lower_to_triton():
  # Interpret mode never meets Triton's lowering rules (tanh, a loop with a traced start).
  q = jax.ShapeDtypeStruct((3, 8, 128), jnp.bfloat16)
  cache = jax.ShapeDtypeStruct((2, 32, 16, 128), jnp.bfloat16)
  traced = paged_attention.trace(
      q, cache, cache, jax.ShapeDtypeStruct((3, 8), jnp.int32),
      jax.ShapeDtypeStruct((3,), jnp.int32), scale=0.1, softcap=50.0, sliding_window=7,
      config=DecodeConfig(k_splits=2, pages_per_compute_block=2, num_warps=4, num_stages=2),
      interpret=False)
  assert "triton" in traced.lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("features", [dict(softcap=0.0), dict(softcap=-1.0),
                                      dict(sliding_window=0)], ids=str)
def test_decode_features_validated(features):
  rng = np.random.default_rng(5)
  case = kt.make_case(rng, num_kv_heads=1, head_size=32, block_size=8, dtype=jnp.float32,
                      seq_lens=np.array([9], np.int32))
  q = kt.random_q(rng, 1, 2, 32, jnp.float32)
  with pytest.raises(ValueError, match=next(iter(features))):
    paged_attention(q, case.k_cache, case.v_cache, jnp.asarray(case.block_tables),
                    jnp.asarray(case.seq_lens), scale=0.1, **features)


def test_dispatch_features_never_reach_mosaic(monkeypatch):
  # The Mosaic GPU kernel has neither feature: with it selected, they run the Triton kernel.
  from pallas_kernels import backend, dispatch
  calls = []
  monkeypatch.setattr(backend, "COMPILED_BACKEND", backend.MOSAIC_GPU)
  monkeypatch.setattr(dispatch, "paged_attention_mgpu",
                      lambda *a, **kw: calls.append(("mgpu", kw)))
  monkeypatch.setattr(dispatch, "paged_attention", lambda *a, **kw: calls.append(("triton", kw)))
  q = jnp.zeros((2, 8, 64), jnp.bfloat16)  # a shape the Mosaic kernel takes
  cache = jnp.zeros((2, 4, 16, 64), jnp.bfloat16)
  args = (q, cache, cache, jnp.zeros((2, 2), jnp.int32), jnp.ones((2,), jnp.int32))
  dispatch.paged_decode(*args, scale=0.1)
  dispatch.paged_decode(*args, scale=0.1, softcap=50.0)
  dispatch.paged_decode(*args, scale=0.1, sliding_window=4)
  assert calls == [
      ("mgpu", dict(scale=0.1, k_scale=1.0, v_scale=1.0)),
      ("triton", dict(scale=0.1, softcap=50.0, sliding_window=None, k_scale=1.0,
                      v_scale=1.0)),
      ("triton", dict(scale=0.1, softcap=None, sliding_window=4, k_scale=1.0, v_scale=1.0))]


@pytest.mark.parametrize("features", [dict(softcap=50.0), dict(sliding_window=4)], ids=str)
def test_mosaic_refuses_features(features):
  from pallas_kernels import paged_attention_mgpu
  cache = jnp.zeros((2, 4, 16, 64), jnp.bfloat16)
  with pytest.raises(NotImplementedError, match=next(iter(features))):
    paged_attention_mgpu(jnp.zeros((2, 8, 64), jnp.bfloat16), cache, cache,
                         jnp.zeros((2, 2), jnp.int32), jnp.ones((2,), jnp.int32), scale=0.1,
                         **features)


@pytest.mark.full
@pytest.mark.parametrize("heads,head_size,block_size,dtype", list(itertools.product(
    kt.HEADS, kt.HEAD_SIZES, kt.BLOCK_SIZES, kt.DTYPES)), ids=kt.case_id)
def test_decode_full(heads, head_size, block_size, dtype):
  kt.check_decode(paged_attention, heads, head_size, block_size, dtype, num_seqs=7,
                  max_len=300, seed=head_size)
