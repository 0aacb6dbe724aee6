"""The engine's XLA attention paths (paged_jax/attention.py) against the float64 numpy
reference the kernels are tested with: decode over scattered pages, and mixed batches."""
import jax.numpy as jnp
import numpy as np
import pytest

import kernel_testing as kt
from paged_jax.attention import AttentionMetadata, _decode_xla, _mixed_xla


def metadata(case, query_start_loc, mode):
    return AttentionMetadata(jnp.zeros((1,), jnp.int32), jnp.asarray(query_start_loc),
                             jnp.asarray(case.seq_lens), jnp.asarray(case.block_tables),
                             jnp.zeros((1,), jnp.int32), mode, "xla")


@pytest.mark.parametrize("heads, head_size, block_size", [((9, 3), 64, 16), ((8, 8), 80, 8),
                                                          ((16, 1), 128, 32)])
def test_decode_xla_matches_numpy(heads, head_size, block_size):
    rng = np.random.default_rng(0)
    lens = kt.seq_lengths(rng, 7, 5 * block_size + 3, block_size)
    lens[-1] = 0  # a padded row
    case = kt.make_case(rng, num_kv_heads=heads[1], head_size=head_size, block_size=block_size,
                        dtype=jnp.float32, seq_lens=lens)
    q = kt.random_q(rng, len(lens), heads[0], head_size, jnp.float32)
    scale = head_size ** -0.5
    md = metadata(case, np.arange(len(lens) + 1, dtype=np.int32), "decode")
    got = _decode_xla(q, case.k_cache, case.v_cache, md, scale, None)
    np.testing.assert_allclose(kt.as_f64(got), kt.decode_reference_np(q, case, scale),
                               atol=2e-5, rtol=2e-5)


def test_mixed_xla_matches_numpy():
    rng = np.random.default_rng(1)
    block_size = 8
    lens = np.array([30, 1, 17, 9, 0], np.int32)  # chunk over a prefix, decode, prefill, ...
    qlens = np.array([6, 1, 17, 3, 0])
    qsl = np.concatenate([[0], np.cumsum(qlens)]).astype(np.int32)
    case = kt.make_case(rng, num_kv_heads=2, head_size=64, block_size=block_size,
                        dtype=jnp.float32, seq_lens=lens)
    q = kt.random_q(rng, int(qsl[-1]) + 3, 6, 64, jnp.float32)  # 3 padding tokens at the end
    got = _mixed_xla(q, case.k_cache, case.v_cache, metadata(case, qsl, "mixed"), 0.125, None)
    ref = kt.ragged_reference_np(q, case, qsl, 0.125)
    n = int(qsl[-1])
    np.testing.assert_allclose(kt.as_f64(got)[:n], ref[:n], atol=2e-5, rtol=2e-5)
    assert np.all(np.isfinite(np.asarray(got)))
