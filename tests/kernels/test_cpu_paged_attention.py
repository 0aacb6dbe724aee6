"""The C++ CPU paged-attention kernel (paged_jax/cpu_kernels) against the float64 numpy
reference, on random permuted block tables with random unused blocks: decode batches, ragged
batches (prefills, chunks over a cached prefix, decodes, padding), a sliding window, and its
refusals."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernel_testing as kt
from paged_jax import cpu_kernels

if cpu_kernels.unavailable_reason() is not None:  # a CPU machine without a C++ compiler
    pytest.fail(f"the CPU kernel cannot be built: {cpu_kernels.unavailable_reason()}",
                pytrace=False)


def attend(q, k_cache, v_cache, tables, lens, *, scale, sliding_window=None):
    return jax.jit(cpu_kernels.paged_decode, static_argnames=("scale", "sliding_window"))(
        q, k_cache, v_cache, lens, tables, scale=scale, sliding_window=sliding_window)


@pytest.mark.parametrize("heads, head_size, block_size", [
    ((9, 3), 64, 16), ((32, 8), 128, 8), ((16, 1), 80, 32), ((40, 40), 96, 16),
    ((64, 8), 256, 8), ((9, 3), 112, 32)], ids=kt.case_id)
def test_decode_matches_numpy(heads, head_size, block_size):
    kt.check_decode(attend, heads, head_size, block_size, jnp.float32, num_seqs=6,
                    max_len=6 * block_size + 5)


def ragged_case(rng, heads, head_size, block_size):
    """Sequences: a chunk over a cached prefix, a decode, a whole prompt longer than the
    kernel's 32-token query chunk, a padded row, a short prompt; 3 padding tokens at the end."""
    lens = np.array([3 * block_size + 5, 2 * block_size, 45, 0, 7], np.int32)
    qlens = np.array([block_size + 3, 1, 45, 0, 7])
    qsl = np.concatenate([[0], np.cumsum(qlens)]).astype(np.int32)
    case = kt.make_case(rng, num_kv_heads=heads[1], head_size=head_size,
                        block_size=block_size, dtype=jnp.float32, seq_lens=lens)
    q = kt.random_q(rng, int(qsl[-1]) + 3, heads[0], head_size, jnp.float32)
    return case, qsl, q


@pytest.mark.parametrize("heads, head_size, block_size", [
    ((9, 3), 64, 16), ((16, 1), 80, 8), ((8, 8), 128, 32)], ids=kt.case_id)
def test_ragged_matches_numpy(heads, head_size, block_size):
    rng = np.random.default_rng(5)
    case, qsl, q = ragged_case(rng, heads, head_size, block_size)
    scale = head_size ** -0.5
    got = jax.jit(cpu_kernels.paged_attention, static_argnames=("scale",))(
        q, case.k_cache, case.v_cache, jnp.asarray(qsl), jnp.asarray(case.seq_lens),
        jnp.asarray(case.block_tables), scale=scale)
    ref = kt.ragged_reference_np(q, case, qsl, scale)
    np.testing.assert_allclose(np.asarray(got, np.float64), ref, atol=2e-5, rtol=2e-5)
    assert np.all(np.asarray(got)[qsl[-1]:] == 0)  # padding tokens


def test_ragged_sliding_window_matches_numpy():
    rng = np.random.default_rng(6)
    case, qsl, q = ragged_case(rng, (6, 2), 64, 8)
    window = 13
    got = np.asarray(cpu_kernels.paged_attention(
        q, case.k_cache, case.v_cache, jnp.asarray(qsl), jnp.asarray(case.seq_lens),
        jnp.asarray(case.block_tables), scale=0.125, sliding_window=window))
    q64 = np.asarray(q, np.float64)
    for s, length in enumerate(case.seq_lens):
        keys, values = kt._context_np(case, s, int(length))
        qlen = qsl[s + 1] - qsl[s]
        for i, token in enumerate(range(qsl[s], qsl[s + 1])):
            pos = int(length) - qlen + i
            lo = max(0, pos + 1 - window)
            ref = kt._attend_np(q64[token], keys[lo:pos + 1], values[lo:pos + 1], 0.125)
            np.testing.assert_allclose(got[token], ref, atol=2e-5, rtol=2e-5)


def test_ragged_softcap_with_and_without_a_window_matches_numpy():
    """Gemma 2's soft-capping: the scaled scores through tanh, before the window's mask; the
    block before the window points at block 0, full of large values the window must hide."""
    rng = np.random.default_rng(7)
    case, qsl, q = ragged_case(rng, (6, 2), 64, 8)
    q = q * 3.0  # scores well past the cap, so capping changes the answer
    case.block_tables[0, 0] = 0  # (a block the window passed, released to the pool)
    k_cache = case.k_cache.at[:, 0].set(50.0)
    q64 = np.asarray(q, np.float64)
    for window in (None, 10):  # (sequence 0's first query sees from position 9 on)
        got = np.asarray(cpu_kernels.paged_attention(
            q, k_cache, case.v_cache, jnp.asarray(qsl), jnp.asarray(case.seq_lens),
            jnp.asarray(case.block_tables), scale=0.125, sliding_window=window, softcap=2.5))
        plain = np.asarray(cpu_kernels.paged_attention(
            q, k_cache, case.v_cache, jnp.asarray(qsl), jnp.asarray(case.seq_lens),
            jnp.asarray(case.block_tables), scale=0.125, sliding_window=window))
        assert not np.allclose(got[:qsl[-1]], plain[:qsl[-1]], atol=1e-3)
        ref_case = dataclasses.replace(case, k_cache=k_cache)
        for s, length in enumerate(case.seq_lens):
            keys, values = kt._context_np(ref_case, s, int(length))
            qlen = qsl[s + 1] - qsl[s]
            for i, token in enumerate(range(qsl[s], qsl[s + 1])):
                pos = int(length) - qlen + i
                lo = 0 if window is None else max(0, pos + 1 - window)
                ref = kt._attend_np(q64[token], keys[lo:pos + 1], values[lo:pos + 1], 0.125,
                                    softcap=2.5)
                np.testing.assert_allclose(got[token], ref, atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError, match="softcap must be > 0, got 0.0"):
        cpu_kernels.paged_attention(q, k_cache, case.v_cache, jnp.asarray(qsl),
                                    jnp.asarray(case.seq_lens), jnp.asarray(case.block_tables),
                                    scale=0.125, softcap=0.0)


def test_padded_rows_give_zeros_and_sliding_window_matches_numpy():
    rng = np.random.default_rng(3)
    lens = np.array([37, 0, 5, 16, 0], np.int32)
    case = kt.make_case(rng, num_kv_heads=3, head_size=64, block_size=8, dtype=jnp.float32,
                        seq_lens=lens)
    q = kt.random_q(rng, len(lens), 9, 64, jnp.float32)
    window = 11
    got = np.asarray(attend(q, case.k_cache, case.v_cache, jnp.asarray(case.block_tables),
                            jnp.asarray(lens), scale=0.125, sliding_window=window))
    q64 = np.asarray(q, np.float64)
    for s, length in enumerate(lens):
        if length == 0:
            assert np.all(got[s] == 0)
            continue
        keys, values = kt._context_np(case, s, int(length))
        ref = kt._attend_np(q64[s], keys[-window:], values[-window:], 0.125)
        np.testing.assert_allclose(got[s], ref, atol=2e-5, rtol=2e-5)
    # The window changes the answer of rows longer than it.
    full = np.asarray(attend(q, case.k_cache, case.v_cache, jnp.asarray(case.block_tables),
                             jnp.asarray(lens), scale=0.125))
    assert not np.allclose(full[0], got[0], atol=1e-3)
    np.testing.assert_array_equal(full[2], got[2])


def test_refusals_name_the_mismatch():
    rng = np.random.default_rng(4)
    lens = np.array([9, 3], np.int32)
    case = kt.make_case(rng, num_kv_heads=2, head_size=64, block_size=8, dtype=jnp.float32,
                        seq_lens=lens)
    tables, jlens = jnp.asarray(case.block_tables), jnp.asarray(lens)
    q = kt.random_q(rng, 2, 4, 64, jnp.float32)
    # (dtypes and scales: test_cpu_kv_dtypes.py)
    with pytest.raises(ValueError, match="q heads 3 not a multiple of kv heads 2"):
        cpu_kernels.paged_decode(q[:, :3], case.k_cache, case.v_cache, jlens, tables, scale=0.1)
    with pytest.raises(ValueError, match=r"seq_lens must be int32 \[2\] .* got int32 \(1,\)"):
        cpu_kernels.paged_decode(q, case.k_cache, case.v_cache, jlens[:1], tables, scale=0.1)
    with pytest.raises(ValueError, match=r"query_start_loc must be \[3\] \(S \+ 1\), got \(2,\)"):
        cpu_kernels.paged_attention(q, case.k_cache, case.v_cache, jnp.asarray([0, 2]), jlens,
                                    tables, scale=0.1)
    with pytest.raises(ValueError, match="one token for each of the 2 table rows"):
        cpu_kernels.paged_decode(q[:1], case.k_cache, case.v_cache, jlens, tables, scale=0.1)
    with pytest.raises(ValueError, match="sliding_window must be >= 1, got 0"):
        cpu_kernels.paged_decode(q, case.k_cache, case.v_cache, jlens, tables, scale=0.1,
                                 sliding_window=0)
    # Lengths past the table and pages outside the pool are refused at run time, not read.
    with pytest.raises(Exception, match="exceeds its table"):
        cpu_kernels.paged_decode(q, case.k_cache, case.v_cache, jnp.asarray([9, 99]), tables,
                                 scale=0.1).block_until_ready()
    with pytest.raises(Exception, match="more new tokens than context"):
        cpu_kernels.paged_attention(q, case.k_cache, case.v_cache, jnp.asarray([0, 0, 2]),
                                    jnp.asarray([9, 1]), tables, scale=0.1).block_until_ready()
    with pytest.raises(Exception, match="query_start_loc decreases"):
        cpu_kernels.paged_attention(q, case.k_cache, case.v_cache, jnp.asarray([0, 2, 1]),
                                    jlens, tables, scale=0.1).block_until_ready()
    bad = tables.at[0, 0].set(case.k_cache.shape[1])
    with pytest.raises(Exception, match="out of range"):
        cpu_kernels.paged_decode(q, case.k_cache, case.v_cache, jlens, bad,
                                 scale=0.1).block_until_ready()


def test_a_missing_compiler_is_reported_not_raised(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    assert "no C++ compiler found" in cpu_kernels._load.__wrapped__()
