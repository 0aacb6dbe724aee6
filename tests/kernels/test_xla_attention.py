"""The engine's XLA attention paths (paged_jax/attention.py) against the float64 numpy
reference the kernels are tested with: decode over scattered pages, tiled prefill, prefill
steps with decode rows, and mixed batches."""
import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

import kernel_testing as kt
from paged_jax.attention import AttentionMetadata, attention
from paged_jax.xla_attention import decode, mixed, prefill_dense, prefill_tiled


def metadata(case, query_start_loc, mode):
    return AttentionMetadata(jnp.zeros((1,), jnp.int32), jnp.asarray(query_start_loc),
                             jnp.asarray(case.seq_lens), jnp.asarray(case.block_tables),
                             jnp.zeros((1,), jnp.int32), mode, "xla")


@pytest.mark.parametrize("heads, head_size, block_size, softcap", [
    ((9, 3), 64, 16, None), ((8, 8), 80, 8, None), ((16, 1), 128, 32, None),
    ((9, 3), 64, 16, 0.5)])
def test_decode_xla_matches_numpy(heads, head_size, block_size, softcap):
    rng = np.random.default_rng(0)
    lens = kt.seq_lengths(rng, 7, 5 * block_size + 3, block_size)
    lens[-1] = 0  # a padded row
    case = kt.make_case(rng, num_kv_heads=heads[1], head_size=head_size, block_size=block_size,
                        dtype=jnp.float32, seq_lens=lens)
    q = kt.random_q(rng, len(lens), heads[0], head_size, jnp.float32)
    scale = head_size ** -0.5
    md = metadata(case, np.arange(len(lens) + 1, dtype=np.int32), "decode")
    got = kt.as_f64(decode(q, case.k_cache, case.v_cache, md, scale, None, softcap=softcap))
    q64 = kt.as_f64(q)
    for s, length in enumerate(lens):
        if length:
            ref = kt._attend_np(q64[s], *kt._context_np(case, s, int(length)), scale,
                                softcap=softcap)
            np.testing.assert_allclose(got[s], ref, atol=2e-5, rtol=2e-5)
    if softcap is not None:  # (a cap this low changes every row)
        plain = kt.as_f64(decode(q, case.k_cache, case.v_cache, md, scale, None))
        assert not np.allclose(got[:-1], plain[:-1], atol=1e-4)


@pytest.mark.parametrize("tile, window, softcap", [(32, None, None), (8, None, None),
                                                   (8, 13, None), (8, 13, 2.0)])
def test_mixed_xla_matches_numpy(tile, window, softcap):
    """tile 8: query tiles that hold tokens of several sequences, and tiles of padding."""
    rng = np.random.default_rng(1)
    block_size = 8
    lens = np.array([30, 1, 17, 9, 0], np.int32)  # chunk over a prefix, decode, prefill, ...
    qlens = np.array([6, 1, 17, 3, 0])
    qsl = np.concatenate([[0], np.cumsum(qlens)]).astype(np.int32)
    case = kt.make_case(rng, num_kv_heads=2, head_size=64, block_size=block_size,
                        dtype=jnp.float32, seq_lens=lens)
    q = kt.random_q(rng, int(qsl[-1]) + 11, 6, 64, jnp.float32)  # 11 padding tokens at the end
    q = q * 3.0  # scores past a cap of 2
    got = kt.as_f64(mixed(q, case.k_cache, case.v_cache, metadata(case, qsl, "mixed"),
                          0.125, window, tile=tile, softcap=softcap))
    assert np.all(np.isfinite(got))
    q64 = kt.as_f64(q)
    for s, length in enumerate(lens):
        keys, values = kt._context_np(case, s, int(length))
        for i, token in enumerate(range(qsl[s], qsl[s + 1])):
            pos = int(length) - int(qlens[s]) + i
            lo = 0 if window is None else max(0, pos + 1 - window)
            ref = kt._attend_np(q64[token], keys[lo:pos + 1], values[lo:pos + 1], 0.125,
                                softcap=softcap)
            np.testing.assert_allclose(got[token], ref, atol=2e-5, rtol=2e-5)


def _new_tokens_from_cache(case, qsl, t_pad):
    """K, V [T, Hkv, D] and slots of each row's last query tokens, read from the cache (so
    writing them back changes nothing and the reference sees the same keys)."""
    b = case.k_cache.shape[2]
    slots = []
    for i, (lo, hi) in enumerate(zip(qsl[:-1], qsl[1:])):
        end = int(case.seq_lens[i])
        for pos in range(end - (hi - lo), end):
            slots.append(int(case.block_tables[i, pos // b]) * b + pos % b)
    slots = np.array(slots + [0] * (t_pad - len(slots)), np.int32)
    flat = lambda c: np.asarray(c, np.float32).reshape(c.shape[0], -1, c.shape[3])  # noqa: E731
    k = jnp.asarray(flat(case.k_cache)[:, slots].transpose(1, 0, 2))
    v = jnp.asarray(flat(case.v_cache)[:, slots].transpose(1, 0, 2))
    return k, v, slots


@pytest.mark.parametrize("tile, window, softcap", [(32, None, None), (8, None, None),
                                                   (16, 7, None), (16, 7, 1.5)])
def test_tiled_prefill_matches_flat_prefill(tile, window, softcap):
    rng = np.random.default_rng(3)
    lens = np.array([45, 1, 17, 64, 3, 0, 0], np.int32)  # spans tiles, tiny, padded rows
    qsl = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    t = int(qsl[-1]) + 11  # padding tokens, and a length that is no multiple of the tile
    q = kt.random_q(rng, t, 6, 64, jnp.float32)
    k = kt.random_q(rng, t, 2, 64, jnp.float32)
    v = kt.random_q(rng, t, 2, 64, jnp.float32)
    md = AttentionMetadata(jnp.zeros((t,), jnp.int32), jnp.asarray(qsl), jnp.asarray(lens),
                           jnp.zeros((len(lens), 1), jnp.int32), jnp.zeros((1,), jnp.int32))
    want = np.asarray(prefill_dense(q, k, v, md, 0.125, window, softcap=softcap))
    got = np.asarray(prefill_tiled(q, k, v, md, 0.125, window, tile, softcap=softcap))
    if softcap is not None:  # the dense one against numpy, token 44 of the first prompt
        keys = np.asarray(k, np.float64)[38:45]
        ref = kt._attend_np(np.asarray(q, np.float64)[44], keys,
                            np.asarray(v, np.float64)[38:45], 0.125, softcap=softcap)
        np.testing.assert_allclose(want[44], ref, atol=2e-5, rtol=2e-5)
    n = int(qsl[-1])
    np.testing.assert_allclose(got[:n], want[:n], atol=2e-6, rtol=2e-6)
    assert np.all(np.isfinite(got))


def test_prefill_step_with_leading_decode_rows_matches_numpy():
    rng = np.random.default_rng(4)
    block_size = 8
    # Rows 0-2 decode over cached context (one new token each), rows 3-5 are fresh prompts.
    lens = np.array([40, 9, 1, 21, 5, 12, 0], np.int32)
    qlens = np.array([1, 1, 1, 21, 5, 12, 0])
    qsl = np.concatenate([[0], np.cumsum(qlens)]).astype(np.int32)
    case = kt.make_case(rng, num_kv_heads=3, head_size=64, block_size=block_size,
                        dtype=jnp.float32, seq_lens=lens)
    t = int(qsl[-1]) + 5
    q = kt.random_q(rng, t, 9, 64, jnp.float32)
    k, v, slots = _new_tokens_from_cache(case, qsl, t)
    md = AttentionMetadata(jnp.asarray(slots), jnp.asarray(qsl), jnp.asarray(case.seq_lens),
                           jnp.asarray(case.block_tables), jnp.zeros((7,), jnp.int32),
                           jnp.asarray(3, jnp.int32), "prefill", "xla")
    got, _ = attention(q, k, v, (case.k_cache, case.v_cache), md, scale=0.125)
    ref = kt.ragged_reference_np(q, case, qsl, 0.125)
    n = int(qsl[-1])
    np.testing.assert_allclose(kt.as_f64(got)[:n], ref[:n], atol=2e-5, rtol=2e-5)
    # Without the decode rows flagged, their outputs would be their own token's value only.
    md0 = dataclasses.replace(md, num_decodes=jnp.asarray(0, jnp.int32))
    wrong, _ = attention(q, k, v, (case.k_cache, case.v_cache), md0, scale=0.125)
    assert not np.allclose(kt.as_f64(wrong)[:3], ref[:3], atol=1e-3)
