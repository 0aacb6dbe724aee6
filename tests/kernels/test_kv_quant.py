"""8-bit KV pages (kv_quant.py): quantization error bounds; the XLA attention paths over int8
and fp8 pages against the float64 reference computed from the dequantized pages; the cache
write; block counts at a fixed memory; an engine with int8 or fp8 pages gives the same tokens
on the CPU kernel and the XLA path, with prefix caching, with preemption by swap, and in beam
search with and without shared blocks. (The CPU and Pallas kernels' own tests over 8-bit
pages: test_cpu_kv_dtypes.py, test_pallas_kv_dtypes.py.)"""
import dataclasses
import itertools

import jax.numpy as jnp
import numpy as np
import pytest

import kernel_testing as kt
from paged_jax import kv_cache, kv_quant
from paged_jax.attention import AttentionMetadata, write_kv
from paged_jax.models.config import ModelConfig
from paged_jax.xla_attention import decode, mixed

# kernel_testing's 8-bit page dtypes, read here at scale 1.0 (the XLA paths take no scales)
PAGE_DTYPES = {name: page[0] for name, page in kt.PAGES_8BIT.items()}


def test_quantization_error_bounds():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((64, 3, 32)) * rng.uniform(0.01, 10, (64, 3, 1)),
                    jnp.float32)
    q = kv_quant.quantize(x, jnp.int8)
    assert q.shape == (64, 3, 34) and q.dtype == jnp.int8
    err = np.abs(np.asarray(kv_quant.dequantize(q, 32)) - np.asarray(x))
    half_step = np.abs(np.asarray(x)).max(-1, keepdims=True) / 254
    # (the float16 scale is max |x| / 127 within float16's rounding, 2^-11 relative)
    assert np.all(err <= half_step * (1 + 2.0 ** -10)) and err.max() > 0
    scales = np.asarray(q[..., 32:]).view(np.float16).astype(np.float32)[..., 0]
    np.testing.assert_allclose(scales, np.abs(np.asarray(x)).max(-1) / 127, rtol=2.0 ** -11)
    zero = kv_quant.quantize(jnp.zeros((2, 1, 8)), jnp.int8)  # an all-zero row stays zero
    assert np.all(np.asarray(kv_quant.dequantize(zero, 8)) == 0)
    for dtype, mantissa_bits in ((jnp.float8_e4m3fn, 3), (jnp.float8_e5m2, 2)):
        y = np.asarray(kv_quant.dequantize(kv_quant.quantize(x, dtype), 32))
        rel = np.abs(y - np.asarray(x)) / np.abs(np.asarray(x))
        big = np.abs(np.asarray(x)) > 0.1  # normal numbers: relative rounding error
        assert rel[big].max() <= 2.0 ** -(mantissa_bits + 1) * 1.0001


@pytest.mark.parametrize("name", sorted(PAGE_DTYPES))
def test_xla_paths_read_8bit_pages(name):
    rng = np.random.default_rng(1)
    lens = np.array([30, 1, 17, 9, 0], np.int32)
    qlens = np.array([6, 1, 17, 3, 0])
    qsl = np.concatenate([[0], np.cumsum(qlens)]).astype(np.int32)
    case = kt.make_case(rng, num_kv_heads=2, head_size=64, block_size=8, dtype=jnp.float32,
                        seq_lens=lens)
    c = kt.quantize_case(case, PAGE_DTYPES[name])
    k, v, back = c.k, c.v, c.read
    q = kt.random_q(rng, int(qsl[-1]) + 5, 6, 64, jnp.float32)
    md = AttentionMetadata(jnp.zeros((1,), jnp.int32), jnp.asarray(qsl), jnp.asarray(lens),
                           jnp.asarray(case.block_tables), jnp.zeros((1,), jnp.int32),
                           "mixed", "xla")
    got = kt.as_f64(mixed(q, k, v, md, 0.125, None, tile=8))
    want = kt.ragged_reference_np(q, back, qsl, 0.125)
    np.testing.assert_allclose(got[:qsl[-1]], want[:qsl[-1]], atol=2e-5, rtol=2e-5)
    # decode rows over the same pages
    qd = kt.random_q(rng, len(lens), 6, 64, jnp.float32)
    mdd = dataclasses.replace(md, query_start_loc=jnp.arange(len(lens) + 1, dtype=jnp.int32),
                              mode="decode")
    np.testing.assert_allclose(kt.as_f64(decode(qd, k, v, mdd, 0.125, None)),
                               kt.decode_reference_np(qd, back, 0.125), atol=2e-5, rtol=2e-5)
    # and the quantization is in force: float32 pages give another answer
    assert np.abs(kt.as_f64(mixed(q, case.k_cache, case.v_cache, md, 0.125, None, tile=8))
                  - got).max() > 1e-4


def test_write_kv_quantizes_rows_with_their_scales():
    rng = np.random.default_rng(2)
    cache = jnp.zeros((2, 4, 8, 16 + 2), jnp.int8)
    new = jnp.asarray(rng.standard_normal((3, 2, 16)), jnp.float32)
    out = write_kv(cache, new, jnp.asarray([9, 0, 31], jnp.int32))
    flat = out.reshape(2, 32, 18)
    np.testing.assert_array_equal(np.asarray(flat[:, [9, 0, 31]]),
                                  np.asarray(kv_quant.quantize(new, jnp.int8).transpose(1, 0, 2)))
    assert not np.asarray(flat[:, 1:9]).any()  # the other slots untouched


def test_block_counts_follow_the_bytes_per_block():
    cfg = ModelConfig(vocab_size=8, hidden_size=64, intermediate_size=8, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=64)
    memory = 64 << 20
    blocks = {name: kv_cache.num_blocks_for(cfg, 16, memory, name)
              for name in ("auto", "bfloat16", "fp8", "int8")}
    assert blocks["bfloat16"] == 2 * blocks["auto"]  # float32 model
    assert blocks["fp8"] == 4 * blocks["auto"]
    assert blocks["int8"] == memory // (2 * 2 * 2 * (64 + 2) * 16)  # values + their scales
    caches = kv_cache.allocate(cfg, 3, 16, kv_cache_dtype="int8")
    assert caches[0][0].shape == (2, 3, 16, 66) and caches[0][0].dtype == jnp.int8


def test_an_unknown_kv_cache_dtype_is_refused_by_name():
    from paged_jax.config import EngineConfig

    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, .*int8, got "
                                         "'int4'"):
        EngineConfig(kv_cache_dtype="int4")


@pytest.mark.slow  # six engines per dtype
@pytest.mark.parametrize("dtype", ["int8", "fp8_e4m3"])
def test_8bit_blocks_give_the_same_tokens_shared_swapped_and_in_beams(make_tiny_llama_dir,
                                                                      dtype):
    """With an 8-bit cache, prefix caching, preemption by swap and beam search (whose beams
    share blocks through the prefix cache) give the tokens of the same cache without them:
    blocks carry their scales, and every reader, a prefill's own tokens included, attends
    the keys as the pages hold them."""
    from paged_jax import LLMEngine, SamplingParams
    from paged_jax.beam_search import BeamSearchParams, beam_search
    from paged_jax.config import EngineConfig
    from paged_jax.models.loader import load_model

    m = load_model(str(make_tiny_llama_dir(initializer_range=0.2)), with_tokenizer=False)
    rng = np.random.default_rng(3)
    stem = rng.integers(3, 256, 24).tolist()  # a shared prefix: cache hits
    prompts = [stem + rng.integers(3, 256, n).tolist() for n in (3, 9, 14, 20)]
    base = dict(kv_cache_dtype=dtype, block_size=8, max_model_len=96, max_num_seqs=4,
                num_kv_blocks=64, enable_prefix_caching=False)

    def run(**options):
        engine = LLMEngine(EngineConfig(**{**base, **options}), model=m)
        params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=0)
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, params)
        done = {}
        while engine.has_unfinished_requests():
            done.update({o.request_id: o.outputs[0] for o in engine.step() if o.finished})
        outs = [done[str(i)] for i in range(len(prompts))]
        return ([o.token_ids for o in outs],
                np.array([[e[t].logprob for t, e in zip(o.token_ids, o.logprobs)]
                          for o in outs]), engine.snapshot())

    plain = run()  # (the CPU kernel: attention_backend auto)
    assert run(attention_backend="xla")[0] == plain[0]  # the XLA readers: the same pages
    shared = run(enable_prefix_caching=True)
    # 15 usable blocks for 4 requests of up to 9: preemption by swap, 8-bit pages to the host
    swapped = run(num_kv_blocks=16, preemption_mode="swap", num_cpu_blocks=64)
    assert shared[2].prefix_cache_hits > 0 and swapped[2].num_swapped_out > 0
    assert shared[0] == plain[0] and swapped[0] == plain[0]
    # (the same pages, read in other batches: float sums in another order)
    np.testing.assert_allclose(shared[1], plain[1], atol=1e-5)
    np.testing.assert_allclose(swapped[1], plain[1], atol=1e-5)

    def beams(caching: bool):
        engine = LLMEngine(EngineConfig(**{**base, "enable_prefix_caching": caching,
                                           "max_num_seqs": 16}), model=m)
        step = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, logprobs=6)
        passes = itertools.count()

        def top_logprobs(seqs):  # one engine pass over every live beam, as LLM.beam_search
            ids = [f"{next(passes)}" for _ in seqs]
            for rid, seq in zip(ids, seqs):
                engine.add_request(rid, seq, step)
            done = {}
            while engine.has_unfinished_requests():
                done.update({o.request_id: o for o in engine.step() if o.finished})
            return [{t: lp.logprob for t, lp in done[r].outputs[0].logprobs[0].items()}
                    for r in ids]

        outs = beam_search(prompts[:2], BeamSearchParams(3, 8, ignore_eos=True), top_logprobs,
                           ())
        return ([[s.tokens for s in o.sequences] for o in outs],
                engine.snapshot().prefix_cache_hits)

    with_sharing, hits = beams(True)
    assert hits > 0 and with_sharing == beams(False)[0]
