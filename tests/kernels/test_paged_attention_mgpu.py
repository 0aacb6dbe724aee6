"""paged_attention_mgpu (Mosaic GPU: TMA + wgmma) against the NumPy reference.

On the CPU it runs in Mosaic GPU's interpret mode (jax's InterpretGPUParams), which simulates
SMEM, the TMA copies, barriers and wgmma; on a Hopper GPU it is compiled.
"""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernel_testing as kt
import mgpu_interpret
from pallas_kernels.paged_attention_mgpu import (HEAD_SIZES, MAX_SMEM_BYTES,
                                                 MosaicDecodeConfig, paged_attention_mgpu,
                                                 ring_slots, smem_bytes)

if jax.default_backend() != "gpu":
  mgpu_interpret.install()  # transposed wgmma operands (q K^T) for the interpreter

pytestmark = pytest.mark.skipif(
    jax.default_backend() == "gpu"
    and "H100" not in jax.devices()[0].device_kind and "H200" not in jax.devices()[0].device_kind,
    reason="compiled Mosaic GPU kernels need a Hopper GPU; the CPU runs them interpreted")


# CI subset: several pages per step, a page per step, a ring refilled many times, GQA/MQA.
@pytest.mark.parametrize("heads,head_size,block_size,dtype", [
    ((9, 3), 64, 16, jnp.bfloat16),
    ((16, 1), 128, 8, jnp.float16),
    ((8, 8), 64, 64, jnp.bfloat16),
    ((8, 2), 256, 128, jnp.bfloat16),  # pages longer than a step: copied a slice at a time
], ids=kt.case_id)
def test_mgpu_decode_small(heads, head_size, block_size, dtype):
  kt.check_decode(paged_attention_mgpu, heads, head_size, block_size, dtype, num_seqs=3,
                  max_len=5 * 64 + 3, config=MosaicDecodeConfig(num_slots=2, k_splits=1))


def test_mgpu_decode_split_k_with_empty_splits():
  # Three 64-token steps split three ways: two splits are empty for the 1-token sequence.
  kt.check_decode(paged_attention_mgpu, (8, 2), 64, 16, jnp.bfloat16, num_seqs=3,
                  max_len=150, config=MosaicDecodeConfig(k_splits=3))


def test_mgpu_decode_padded_rows_are_zero():
  rng = np.random.default_rng(1)
  case = kt.make_case(rng, num_kv_heads=1, head_size=64, block_size=16, dtype=jnp.bfloat16,
                      seq_lens=np.array([70, 0], np.int32))
  q = kt.random_q(rng, 2, 4, 64, jnp.bfloat16)
  out = paged_attention_mgpu(q, case.k_cache, case.v_cache,
                                  jnp.asarray(case.block_tables), jnp.asarray(case.seq_lens),
                                  scale=0.125, config=MosaicDecodeConfig(k_splits=1))
  assert np.all(np.isfinite(np.asarray(out, np.float32)))
  np.testing.assert_array_equal(np.asarray(out[1:], np.float32), 0)


@pytest.mark.parametrize("dtype,head_size,heads,message", [
    (jnp.float32, 64, (4, 4), "dtype float32"),
    (jnp.bfloat16, 80, (4, 4), "head size 80"),
    (jnp.bfloat16, 64, (128, 1), "128 query heads per KV head"),
])
def test_mgpu_refuses_what_it_does_not_take(dtype, head_size, heads, message):
  rng = np.random.default_rng(2)
  case = kt.make_case(rng, num_kv_heads=heads[1], head_size=head_size, block_size=16,
                      dtype=dtype, seq_lens=np.array([5], np.int32))
  q = kt.random_q(rng, 1, heads[0], head_size, dtype)
  with pytest.raises(ValueError, match=message):
    paged_attention_mgpu(q, case.k_cache, case.v_cache, jnp.asarray(case.block_tables),
                              jnp.asarray(case.seq_lens), scale=0.125)


@pytest.mark.full
@pytest.mark.parametrize("heads,head_size,block_size,dtype", list(itertools.product(
    kt.HEADS, [h for h in kt.HEAD_SIZES if h in HEAD_SIZES], kt.BLOCK_SIZES,
    [jnp.bfloat16])), ids=kt.case_id)
def test_mgpu_decode_full(heads, head_size, block_size, dtype):
  kt.check_decode(paged_attention_mgpu, heads, head_size, block_size, dtype, num_seqs=3,
                  max_len=4 * 64 + 1)


def test_mgpu_decode_p_from_registers():
  # Compiled, wgmma reads p from registers; the interpreter stages it in SMEM regardless.
  kt.check_decode(paged_attention_mgpu, (16, 2), 64, 16, jnp.bfloat16, num_seqs=3,
                  max_len=200, config=MosaicDecodeConfig(p_from_registers=True, k_splits=1))


@pytest.mark.parametrize("out_cols", [64, 128])
def test_mgpu_decode_output_chunks(out_cols):
  # The float32 output leaves SMEM in head_size / out_cols chunks (two or one at 128).
  kt.check_decode(paged_attention_mgpu, (8, 2), 128, 16, jnp.bfloat16, num_seqs=3,
                  max_len=200, config=MosaicDecodeConfig(num_slots=3, out_cols=out_cols,
                                                         k_splits=2))


def test_ring_slots_cut_to_shared_memory_and_barriers():
  bf16 = jnp.bfloat16
  # 128 keys a step at head size 128: three slots need about 250 KiB, two fit.
  assert ring_slots(MosaicDecodeConfig(tokens_per_step=128, num_slots=3), 128, 16, bf16,
                    interpret=False) == 2
  # 16 pages of 8 tokens a step: 32 barriers hold two slots, whatever memory allows.
  assert ring_slots(MosaicDecodeConfig(tokens_per_step=128, num_slots=4), 64, 8, bf16,
                    interpret=False) == 2
  # Small steps keep the ring asked for; what they allocate is within the limit.
  config = MosaicDecodeConfig(num_slots=4)
  assert ring_slots(config, 128, 16, bf16, interpret=False) == 4
  assert smem_bytes(128, 64, 4, bf16, out_cols=64, p_in_smem=True, pieces=4) <= MAX_SMEM_BYTES
  # The defaults leave room for two programs an SM (228 KiB, 1 KiB reserved for each).
  default = smem_bytes(128, 64, 2, bf16, out_cols=64, p_in_smem=True, pieces=4)
  assert 2 * (default + 1024) <= 228 * 1024


@pytest.mark.parametrize("fields,message", [
    (dict(tokens_per_step=96), "multiple of 64"),
    (dict(num_slots=1), "num_slots"),
    (dict(out_cols=32), "out_cols must be 64 or 128, got 32"),
])
def test_mgpu_config_refuses_bad_fields(fields, message):
  with pytest.raises(ValueError, match=message):
    MosaicDecodeConfig(**fields)


def test_mgpu_refuses_more_barriers_than_a_group_holds():
  # 256 keys a step over 8-token pages: 32 copies a slot, 64 for the two-slot ring.
  rng = np.random.default_rng(3)
  case = kt.make_case(rng, num_kv_heads=1, head_size=64, block_size=8, dtype=jnp.bfloat16,
                      seq_lens=np.array([5], np.int32))
  q = kt.random_q(rng, 1, 4, 64, jnp.bfloat16)
  with pytest.raises(ValueError, match="tokens_per_step 256 at block size 8: .* 32 barriers"):
    paged_attention_mgpu(q, case.k_cache, case.v_cache, jnp.asarray(case.block_tables),
                         jnp.asarray(case.seq_lens), scale=0.125,
                         config=MosaicDecodeConfig(tokens_per_step=256))


@pytest.mark.parametrize("head_size,block_size,dtype,config", [
    (128, 16, jnp.bfloat16, MosaicDecodeConfig(k_splits=2)),
    (64, 8, jnp.float16, MosaicDecodeConfig(k_splits=1, p_from_registers=True)),
    (128, 16, jnp.bfloat16, MosaicDecodeConfig(num_slots=2, out_cols=64, p_from_registers=True)),
    (128, 16, jnp.bfloat16, MosaicDecodeConfig(num_slots=3, out_cols=128)),
    (128, 16, jnp.bfloat16, MosaicDecodeConfig(tokens_per_step=128, num_slots=3)),  # cut to 2
    (256, 64, jnp.bfloat16, MosaicDecodeConfig(k_splits=3)),
    (64, 8, jnp.bfloat16, MosaicDecodeConfig(tokens_per_step=128, num_slots=4)),  # 16 pieces
])
def test_mgpu_kernel_lowers_to_mosaic_gpu_for_cuda(head_size, block_size, dtype, config):
  """The compiled path (layout casts, WGMMA-layout reductions, TMA, barriers) goes through
  Mosaic GPU's lowering for CUDA, which runs here without a GPU; only PTX generation and the
  run itself need one."""
  rng = np.random.default_rng(5)
  case = kt.make_case(rng, num_kv_heads=2, head_size=head_size, block_size=block_size,
                      dtype=dtype, seq_lens=np.array([300, 70, 0], np.int32))
  q = kt.random_q(rng, 3, 16, head_size, dtype)
  traced = paged_attention_mgpu.trace(
      q, case.k_cache, case.v_cache, jnp.asarray(case.block_tables),
      jnp.asarray(case.seq_lens), scale=head_size ** -0.5, config=config, interpret=False)
  text = traced.lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text


def test_smem_bytes_is_what_mosaic_allocates(monkeypatch):
  """smem_bytes (which cuts the ring) against Mosaic GPU's own count: with our limit lifted,
  a 3-slot ring of 128 keys at head size 128 is refused by Mosaic's lowering, whose error
  names the bytes it needed; ours may round up a little, never down."""
  import importlib
  import re
  mgpu = importlib.import_module("pallas_kernels.paged_attention_mgpu")
  monkeypatch.setattr(mgpu, "MAX_SMEM_BYTES", 1 << 20)
  config = MosaicDecodeConfig(tokens_per_step=128, num_slots=3, p_from_registers=True)
  rng = np.random.default_rng(7)
  case = kt.make_case(rng, num_kv_heads=2, head_size=128, block_size=16, dtype=jnp.bfloat16,
                      seq_lens=np.array([300, 70], np.int32))
  q = kt.random_q(rng, 2, 16, 128, jnp.bfloat16)
  traced = paged_attention_mgpu.trace(
      q, case.k_cache, case.v_cache, jnp.asarray(case.block_tables),
      jnp.asarray(case.seq_lens), scale=0.1, config=config, interpret=False)
  with pytest.raises(Exception, match="exceeds available shared memory") as error:
    traced.lower(lowering_platforms=("cuda",))
  theirs = int(re.search(r"smem_bytes=(\d+)", str(error.value)).group(1))
  ours = smem_bytes(128, 128, 3, jnp.bfloat16, out_cols=64, p_in_smem=False, pieces=8)
  assert theirs <= ours <= theirs * 1.02
  assert ours > MAX_SMEM_BYTES  # so the real ring_slots cuts this ring to 2


@pytest.mark.full
@pytest.mark.parametrize("heads,head_size,block_size,dtype", list(itertools.product(
    kt.HEADS, HEAD_SIZES, [8, 16, 32, 64, 128], [jnp.bfloat16, jnp.float16])), ids=kt.case_id)
def test_mgpu_kernel_lowers_full(heads, head_size, block_size, dtype):
  rng = np.random.default_rng(6)
  case = kt.make_case(rng, num_kv_heads=heads[1], head_size=head_size, block_size=block_size,
                      dtype=dtype, seq_lens=np.array([2 * block_size + 65, 1], np.int32))
  q = kt.random_q(rng, 2, heads[0], head_size, dtype)
  traced = paged_attention_mgpu.trace(
      q, case.k_cache, case.v_cache, jnp.asarray(case.block_tables),
      jnp.asarray(case.seq_lens), scale=head_size ** -0.5, interpret=False)
  assert "mosaic_gpu" in traced.lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("switch,dtype,head_size,expect_mosaic", [
    ("mosaic_gpu", jnp.bfloat16, 64, True),    # the switch sends supported steps to Mosaic
    ("mosaic_gpu", jnp.float32, 64, False),    # ... and the rest to the Triton kernel
    ("triton", jnp.bfloat16, 64, False),
])
def test_backend_switch_picks_the_decode_kernel(monkeypatch, switch, dtype, head_size,
                                                expect_mosaic):
  from pallas_kernels import backend, dispatch
  calls = []
  real = dispatch.paged_attention_mgpu
  monkeypatch.setattr(backend, "COMPILED_BACKEND", switch)
  monkeypatch.setattr(dispatch, "paged_attention_mgpu",
                      lambda *a, **k: calls.append(1) or real(*a, **k))
  kt.check_decode(dispatch.paged_decode, (8, 2), head_size, 16, dtype, num_seqs=3,
                  max_len=90)
  assert bool(calls) == expect_mosaic
