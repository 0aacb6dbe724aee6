"""The Pallas kernels over 8-bit KV pages (kv_quant.py): the Triton decode kernel, the ragged
kernel and the Mosaic GPU decode kernel (Mosaic's interpreter on the CPU) against the float64
NumPy reference computed from the dequantized pages, with random q, pages and block tables;
the quantization in force; the jnp references; the CUDA lowerings; the refusals and the
dispatch. The wider grid is marked `full` (-m full)."""
import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernel_testing as kt
import mgpu_interpret
from pallas_kernels import (DecodeConfig, RaggedConfig, kv_pages, paged_attention,
                            paged_attention_reference, ragged_paged_attention,
                            ragged_paged_attention_reference)
from pallas_kernels.paged_attention_mgpu import (INT8_MIN_BLOCK, MosaicDecodeConfig,
                                                 paged_attention_mgpu, ring_slots,
                                                 smem_bytes, supports)

if jax.default_backend() != "gpu":
  mgpu_interpret.install()  # transposed wgmma operands (q K^T) for the interpreter

# As test_paged_attention_mgpu: compiled Mosaic GPU kernels need a Hopper GPU; the CPU runs
# them interpreted (and lowers them for CUDA).
mosaic = pytest.mark.skipif(
    jax.default_backend() == "gpu" and not any(
        name in jax.devices()[0].device_kind for name in ("H100", "H200")),
    reason="compiled Mosaic GPU kernels need a Hopper GPU; the CPU runs them interpreted")

PAGES = kt.PAGES_8BIT  # name: (page dtype, k_scale, v_scale), fp8 scales away from 1


def assert_in_force(got, want, exact):
  """The quantization is in force: the values before it give an answer 10x further from
  the kernel's than the dequantized pages' answer is."""
  assert np.abs(got - exact).max() > 10 * np.abs(got - want).max()


def check_decode(attend, name, heads, head_size, block_size, q_dtype, *, num_seqs, max_len,
                 seed=0, in_force=False, **kwargs):
  rng = np.random.default_rng(seed)
  lens = kt.seq_lengths(rng, num_seqs, max_len, block_size)
  c = kt.quant_case(rng, PAGES[name], heads, head_size, block_size, lens, outlier=in_force)
  q = kt.random_q(rng, num_seqs, heads[0], head_size, q_dtype)
  scale = head_size ** -0.5
  out = attend(q, *c.args(), scale=scale, k_scale=c.k_scale, v_scale=c.v_scale, **kwargs)
  assert out.shape == q.shape and out.dtype == q.dtype
  got, want = kt.as_f64(out), kt.decode_reference_np(q, c.read, scale)
  np.testing.assert_allclose(got, want, **kt.tolerance(q_dtype))
  if in_force:
    assert_in_force(got, want, kt.decode_reference_np(q, c.exact, scale))


def check_ragged(name, heads, head_size, block_size, q_dtype, *, seed=0, in_force=False,
                 config=None):
  """A decode past a block boundary, a whole prompt, a chunk over a cached prefix, a
  one-token prompt, padding (and 3 padding tokens)."""
  rng = np.random.default_rng(seed)
  lens = np.array([2 * block_size + 3, 19, 3 * block_size + 1, 1, 0], np.int32)
  q_lens = np.array([1, 19, block_size // 2 + 3, 1, 0])
  qsl = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
  c = kt.quant_case(rng, PAGES[name], heads, head_size, block_size, lens, outlier=in_force)
  q = kt.random_q(rng, int(qsl[-1]) + 3, heads[0], head_size, q_dtype)
  scale = head_size ** -0.5
  out = ragged_paged_attention(q, *c.args(), jnp.asarray(qsl), scale=scale,
                               k_scale=c.k_scale, v_scale=c.v_scale, config=config)
  assert out.shape == q.shape and out.dtype == q.dtype
  got, want = kt.as_f64(out), kt.ragged_reference_np(q, c.read, qsl, scale)
  np.testing.assert_allclose(got, want, **kt.tolerance(q_dtype))
  assert np.all(got[qsl[-1]:] == 0)
  if in_force:
    assert_in_force(got, want, kt.ragged_reference_np(q, c.exact, qsl, scale))


# ---------------------------------------------------------------- always run (CI)

@pytest.mark.parametrize("name", PAGES)
def test_triton_decode_reads_8bit_pages(name):
  # GQA 3 (16 rows), head size 80 (padded to 128), split-K and (fp8_e4m3) one split.
  configs = [None] + [DecodeConfig(k_splits=1)] * (name == "fp8_e4m3")
  for config in configs:
    check_decode(paged_attention, name, (6, 2), 80, 16, jnp.float32, num_seqs=4, max_len=45,
                 in_force=True, config=config)


@pytest.mark.parametrize("name", PAGES)
def test_ragged_reads_8bit_pages(name):
  check_ragged(name, (6, 2), 64, 8, jnp.float32, in_force=True,
               config=RaggedConfig(block_rows=16, pages_per_compute_block=2))


@pytest.mark.parametrize("name", PAGES)
@mosaic
def test_mosaic_decode_reads_8bit_pages(name):
  # float16 q (its rounding is 8x finer than bfloat16's: the quantization shows through);
  # 64-token pages (int8's smallest), two a step of 128, over two ring slots, two splits.
  check_decode(paged_attention_mgpu, name, (8, 2), 64, INT8_MIN_BLOCK, jnp.float16,
               num_seqs=3, max_len=300, in_force=True,
               config=MosaicDecodeConfig(tokens_per_step=128, num_slots=2, k_splits=2))


@pytest.mark.parametrize("name,ragged", [("fp8_e4m3", False), ("int8", True)])
def test_triton_kernels_window_and_softcap_over_8bit_pages(name, ragged):
  """Table entries wholly before the window point at block 0, which holds NaN (fp8) or
  all-0xFF rows (int8: values -1, a NaN scale): never read, so the output stays right."""
  rng = np.random.default_rng(4)
  lens = np.array([61, 16, 4, 1, 0], np.int32)
  q_lens = np.array([1, 9, 4, 1, 0]) if ragged else np.ones(len(lens), int)
  qsl = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
  c = kt.quant_case(rng, PAGES[name], (4, 2), 32, 8, lens)
  features = dict(softcap=2.0, sliding_window=7)
  q = kt.random_q(rng, int(qsl[-1]) + ragged, 4, 32, jnp.float32) * 3  # scores reach the cap
  dead = dataclasses.replace(c.read, k_cache=c.k, v_cache=c.v)
  fill = None if name != "int8" else (lambda shape: jnp.full(shape, -1, jnp.int8))
  k, v, tables = kt.drop_dead_blocks(dead, lens - q_lens, features["sliding_window"], fill)
  args = (q, k, v, tables, jnp.asarray(lens))
  scales = dict(k_scale=c.k_scale, v_scale=c.v_scale)
  intact = (q, c.read.k_cache, c.read.v_cache, jnp.asarray(c.read.block_tables),
            jnp.asarray(lens))
  if ragged:
    out = ragged_paged_attention(*args, jnp.asarray(qsl), scale=0.2, **features, **scales)
    want = ragged_paged_attention_reference(*intact, jnp.asarray(qsl), scale=0.2, **features)
  else:
    out = paged_attention(*args, scale=0.2, config=DecodeConfig(k_splits=3), **features,
                          **scales)
    want = paged_attention_reference(*intact, scale=0.2, **features)
  np.testing.assert_allclose(kt.as_f64(out), np.asarray(want), **kt.tolerance(jnp.float32))


def test_references_read_8bit_pages():
  rng = np.random.default_rng(3)
  lens = np.array([29, 1, 16, 0], np.int32)
  q_lens = np.array([4, 1, 16, 0])
  qsl = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
  for name in PAGES:
    c = kt.quant_case(rng, PAGES[name], (4, 2), 64, 8, lens)
    np.testing.assert_array_equal(np.asarray(kv_pages.dequantize(c.k, 64, c.k_scale)),
                                  np.asarray(c.read.k_cache))
    q = kt.random_q(rng, 4, 4, 64, jnp.float32)
    out = paged_attention_reference(q, *c.args(), scale=0.1, k_scale=c.k_scale,
                                    v_scale=c.v_scale)
    np.testing.assert_allclose(np.asarray(out), kt.decode_reference_np(q, c.read, 0.1),
                               atol=1e-5, rtol=1e-5)
    q = kt.random_q(rng, int(qsl[-1]) + 2, 4, 64, jnp.float32)
    out = ragged_paged_attention_reference(q, *c.args(), jnp.asarray(qsl), scale=0.1,
                                           k_scale=c.k_scale, v_scale=c.v_scale)
    np.testing.assert_allclose(np.asarray(out), kt.ragged_reference_np(q, c.read, qsl, 0.1),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", PAGES)
def test_triton_kernels_lower_8bit_pages_for_cuda(name):
  """Interpret mode never meets Triton's lowering rules: fp8 loads and conversions, the
  int8 scale's bytes assembled into an int16 and bitcast to float16."""
  dtype, k_scale, v_scale = PAGES[name]
  spec = jax.ShapeDtypeStruct
  cache = spec((2, 32, 16, kv_pages.row_width(128, dtype)), dtype)
  scales = dict(k_scale=k_scale, v_scale=v_scale)
  launch = dict(num_warps=4, num_stages=2, pages_per_compute_block=2)
  traced = [
      paged_attention.trace(spec((3, 8, 128), jnp.bfloat16), cache, cache,
                            spec((3, 8), jnp.int32), spec((3,), jnp.int32), scale=0.1,
                            config=DecodeConfig(k_splits=2, **launch), interpret=False,
                            **scales),
      ragged_paged_attention.trace(spec((40, 8, 128), jnp.float32), cache, cache,
                                   spec((3, 8), jnp.int32), spec((3,), jnp.int32),
                                   spec((4,), jnp.int32), scale=0.1, softcap=30.0,
                                   config=RaggedConfig(block_rows=64, **launch),
                                   interpret=False, **scales)]
  for t in traced:
    assert "triton" in t.lower(lowering_platforms=("cuda",)).as_text()


@mosaic
@pytest.mark.parametrize("name,head_size,block_size,config", [
    ("fp8_e4m3", 64, 16, MosaicDecodeConfig(k_splits=2, p_from_registers=True)),
    ("int8", 128, 64, MosaicDecodeConfig(tokens_per_step=128, num_slots=3)),
])
def test_mosaic_lowers_8bit_pages_for_cuda(name, head_size, block_size, config):
  """The compiled path (8-bit TMA / bulk copies, the WGMMA 8-bit register layout, the
  conversions, the int8 scales' strided loads) goes through Mosaic GPU's lowering for
  CUDA, which runs without a GPU."""
  dtype, k_scale, v_scale = PAGES[name]
  spec = jax.ShapeDtypeStruct
  cache = spec((2, 40, block_size, kv_pages.row_width(head_size, dtype)), dtype)
  traced = paged_attention_mgpu.trace(
      spec((3, 16, head_size), jnp.bfloat16), cache, cache,
      spec((3, 600 // block_size), jnp.int32), spec((3,), jnp.int32),
      scale=head_size ** -0.5, k_scale=k_scale, v_scale=v_scale, config=config,
      interpret=False)
  assert "mosaic_gpu" in traced.lower(lowering_platforms=("cuda",)).as_text()


def test_mosaic_smem_bytes_counts_8bit_rings():
  # 8-bit rings are half (fp8) or about half (int8, with a scales buffer) of bf16's; the
  # two widened tiles come on top. Compared with Mosaic's own count in the full tier.
  bf16 = jnp.bfloat16
  kwargs = dict(out_cols=64, p_in_smem=True, pieces=2)
  base = smem_bytes(128, 64, 2, bf16, **kwargs)
  ring = 2 * 64 * 128 * 2  # two slots of 64 bf16 rows
  widened = 2 * 64 * 128 * 2
  assert smem_bytes(128, 64, 2, bf16, page_dtype=jnp.float8_e5m2, **kwargs) == (
      base - ring + widened)
  assert smem_bytes(128, 64, 2, bf16, page_dtype=jnp.int8, **kwargs) == (
      base - 2 * ring + 33 * 1024 + 1024 + 2 * 64 * 128 + widened)  # two slots of K and V
  # rows of 130 B (33,280 B, aligned to 1 KiB); their scales; the values staged in 128 B rows
  assert ring_slots(MosaicDecodeConfig(num_slots=4), 128, 16, bf16, False,
                    jnp.float8_e4m3fn) == 4


@pytest.mark.parametrize("q_dtype,page_dtype,kwargs,message", [
    (jnp.bfloat16, jnp.int8, dict(k_scale=2.0), "k_scale 2.0 given for int8 pages"),
    (jnp.bfloat16, jnp.bfloat16, dict(v_scale=0.5), "v_scale 0.5 given for bfloat16 pages"),
    (jnp.float32, jnp.float8_e4m3fn, dict(k_scale=0.0), "k_scale must be a finite"),
    (jnp.float32, jnp.float8_e5m2, dict(v_scale=float("inf")), "v_scale must be a finite"),
    (jnp.float32, jnp.uint8, {}, "q dtype float32 != k_cache dtype uint8"),
])
def test_scales_and_page_dtypes_validated(q_dtype, page_dtype, kwargs, message):
  q = jnp.ones((2, 4, 64), q_dtype)
  cache = jnp.ones((2, 4, 8, kv_pages.row_width(64, page_dtype)), page_dtype)
  args = (q, cache, cache, jnp.ones((2, 2), jnp.int32), jnp.ones((2,), jnp.int32))
  for attend in (paged_attention, paged_attention_mgpu):
    with pytest.raises(ValueError, match=message):
      attend(*args, scale=0.1, **kwargs)
  with pytest.raises(ValueError, match=message):
    ragged_paged_attention(*args, jnp.arange(3, dtype=jnp.int32), scale=0.1, **kwargs)


def test_int8_rows_must_hold_their_scales():
  q = jnp.ones((2, 4, 64), jnp.float32)
  cache = jnp.ones((2, 4, 8, 64), jnp.int8)  # no room for the scales
  with pytest.raises(ValueError, match=r"int8 k_cache rows of 64 bytes != q head size 64 \+ 2"):
    paged_attention(q, cache, cache, jnp.ones((2, 2), jnp.int32), jnp.ones((2,), jnp.int32),
                    scale=0.1)


def test_dispatch_sends_8bit_pages_to_the_kernel_that_reads_them(monkeypatch):
  """Mosaic takes fp8 pages and int8 pages of blocks >= 64 tokens; int8 pages of smaller
  blocks go to the Triton kernel. The scales go along either way."""
  from pallas_kernels import backend, dispatch
  calls = []
  monkeypatch.setattr(backend, "COMPILED_BACKEND", backend.MOSAIC_GPU)
  monkeypatch.setattr(dispatch, "paged_attention_mgpu", lambda *a, **kw: calls.append(("mgpu", kw)))
  monkeypatch.setattr(dispatch, "paged_attention", lambda *a, **kw: calls.append(("triton", kw)))
  q = jnp.ones((2, 8, 64), jnp.bfloat16)
  tables, lens = jnp.ones((2, 2), jnp.int32), jnp.ones((2,), jnp.int32)
  scales = dict(k_scale=0.5, v_scale=2.0)
  fp8 = jnp.ones((2, 4, 16, 64), jnp.float8_e4m3fn)
  dispatch.paged_decode(q, fp8, fp8, tables, lens, scale=0.1, **scales)
  for block_size in (16, INT8_MIN_BLOCK):
    int8 = jnp.ones((2, 4, block_size, 66), jnp.int8)
    dispatch.paged_decode(q, int8, int8, tables, lens, scale=0.1)
  assert calls == [
      ("mgpu", dict(scale=0.1, **scales)),
      ("triton", dict(scale=0.1, softcap=None, sliding_window=None, k_scale=1.0, v_scale=1.0)),
      ("mgpu", dict(scale=0.1, k_scale=1.0, v_scale=1.0))]
  assert "int8 pages of block size 16" in supports(q, jnp.ones((2, 4, 16, 66), jnp.int8))


# ---------------------------------------------------------------- the full grid (-m full)

FULL_HEADS = [(8, 2), (8, 1), (4, 4)]  # GQA, MQA, MHA
FULL = list(itertools.product(FULL_HEADS, [64, 128], [8, 16, 32, 64], PAGES))
full_id = lambda value: value if isinstance(value, str) else kt.case_id(value)


@pytest.mark.full
@pytest.mark.parametrize("heads,head_size,block_size,name", FULL, ids=full_id)
@pytest.mark.parametrize("q_dtype", [jnp.float32, jnp.bfloat16], ids=kt.case_id)
def test_triton_decode_full(heads, head_size, block_size, name, q_dtype):
  check_decode(paged_attention, name, heads, head_size, block_size, q_dtype, num_seqs=5,
               max_len=7 * block_size + 3, seed=head_size + block_size)


@pytest.mark.full
@pytest.mark.parametrize("heads,head_size,block_size,name", FULL, ids=full_id)
@pytest.mark.parametrize("q_dtype", [jnp.float32, jnp.bfloat16], ids=kt.case_id)
def test_ragged_full(heads, head_size, block_size, name, q_dtype):
  check_ragged(name, heads, head_size, block_size, q_dtype, seed=head_size + block_size)


@pytest.mark.full
@pytest.mark.parametrize("heads,head_size,block_size,name", FULL, ids=full_id)
@mosaic
def test_mosaic_decode_full(heads, head_size, block_size, name):
  if name == "int8" and block_size < INT8_MIN_BLOCK:
    q = jnp.ones((1, heads[0], head_size), jnp.bfloat16)
    assert "int8 pages of block size" in supports(q, jnp.ones((heads[1], 2, block_size, 4),
                                                              jnp.int8))
    return
  check_decode(paged_attention_mgpu, name, heads, head_size, block_size, jnp.bfloat16,
               num_seqs=3, max_len=2 * 64 + 7, seed=head_size + block_size,
               config=MosaicDecodeConfig(k_splits=2))


@pytest.mark.full
@pytest.mark.parametrize("name", PAGES)
@mosaic
def test_mosaic_decode_long_pages_full(name):
  # Pages of 128 tokens, longer than a step: each is copied a 64-token slice at a time.
  check_decode(paged_attention_mgpu, name, (8, 2), 128, 128, jnp.bfloat16, num_seqs=3,
               max_len=3 * 128 + 5, config=MosaicDecodeConfig(k_splits=2))


@mosaic
@pytest.mark.full
@pytest.mark.parametrize("head_size,block_size,name", list(itertools.product(
    [64, 128, 256], [8, 16, 32, 64, 128], PAGES)), ids=full_id)
def test_mosaic_lowers_8bit_pages_full(head_size, block_size, name):
  dtype, k_scale, v_scale = PAGES[name]
  spec = jax.ShapeDtypeStruct
  cache = spec((2, 40, block_size, kv_pages.row_width(head_size, dtype)), dtype)
  q = spec((2, 8, head_size), jnp.bfloat16)
  if supports(q, cache) is not None:
    assert name == "int8" and block_size < INT8_MIN_BLOCK
    return
  traced = paged_attention_mgpu.trace(
      q, cache, cache, spec((2, 2 + 200 // block_size), jnp.int32), spec((2,), jnp.int32),
      scale=0.1, k_scale=k_scale, v_scale=v_scale, interpret=False)
  assert "mosaic_gpu" in traced.lower(lowering_platforms=("cuda",)).as_text()


@mosaic
@pytest.mark.full
@pytest.mark.parametrize("name,block_size", [("fp8_e4m3", 16), ("fp8_e5m2", 64),
                                             ("int8", 64), ("int8", 128)])
def test_mosaic_smem_bytes_is_what_mosaic_allocates_for_8bit_pages(monkeypatch, name,
                                                                   block_size):
  """As test_paged_attention_mgpu.test_smem_bytes_is_what_mosaic_allocates, for 8-bit rings:
  with our limit lifted, Mosaic's lowering refuses a ring past the SMEM it has and names
  the bytes it needed; ours may round up a little, never down."""
  import importlib
  import re
  mgpu = importlib.import_module("pallas_kernels.paged_attention_mgpu")
  monkeypatch.setattr(mgpu, "MAX_SMEM_BYTES", 1 << 20)
  dtype = PAGES[name][0]
  config = MosaicDecodeConfig(tokens_per_step=256, num_slots=3, p_from_registers=True)
  spec = jax.ShapeDtypeStruct
  cache = spec((2, 40, block_size, kv_pages.row_width(128, dtype)), dtype)
  traced = paged_attention_mgpu.trace(
      spec((2, 16, 128), jnp.bfloat16), cache, cache, spec((2, 20), jnp.int32),
      spec((2,), jnp.int32), scale=0.1, config=config, interpret=False)
  with pytest.raises(Exception, match="exceeds available shared memory") as error:
    traced.lower(lowering_platforms=("cuda",))
  theirs = int(re.search(r"smem_bytes=(\d+)", str(error.value)).group(1))
  slots = ring_slots(config, 128, block_size, jnp.bfloat16, False, dtype)
  ours = smem_bytes(128, 256, slots, jnp.bfloat16, out_cols=64, p_in_smem=False,
                    pieces=256 // block_size, page_dtype=dtype)
  assert theirs <= ours <= theirs * 1.02
