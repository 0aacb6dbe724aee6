"""The C++ CPU paged-attention kernel over 16- and 8-bit KV pages (kv_quant.py): against the
float64 numpy reference computed from the dequantized pages, on ragged batches (prefills over
cached prefixes, decodes, padding) with random block tables; every code of each format read
exactly; q of 16 bits; a window and softcap over fp8 pages; and the refusals."""
import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernel_testing as kt
from paged_jax import cpu_kernels, kv_quant

if cpu_kernels.unavailable_reason() is not None:  # a CPU machine without a C++ compiler
    pytest.fail(f"the CPU kernel cannot be built: {cpu_kernels.unavailable_reason()}",
                pytrace=False)

# name: (page dtype, k_scale, v_scale): the 16-bit pages, unscaled, and kernel_testing's
# 8-bit pages with their fp8 scales away from 1.
PAGES = {
    "bfloat16": (jnp.bfloat16, 1.0, 1.0),
    "float16": (jnp.float16, 1.0, 1.0),
    **kt.PAGES_8BIT,
}
TOL = dict(atol=2e-5, rtol=2e-5)


def quant_case(rng, name, heads, head_size, block_size) -> kt.QuantCase:
    """Sequences: a chunk over a cached prefix, a decode, a whole prompt past the kernel's
    32-token query chunk, a padded row, a short prompt, a decode on a block boundary."""
    lens = np.array([3 * block_size + 5, 2 * block_size + 3, 45, 0, 7, 2 * block_size],
                    np.int32)
    qlens = np.array([block_size + 3, 1, 45, 0, 7, 1])
    qsl = np.concatenate([[0], np.cumsum(qlens)]).astype(np.int32)
    return kt.quant_case(rng, PAGES[name], heads, head_size, block_size, lens, qsl=qsl)


def run(c: kt.QuantCase, q, jit=False, **kwargs):
    attend = functools.partial(cpu_kernels.paged_attention, k_scale=c.k_scale,
                               v_scale=c.v_scale, **kwargs)
    return (jax.jit(attend) if jit else attend)(
        q, c.k, c.v, jnp.asarray(c.qsl), jnp.asarray(c.read.seq_lens),
        jnp.asarray(c.read.block_tables))


def check_pages(name, heads, head_size, block_size, seed=0):
    rng = np.random.default_rng(seed)
    c = quant_case(rng, name, heads, head_size, block_size)
    scale = head_size ** -0.5
    q = kt.random_q(rng, int(c.qsl[-1]) + 3, heads[0], head_size, jnp.float32)
    got = kt.as_f64(run(c, q, jit=True, scale=scale))
    np.testing.assert_allclose(got, kt.ragged_reference_np(q, c.read, c.qsl, scale), **TOL)
    assert np.all(got[c.qsl[-1]:] == 0)  # padding tokens
    # The quantization is in force: the values before it give another answer.
    exact = kt.ragged_reference_np(q, c.exact, c.qsl, scale)
    assert np.abs(got - exact).max() > 1e-4
    # Decode rows (paged_decode) over the same pages.
    qd = kt.random_q(rng, len(c.read.seq_lens), heads[0], head_size, jnp.float32)
    got = cpu_kernels.paged_decode(qd, c.k, c.v, jnp.asarray(c.read.seq_lens),
                                   jnp.asarray(c.read.block_tables), scale=scale,
                                   k_scale=c.k_scale, v_scale=c.v_scale)
    np.testing.assert_allclose(kt.as_f64(got), kt.decode_reference_np(qd, c.read, scale), **TOL)


@pytest.mark.parametrize("name", list(PAGES))
@pytest.mark.parametrize("heads, head_size, block_size", [
    ((9, 3), 64, 16), ((4, 4), 80, 8)], ids=kt.case_id)
def test_pages_match_numpy_on_dequantized_pages(name, heads, head_size, block_size):
    check_pages(name, heads, head_size, block_size)


@pytest.mark.full
@pytest.mark.parametrize("name", list(PAGES))
@pytest.mark.parametrize("heads", [(8, 1), (9, 3), (32, 8), (40, 40)], ids=kt.case_id)
@pytest.mark.parametrize("head_size", [64, 96, 128, 256])
@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_pages_match_numpy_full(name, heads, head_size, block_size):
    check_pages(name, heads, head_size, block_size, seed=head_size + block_size)


def every_code(name):
    """Pages [1, N, 1, 64] holding each finite code of the format (int8 rows: every value,
    -128 too, under a random row scale), as stored; and the value scale."""
    dtype, _, v_scale = PAGES[name]
    if name == "int8":
        codes = np.tile(np.arange(-128, 128, dtype=np.int32), 4).reshape(-1, 64)
        scales = np.random.default_rng(1).uniform(1e-3, 2.0, (len(codes), 1)).astype(np.float16)
        rows = np.concatenate([codes.astype(np.int8), scales.view(np.int8)], axis=1)
        return jnp.asarray(rows.reshape(1, -1, 1, 66)), 1.0
    bits = np.uint16 if jnp.dtype(dtype).itemsize == 2 else np.uint8
    codes = np.arange(np.iinfo(bits).max + 1, dtype=np.int64).astype(bits)
    values = codes.view(jnp.dtype(dtype))
    # (bfloat16's subnormals are float32 denormals, which the kernel's threads flush to zero)
    wide = np.abs(values.astype(np.float32))
    codes = codes[np.isfinite(wide) & ((wide == 0) | (wide >= np.finfo(np.float32).tiny))]
    codes = np.concatenate([codes, codes[:(-len(codes)) % 64]])  # whole rows
    return jnp.asarray(codes.view(jnp.dtype(dtype)).reshape(1, -1, 1, 64)), v_scale


@pytest.mark.parametrize("name", list(PAGES))
def test_every_code_reads_exactly(name):
    """A sequence of one position returns its V row: so each row of codes, read by a
    length-1 sequence, must come back as kv_quant.dequantize reads it (subnormals too)."""
    v, v_scale = every_code(name)
    n = v.shape[1]
    k = jnp.asarray(np.random.default_rng(2).standard_normal(v.shape), jnp.float32)
    k = kv_quant.quantize(k[..., :64], v.dtype) if name == "int8" else k.astype(v.dtype)
    q = kt.random_q(np.random.default_rng(3), n, 2, 64, jnp.float32)
    got = cpu_kernels.paged_decode(q, k, v, jnp.ones(n, jnp.int32),
                                   jnp.arange(n, dtype=jnp.int32)[:, None], scale=0.125,
                                   v_scale=v_scale)
    want = np.asarray(kv_quant.dequantize(v, 64, v_scale))[0, :, 0]
    np.testing.assert_array_equal(np.asarray(got), np.stack([want, want], axis=1))


@pytest.mark.parametrize("name, q_dtype", [("int8", jnp.bfloat16), ("fp8_e4m3", jnp.float16),
                                           ("bfloat16", jnp.bfloat16)])
def test_half_precision_q(name, q_dtype):
    rng = np.random.default_rng(4)
    c = quant_case(rng, name, (6, 2), 64, 8)
    q = kt.random_q(rng, int(c.qsl[-1]), 6, 64, q_dtype)
    got = run(c, q, scale=0.125)
    assert got.dtype == q_dtype and got.shape == q.shape
    # Computed in float32 from q's values; only the output's rounding differs.
    np.testing.assert_allclose(kt.as_f64(got), kt.ragged_reference_np(q, c.read, c.qsl, 0.125),
                               atol=1e-2, rtol=1e-2)
    np.testing.assert_array_equal(
        np.asarray(got), np.asarray(run(c, q.astype(jnp.float32), scale=0.125).astype(q_dtype)))


def test_fp8_pages_with_window_and_softcap_match_numpy():
    """The cap applies to scores scaled by k_scale too; the window's dead block (block 0) is
    filled with large values it must hide."""
    rng = np.random.default_rng(5)
    c = quant_case(rng, "fp8_e4m3", (6, 2), 64, 8)
    c.read.block_tables[0, 0] = 0
    big = kv_quant.quantize(jnp.full(c.k.shape[2:], 50.0), c.k.dtype, c.k_scale)
    c = dataclasses.replace(c, k=c.k.at[:, 0].set(big))
    c.read.k_cache = kv_quant.dequantize(c.k, 64, c.k_scale)
    q = kt.random_q(rng, int(c.qsl[-1]), 6, 64, jnp.float32) * 3.0  # scores past the cap
    window, cap = 10, 2.5  # (sequence 0's first query sees from position 9 on)
    got = np.asarray(run(c, q, scale=0.125, sliding_window=window, softcap=cap))
    assert np.abs(got - np.asarray(run(c, q, scale=0.125, sliding_window=window))).max() > 1e-3
    q64 = np.asarray(q, np.float64)
    for s, length in enumerate(c.read.seq_lens):
        keys, values = kt._context_np(c.read, s, int(length))
        qlen = c.qsl[s + 1] - c.qsl[s]
        for i, token in enumerate(range(c.qsl[s], c.qsl[s + 1])):
            pos = int(length) - qlen + i
            lo = max(0, pos + 1 - window)
            ref = kt._attend_np(q64[token], keys[lo:pos + 1], values[lo:pos + 1], 0.125,
                                softcap=cap)
            np.testing.assert_allclose(got[token], ref, **TOL)


def test_refusals_name_the_value():
    rng = np.random.default_rng(6)
    c = quant_case(rng, "int8", (4, 2), 64, 8)
    q = kt.random_q(rng, int(c.qsl[-1]), 4, 64, jnp.float32)
    args = (jnp.asarray(c.qsl), jnp.asarray(c.read.seq_lens), jnp.asarray(c.read.block_tables))
    attend = lambda q, k, v, **kw: cpu_kernels.paged_attention(q, k, v, *args, scale=0.1, **kw)
    with pytest.raises(ValueError, match=r"q head size 64 needs k_cache's last axis 66, got 64"):
        attend(q, c.k[..., :64], c.v[..., :64])
    with pytest.raises(ValueError, match=r"k_scale scales float8 pages only, got k_scale=0.5 "
                                         r"with int8 pages"):
        attend(q, c.k, c.v, k_scale=0.5)
    f16 = c.exact.k_cache.astype(jnp.float16)
    with pytest.raises(ValueError, match="v_scale scales float8 pages only, got v_scale=2.0 "
                                         "with float16 pages"):
        attend(q, f16, f16, v_scale=2.0)
    fp8 = c.exact.k_cache.astype(jnp.float8_e5m2)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match=f"v_scale must be a finite number > 0, got {bad}"):
            attend(q, fp8, fp8, v_scale=bad)
    with pytest.raises(ValueError, match="k_cache and v_cache must have one dtype, got "
                                         "float8_e5m2 and float16"):
        attend(q, fp8, f16)
    with pytest.raises(ValueError, match="reads pages of float32, bfloat16, float16, "
                                         "float8_e4m3fn, float8_e5m2, int8, got uint8 for k_cache"):
        attend(q, f16.astype(jnp.uint8), f16.astype(jnp.uint8))
    with pytest.raises(ValueError, match="q must be float32, bfloat16, float16, got int8"):
        attend(q.astype(jnp.int8), f16, f16)
    with pytest.raises(ValueError, match=r"q head size 64 != k_cache head size 66"):
        attend(q, c.k.astype(jnp.bfloat16), c.v.astype(jnp.bfloat16))


@pytest.mark.parametrize("name", ["bfloat16", "float16", "fp8_e4m3", "fp8_e5m2"])
def test_the_cache_write_is_in_place_and_costs_its_rows(name):
    """XLA's CPU scatter on these pages widens the whole cache to float32 and back; the CPU
    backend's write (write_kv -> cpu_kernels.write_rows) copies only its rows: the compiled
    write holds no copy of the cache, and its result is the scatter's."""
    from paged_jax.attention import write_kv

    dtype = PAGES[name][0]
    rng = np.random.default_rng(7)
    cache = jnp.asarray(rng.standard_normal((2, 40, 8, 32)), jnp.float32).astype(dtype)
    new = jnp.asarray(rng.standard_normal((5, 2, 32)), jnp.float32)
    slots = jnp.asarray(rng.permutation(320)[:5], jnp.int32)
    want = cache.reshape(2, 320, 32).at[:, slots].set(
        kv_quant.quantize(new, dtype, 0.5).transpose(1, 0, 2)).reshape(cache.shape)
    write = jax.jit(functools.partial(write_kv, kv_scale=0.5, in_place_kernel=True),
                    donate_argnums=0)
    hlo = write.lower(cache, new, slots).compile().as_text()
    big = [line for line in hlo.splitlines() if "[2,40,8,32]" in line or "[2,320,32]" in line]
    assert any("custom-call" in line for line in big)
    assert not [line for line in big if " copy(" in line or "fusion(" in line], big
    got = write(cache, new, slots)
    np.testing.assert_array_equal(np.asarray(got).view(np.uint8), np.asarray(want).view(np.uint8))
    with pytest.raises(ValueError, match="write_rows: rows float32"):
        cpu_kernels.write_rows(want, new.transpose(1, 0, 2), slots)


def test_the_xla_paths_cache_writes_are_in_place_on_the_cpu_too():
    """attention() on the XLA path (not the default on the CPU) writes fp8 pages through the
    kernel library as well: no copy of the pool in the compiled step."""
    from paged_jax.attention import AttentionMetadata, attention

    rng = np.random.default_rng(8)
    caches = tuple(jnp.asarray(rng.standard_normal((2, 40, 8, 32)), jnp.float32).astype(
        jnp.float8_e4m3fn) for _ in range(2))
    q = jnp.asarray(rng.standard_normal((1, 4, 32)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((1, 2, 32)), jnp.float32) for _ in range(2))
    md = AttentionMetadata(jnp.asarray([9], jnp.int32), jnp.asarray([0, 1], jnp.int32),
                           jnp.asarray([10], jnp.int32), jnp.asarray([[3, 1]], jnp.int32),
                           jnp.asarray([0], jnp.int32), mode="decode", backend="xla")
    step = jax.jit(functools.partial(attention, scale=0.2), donate_argnums=3)
    hlo = step.lower(q, k, v, caches, md).compile().as_text()
    big = [line for line in hlo.splitlines() if "[2,40,8,32]" in line or "[2,320,32]" in line]
    assert sum("custom-call" in line for line in big) == 2  # K and V
    # Nothing of the pool's size is made: no copy, scatter or fusion writes one (the readers'
    # converts are fused into their gathers, which make only the pages they read).
    made = [line for line in big if re.search(r"= \w+\[2,(40,8|320),32\]\S* (copy|scatter|"
                                               r"fusion)\(", line)]
    assert not made, made
