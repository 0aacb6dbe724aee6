"""Paged decode attention for Hopper through Pallas' Mosaic GPU lowering (TMA + wgmma).

The same contract as paged_attention.paged_attention (the Triton-lowered kernel), for q of
bfloat16 or float16 and head sizes of 64, 128 or 256, where Hopper's asynchronous copies and
warpgroup matrix instructions apply. Grid (sequence, KV head, split), one warpgroup per
program:

  - the query heads of the KV group, padded to ROWS = 64 rows (wgmma's M), wait in SMEM;
  - each step covers `tokens_per_step` (64) keys: its pages of K and V (or the slice of one
    page, for pages of 128 tokens) are copied by TMA from where they lie in the cache, one
    copy and one barrier per piece, into a ring of `num_slots` SMEM buffers (fewer if shared
    memory or a barrier group of 32 is short), so the copies of the next steps overlap this
    step's math;
  - scores = wgmma(q, K^T) and out += wgmma(p, V), float32 accumulators, with an online
    softmax in base 2 between them; each page is read once per KV head and shared by the
    whole group;
  - splits write unnormalised (out, max, sum) that paged_attention.merge_splits combines.

Pages (kv_pages.py): q's dtype; float8_e4m3fn / float8_e5m2 (per-tensor k_scale, v_scale);
int8 rows of D values and a float16 scale, for blocks of >= 64 tokens (supports says why).
8-bit pages travel as 8-bit: TMA copies fp8 tiles into 8-bit swizzled SMEM (64-byte swizzle
at head size 64); int8 pieces, whose D + 2-byte rows break TMA's 16-byte stride rule, move
as contiguous bytes with bulk copies. Each step the warpgroup widens the slot's K and V tiles
SMEM -> registers -> SMEM in q's dtype (exact) for wgmma, which multiplies 8-bit operands
only with an 8-bit q, and frees the slot for the next copy at once (int8 values pass through
a staging tile of D-byte rows first: WGMMA's 8-bit layout takes no rows of D + 2 bytes). The scales never touch
the tiles: k_scale folds into the softmax scale and v_scale into the output; an int8 row's
scale (its 2 bytes assembled into a float16) multiplies its score column (K) or its
probability column (V).

Runs on the CPU in Mosaic GPU's interpret mode (InterpretGPUParams), which checks the
semantics (copies, barriers, wgmma); the compiled path also lowers to Mosaic GPU for CUDA on
a machine without a GPU (register layouts, shared-memory budget), so only PTX generation and
running it need one.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import backend, kv_pages, tuning
from pallas_kernels.paged_attention import (LOG2E, MASK_VALUE, merge_splits,
                                            validate_cache_args)

ROWS = 64  # wgmma's M: a KV group's query heads padded to this many rows
MAX_SMEM_BYTES = 232448  # shared memory a block may use on H100 / H200 (227 KiB)
MAX_BARRIERS = 32  # per barrier group in Mosaic GPU: bounds pieces per step x ring slots
SMEM_ALIGN = 1024  # Mosaic GPU aligns every SMEM allocation to this many bytes
HEAD_SIZES = (64, 128, 256)
DTYPES = (jnp.bfloat16, jnp.float16)
# int8 rows are D + 2 bytes, D + 2 = 2 x odd: a piece of rows is a multiple of the 128 bytes
# a copy must move only with a multiple of 64 rows.
INT8_MIN_BLOCK = 64


@dataclasses.dataclass(frozen=True)
class MosaicDecodeConfig:
  # Defaults from a sweep on an H200 at bf16, batch 64, context 2048, 8 KV heads, head size
  # 128 (docs/RESULTS.md): a 2-slot ring and 64-column output chunks keep a program near
  # 109 KiB of SMEM, room for two an SM, and ran fastest there.
  tokens_per_step: int = 64  # keys per step: wgmma's N for q K^T, a multiple of 64
  num_slots: int = 2  # SMEM buffers in the TMA ring (steps in flight), cut to what fits
  k_splits: int | None = None  # None: split until the SMs are covered (tuning.resolve_decode)
  # The float32 output leaves through SMEM this many columns at a time (64 or 128).
  out_cols: int = 64
  # Compiled only: wgmma reads the probabilities p from registers instead of SMEM (the
  # interpreter takes SMEM operands only, so interpret mode always stages p in SMEM).
  p_from_registers: bool = False

  def __post_init__(self):
    if self.tokens_per_step % 64 or self.tokens_per_step < 64:
      raise ValueError(f"tokens_per_step must be a multiple of 64, got {self.tokens_per_step}")
    if self.num_slots < 2:
      raise ValueError(f"num_slots must be >= 2, got {self.num_slots}")
    if self.k_splits is not None and self.k_splits < 1:
      raise ValueError(f"k_splits must be >= 1, got {self.k_splits}")
    if self.out_cols not in (64, 128):
      raise ValueError(f"out_cols must be 64 or 128, got {self.out_cols}")


def smem_bytes(head_size: int, tokens_per_step: int, num_slots: int, dtype, *,
               out_cols: int, p_in_smem: bool, pieces: int, page_dtype=None) -> int:
  """Shared memory of one program, as _decode_call allocates it: q, the K and V rings (of
  page_dtype, default dtype), for 8-bit pages the K and V tiles widened to dtype, p (unless
  wgmma reads it from registers), an output chunk, m, l and the three barrier groups, each
  allocation rounded up to the 1024 bytes Mosaic GPU aligns it to."""
  item = jnp.dtype(dtype).itemsize
  page_dtype = jnp.dtype(page_dtype or dtype)
  ring = num_slots * tokens_per_step * head_size * page_dtype.itemsize
  if kv_pages.is_int8(page_dtype):  # one ring of K and V rows with their scales; the scales
    # (f32) and the values staged as rows of D bytes
    rings = [2 * num_slots * tokens_per_step * (head_size + kv_pages.SCALE_BYTES),
             2 * tokens_per_step * 4, 2 * tokens_per_step * head_size]
  else:
    rings = [ring, ring]
  widened = [tokens_per_step * head_size * item] * 2 if page_dtype.itemsize != item else []
  sizes = [ROWS * head_size * item, *rings, *widened,
           p_in_smem * ROWS * tokens_per_step * item, ROWS * min(head_size, out_cols) * 4,
           ROWS * 4, ROWS * 4, 8, 8 * num_slots * pieces, 8 * num_slots * pieces]
  return sum(-(-size // SMEM_ALIGN) * SMEM_ALIGN for size in sizes if size)


def _p_in_smem(config: MosaicDecodeConfig, interpret: bool) -> bool:
  """Whether wgmma reads p from SMEM: always in the interpreter, which takes no register
  operands."""
  return interpret or not config.p_from_registers


def ring_slots(config: MosaicDecodeConfig, head_size: int, block_size: int, dtype,
               interpret: bool, page_dtype=None) -> int:
  """The ring depth the kernel runs with: config.num_slots, cut to what fits in shared
  memory and in one barrier group; 0 if not even two slots do."""
  pieces = max(1, config.tokens_per_step // block_size)
  slots = min(config.num_slots, MAX_BARRIERS // pieces)
  p_in_smem = _p_in_smem(config, interpret)
  while slots >= 2 and smem_bytes(head_size, config.tokens_per_step, slots, dtype,
                                  out_cols=config.out_cols, p_in_smem=p_in_smem,
                                  pieces=pieces, page_dtype=page_dtype) > MAX_SMEM_BYTES:
    slots -= 1
  return slots if slots >= 2 else 0


def supports(q: jax.Array, k_cache: jax.Array) -> str | None:
  """None if this kernel takes these arguments, else the reason it does not."""
  if q.dtype not in DTYPES:
    return f"dtype {q.dtype} (wgmma here takes bfloat16 or float16)"
  if q.shape[2] not in HEAD_SIZES:
    return f"head size {q.shape[2]} (TMA tiles take {HEAD_SIZES})"
  if kv_pages.is_int8(k_cache.dtype) and k_cache.shape[2] < INT8_MIN_BLOCK:
    return (f"int8 pages of block size {k_cache.shape[2]} (< {INT8_MIN_BLOCK}): a page of "
            f"rows of D + 2 bytes is copied whole, and Pallas' Mosaic GPU copies move a "
            f"multiple of 128 bytes (each thread of the warpgroup arrives on the barrier for "
            f"1/128 of them), which {k_cache.shape[2]} rows of D + 2 bytes are not")
  if k_cache.shape[2] < 8:
    return f"block size {k_cache.shape[2]} (a page must fill 8-row SMEM tiles)"
  if q.shape[1] // k_cache.shape[0] > ROWS:
    return f"{q.shape[1] // k_cache.shape[0]} query heads per KV head (at most {ROWS})"
  return None


# ---------------------------------------------------------------- kernel (on refs)

def _widen(tile, dtype):
  """An 8-bit tile (registers) -> dtype (bfloat16 or float16), exactly. int8 directly
  (Mosaic GPU has a bf16x2 trick for it). fp8 through float16: Mosaic GPU converts e4m3 /
  e5m2 to f16 with one cvt.rn.f16x2 instruction on every ptxas, to bf16 only with ptxas
  >= 9.2; fp8 -> f16 -> f32 -> bf16 is exact."""
  if tile.dtype == jnp.int8:
    return tile.astype(dtype)
  tile = tile.astype(jnp.float16)
  return tile if dtype == jnp.float16 else tile.astype(jnp.float32).astype(dtype)


def _decode_kernel(tables_ref, lens_ref, q_ref, k_ref, v_ref,  # inputs (GMEM)
                   o_ref, m_ref, l_ref,  # outputs (GMEM)
                   q_smem, rings, kw_smem, vw_smem, scales_smem, p_smem, o_smem, m_smem,
                   l_smem,  # scratch
                   q_bar, k_bars, v_bars,
                   *, scale, v_scale, block_size, tokens_per_step, num_slots,
                   steps_per_split, interpret):
  # p_smem is None when wgmma reads p from registers (compiled, p_from_registers)
  # scale includes fp8's k_scale; v_scale (fp8's, else 1) multiplies the output
  # rings: (k_smem, v_smem), or for int8 pages one ring [num_slots, 2, U, 16] of 16-byte
  # units, U = tokens_per_step (D + 2) / 16: a slot's K rows, then its V rows (so their
  # scales load as one [2, step] array, the 128 elements a warpgroup-strided load needs)
  # kw_smem, vw_smem [tokens_per_step, D] in q's dtype: 8-bit pages' tiles of the step,
  # widened for wgmma (which takes 8-bit operands only with an 8-bit q); None for 16-bit
  # scales_smem (int8 pages only): ([2, tokens_per_step] f32, the K and V row scales of
  # the step; staging [2, tokens_per_step, D] int8, the step's values as rows of D bytes)
  # tables_ref [S, MBp] int32, MBp covering every step of every split; lens_ref [S] int32
  # q_ref [S, Hkv, ROWS, D]: each group's query heads, zero-padded to ROWS rows
  # k_ref, v_ref [Hkv, N, B, D] (the engine's cache, read in place; int8: [Hkv, N, U', 16],
  # U' = B (D + 2) / 16, the same bytes)
  # o_ref [K, S, Hkv, ROWS, D] f32 unnormalised; m_ref, l_ref [K, S, Hkv, ROWS] f32 (base 2)
  # q_smem [ROWS, D]; k_smem, v_smem [num_slots, tokens_per_step, D] in the pages' dtype
  # (int8: views of the ring);
  # p_smem [ROWS, tokens_per_step] (the step's probabilities); o_smem [ROWS, out_cols] f32
  # m_smem, l_smem [ROWS] f32; q_bar: 1 barrier; k_bars, v_bars: num_slots * pieces barriers
  seq, head, split = lax.axis_index("s"), lax.axis_index("h"), lax.axis_index("k")
  head_size = q_smem.shape[1]
  int8 = scales_smem is not None
  if int8:  # the rows' scales [2, step] f32, and the values staged as rows of D bytes
    scales_smem, staging = scales_smem
  int8_rows = (2, tokens_per_step, head_size + kv_pages.SCALE_BYTES)  # a slot's K, V rows
  k_smem, v_smem = (rings.at[:, 0], rings.at[:, 1]) if int8 else rings
  # A step holds `pieces` whole pages, or (pages longer than a step) a slice of one page.
  # Register layouts are hints to Mosaic's compiler; the interpreter has no rule for them.
  layout = (lambda x, _: x) if interpret else plgpu.layout_cast
  iota = (functools.partial(lax.broadcasted_iota, jnp.int32) if interpret else
          functools.partial(plgpu.broadcasted_iota, jnp.int32, layout=plgpu.Layout.WGMMA))
  # An 8-bit tile comes out of SMEM 4 bytes a thread at a time (WGMMA's 8-bit register
  # layout) rather than WGMMA's 2. int8 tiles come from the unswizzled staging tile (below)
  # with the plain transfer (optimized=False), as they came from rows of D + 4 bytes before
  # it; Mosaic's bank-conflict free plans are untried there.
  load_8bit = ((lambda ref: ref[...]) if interpret else
               functools.partial(plgpu.load, idx=(), layout=plgpu.Layout.WGMMA_8BIT,
                                 optimized=not int8))
  # int8 scale bytes (compiled only): a [2, step] strided column, one byte per thread and
  # register (the warpgroup-strided layout takes any strides).
  load_strided = lambda ref: plgpu.load(ref, (), layout=plgpu.Layout.WG_STRIDED(
      ref.shape, vec_size=1))
  # The scales, as columns of WGMMA's layout (that of the scores).
  load_cols = ((lambda ref: ref[...]) if interpret else
               functools.partial(plgpu.load, idx=(), layout=plgpu.Layout.WGMMA.reduce(0)))
  pieces = max(1, tokens_per_step // block_size)
  piece = min(block_size, tokens_per_step)
  seq_len = lens_ref[seq]
  first = split * steps_per_split
  num_steps = jnp.clip(pl.cdiv(seq_len, tokens_per_step) - first, 0, steps_per_split)

  if int8:
    # int8 pages and rings come in 16-byte units (_decode_call). Pieces start and end on
    # rows that are multiples of 64, where a row of D + 2 = 2 x odd bytes ends on a unit
    # (every 8 rows).
    to_units = lambda row: row * int8_rows[2] // 16
    # A page slice is in bounds by construction; saying so lets Mosaic move it with one
    # bulk copy of contiguous bytes (no tensor map, so no 256-element box limit).
    copy = functools.partial(plgpu.copy_gmem_to_smem,
                             oob_mode=plgpu.OOBFillMode.PROMISE_IN_BOUNDS)
  else:
    to_units, copy = (lambda row: row), plgpu.copy_gmem_to_smem

  def fetch(step, slot):
    """TMA copies of one step's keys and values into `slot`, one barrier per piece."""
    start = (first + step) * tokens_per_step
    for p in range(pieces):
      token = start + p * piece
      page = tables_ref[seq, token // block_size]
      src = (head, page, pl.ds(to_units(token % block_size), to_units(piece)))
      dst = (slot, pl.ds(to_units(p * piece), to_units(piece)))
      copy(k_ref.at[src], k_smem.at[dst], k_bars.at[slot * pieces + p])
      copy(v_ref.at[src], v_smem.at[dst], v_bars.at[slot * pieces + p])

  def load_8bit_tiles(slot):
    """A slot's 8-bit K and V tiles [step, D] (registers), and for int8 the 2 bytes of
    each row's scale, [2, step] int8 each (K's row scales, then V's)."""
    if not int8:
      return load_8bit(k_smem.at[slot]), load_8bit(v_smem.at[slot]), None
    values = pl.ds(0, head_size)  # a row: D values, then the 2 bytes of its scale
    if interpret:  # the interpreter reshapes no refs: load the slot, reshape the value
      kv = rings[slot].reshape(int8_rows)
      return kv[0, :, values], kv[1, :, values], [kv[:, :, head_size + i]
                                                 for i in range(kv_pages.SCALE_BYTES)]
    kv = rings.at[slot].reshape(*int8_rows)
    # Rows of D + 2 bytes have strides no multiple of the 4 bytes WGMMA's 8-bit layout loads
    # a thread at a time: the values move in 2-byte vectors (a strided layout) into rows of
    # D bytes (staging), which that layout then reads.
    for i in range(2):
      staging[i] = plgpu.load(kv.at[i, :, values], (), layout=plgpu.Layout.WG_STRIDED(
          (tokens_per_step, head_size), vec_size=2))
    plgpu.commit_smem()  # (each thread reads back values other threads stored)
    return (load_8bit(staging.at[0]), load_8bit(staging.at[1]),
            [load_strided(kv.at[:, :, head_size + i]) for i in range(kv_pages.SCALE_BYTES)])

  def widen_slot(slot):
    """8-bit pages: the slot's K and V tiles SMEM -> registers -> kw_smem, vw_smem in q's
    dtype, and for int8 their row scales into scales_smem. The caller's commit_smem fences
    these stores for wgmma (the async proxy) and syncs the warpgroup."""
    k8, v8, scale_bytes = load_8bit_tiles(slot)
    kw_smem[...] = _widen(k8, kw_smem.dtype)
    vw_smem[...] = _widen(v8, vw_smem.dtype)
    if int8:
      # The 2 little-endian bytes of each row's float16 scale, assembled into an int16
      # (Mosaic bitcasts only between types of one width) and bitcast to float16.
      scales_smem[...] = kv_pages.half_from_bytes(*scale_bytes)

  plgpu.copy_gmem_to_smem(q_ref.at[seq, head], q_smem, q_bar.at[0])
  for slot in range(num_slots):  # prologue: fill the ring
    pl.when(slot < num_steps)(functools.partial(fetch, slot, slot))
  plgpu.barrier_wait(q_bar.at[0])

  def step_body(step, carry):
    acc, m_prev, l_prev = carry
    slot = lax.rem(step, num_slots)
    for p in range(pieces):
      plgpu.barrier_wait(k_bars.at[slot * pieces + p])
    k_tile, v_tile = k_smem.at[slot], v_smem.at[slot]
    if kw_smem is not None:
      # 8-bit pages: both tiles are widened at once (the V copy was issued with the K copy),
      # which frees the slot for the next fetch before the matmuls.
      for p in range(pieces):
        plgpu.barrier_wait(v_bars.at[slot * pieces + p])
      widen_slot(slot)
      plgpu.commit_smem()
      k_tile, v_tile = kw_smem, vw_smem
      pl.when(step + num_slots < num_steps)(
          functools.partial(fetch, step + num_slots, slot))

    def scores(acc_ref):
      plgpu.wgmma(acc_ref, q_smem, k_tile.T)
      return acc_ref[...]
    s = pl.run_scoped(scores, plgpu.ACC((ROWS, tokens_per_step), jnp.float32))
    if int8:  # a key row's scale multiplies its score column
      s = s * lax.broadcast_in_dim(load_cols(scales_smem.at[0]), s.shape, [1])
    s = s * (scale * LOG2E)
    key = (first + step) * tokens_per_step + iota((ROWS, tokens_per_step), 1)
    visible = key < seq_len
    s = jnp.where(visible, s, MASK_VALUE)
    m_next = jnp.maximum(m_prev, s.max(axis=1))
    alpha = jnp.exp2(m_prev - m_next)
    p16 = jnp.exp2(s - lax.broadcast_in_dim(m_next, s.shape, [0]))
    l_next = l_prev * alpha + p16.sum(axis=1)
    if int8:
      # A value row's scale multiplies its probability column; rows past seq_len (whose
      # scale bytes the kernel never vouches for) get p = 0 without touching theirs.
      v_cols = lax.broadcast_in_dim(load_cols(scales_smem.at[1]), s.shape, [1])
      p16 = jnp.where(visible, p16 * v_cols, 0.0)
    if kw_smem is None:
      for p in range(pieces):
        plgpu.barrier_wait(v_bars.at[slot * pieces + p])

    if p_smem is None:  # wgmma's A operand straight from registers
      p_operand = p16.astype(q_smem.dtype)
    else:  # through SMEM, the only way the interpreter takes it
      p_smem[...] = p16.astype(p_smem.dtype)
      plgpu.commit_smem()
      p_operand = p_smem

    def values(acc_ref):
      plgpu.wgmma(acc_ref, p_operand, v_tile)
      return acc_ref[...]
    # A fresh accumulator (run_state, accumulating in place, has no interpreter rule yet).
    pv = pl.run_scoped(values, plgpu.ACC((ROWS, acc.shape[1]), jnp.float32))
    acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0]) + pv
    if kw_smem is None:
      # Both matmuls have read this slot: refill it with the step num_slots ahead.
      pl.when(step + num_slots < num_steps)(
          functools.partial(fetch, step + num_slots, slot))
    return acc, m_next, l_next

  acc = layout(jnp.zeros((ROWS, head_size), jnp.float32), plgpu.Layout.WGMMA)
  m = layout(jnp.full((ROWS,), MASK_VALUE, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
  l = layout(jnp.zeros((ROWS,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))
  acc, m, l = lax.fori_loop(0, num_steps, step_body, (acc, m, l))
  if v_scale != 1.0:
    acc = acc * v_scale

  m_smem[...] = m
  l_smem[...] = l
  cols = o_smem.shape[1]
  for c in range(0, head_size, cols):  # a whole float32 tile would crowd out the ring
    o_smem[...] = acc[:, c:c + cols]
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_ref.at[split, seq, head, :, pl.ds(c, cols)])
    if c == 0:
      plgpu.copy_smem_to_gmem(m_smem, m_ref.at[split, seq, head])
      plgpu.copy_smem_to_gmem(l_smem, l_ref.at[split, seq, head])
    plgpu.wait_smem_to_gmem(0)  # o_smem is rewritten by the next chunk


def _smem_transforms(dtype, row_bytes: int = 128) -> tuple:
  # 128-byte swizzled tiles of (8 rows, 128 bytes), the layout wgmma and TMA agree on;
  # rows of 64 bytes (fp8 pages at head size 64) take 64-byte swizzled (8, 64) tiles.
  swizzle = min(128, row_bytes)
  elems = swizzle // jnp.dtype(dtype).itemsize
  return (plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(swizzle))


def _decode_call(q4, k_cache, v_cache, block_tables, seq_lens, *, scale, v_scale, config,
                 interpret):
  num_seqs, num_kv_heads, _, head_size = q4.shape
  block_size = k_cache.shape[2]
  step = config.tokens_per_step
  pieces = max(1, step // block_size)
  max_steps = pl.cdiv(block_tables.shape[1] * block_size, step)
  splits = min(config.k_splits, max_steps)
  steps_per_split = pl.cdiv(max_steps, splits)
  # Table columns for every step of every split, the extra ones pointing at block 0.
  width = max(pl.cdiv(splits * steps_per_split * step, block_size), block_tables.shape[1])
  tables = jnp.pad(block_tables, ((0, 0), (0, width - block_tables.shape[1])))
  transforms = _smem_transforms(q4.dtype)
  page_dtype = k_cache.dtype
  p_in_smem = _p_in_smem(config, interpret)
  slots = ring_slots(config, head_size, block_size, q4.dtype, interpret, page_dtype)
  kernel = functools.partial(_decode_kernel, scale=scale, v_scale=v_scale,
                             block_size=block_size,
                             tokens_per_step=step, num_slots=slots,
                             steps_per_split=steps_per_split, interpret=interpret)
  f32 = jnp.float32
  out_type = (jax.ShapeDtypeStruct((splits, num_seqs, num_kv_heads, ROWS, head_size), f32),
              jax.ShapeDtypeStruct((splits, num_seqs, num_kv_heads, ROWS), f32),
              jax.ShapeDtypeStruct((splits, num_seqs, num_kv_heads, ROWS), f32))
  if kv_pages.is_int8(page_dtype):
    # Rows of D + 2 bytes fit no swizzled tile, and Mosaic's copies need 16-byte strides
    # (TMA's rule), which rows of D + 2 bytes lack. A piece of whole rows is contiguous,
    # though, and a multiple of 128 bytes when it has a multiple of 64 rows (supports):
    # seen as 16-byte units, [Hkv, N, B (D + 2) / 16, 16] (a free reshape), a piece is one
    # contiguous slice, which Mosaic copies with one bulk copy (cp.async.bulk, no tensor
    # map) into an unswizzled ring; the kernel reads the ring back as rows.
    units = step * (head_size + kv_pages.SCALE_BYTES) // 16
    rings = plgpu.SMEM((slots, 2, units, 16), page_dtype)
    scales = (plgpu.SMEM((2, step), f32), plgpu.SMEM((2, step, head_size), page_dtype))
    k_cache, v_cache = (c.reshape(*c.shape[:2], -1, 16) for c in (k_cache, v_cache))
  else:
    page_transforms = _smem_transforms(page_dtype, head_size * page_dtype.itemsize)
    rings = (plgpu.SMEM((slots, step, head_size), page_dtype, transforms=page_transforms),
             plgpu.SMEM((slots, step, head_size), page_dtype, transforms=page_transforms))
    scales = None
  widened = (plgpu.SMEM((step, head_size), q4.dtype, transforms=transforms)
             if page_dtype != q4.dtype else None)
  scratch = (
      plgpu.SMEM((ROWS, head_size), q4.dtype, transforms=transforms),
      rings,
      widened,
      widened,
      scales,
      plgpu.SMEM((ROWS, step), q4.dtype, transforms=transforms) if p_in_smem else None,
      plgpu.SMEM((ROWS, min(head_size, config.out_cols)), f32),
      plgpu.SMEM((ROWS,), f32),
      plgpu.SMEM((ROWS,), f32),
      plgpu.Barrier(num_barriers=1),
      plgpu.Barrier(num_barriers=slots * pieces),
      plgpu.Barrier(num_barriers=slots * pieces),
  )
  q_rows = jnp.pad(q4, ((0, 0), (0, 0), (0, ROWS - q4.shape[2]), (0, 0)))
  return plgpu.kernel(
      kernel, out_type=out_type, scratch_types=scratch,
      grid=(num_seqs, num_kv_heads, splits), grid_names=("s", "h", "k"),
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=plgpu_interpret_params() if interpret else None,
  )(tables, seq_lens, q_rows, k_cache, v_cache)


def plgpu_interpret_params():
  """Mosaic GPU's interpreter (jax >= 0.10.2): simulates SMEM, TMA, barriers, wgmma."""
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
  return InterpretGPUParams()


# ---------------------------------------------------------------- public function

@functools.partial(jax.jit, static_argnames=("scale", "softcap", "sliding_window", "k_scale",
                                             "v_scale", "config", "interpret"))
def paged_attention_mgpu(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                         block_tables: jax.Array, seq_lens: jax.Array, *, scale: float,
                         softcap: float | None = None, sliding_window: int | None = None,
                         k_scale: float = 1.0, v_scale: float = 1.0,
                         config: MosaicDecodeConfig | None = None,
                         interpret: bool | None = None) -> jax.Array:
  """Decode attention over the paged KV cache, as paged_attention.paged_attention.

  q [S, Hq, D] bfloat16 or float16; k_cache, v_cache [Hkv, N, B, D] in q's dtype, or
  float8_e4m3fn / float8_e5m2 (value = fp8 * k_scale, or v_scale; static floats, 1.0 for
  other pages), or int8 [Hkv, N, B, D + 2] with B >= 64 (rows of D values and a float16
  scale); block_tables [S, MB] int32; seq_lens [S] int32 (0 for padded rows, whose output
  is zeros). Returns [S, Hq, D] in q's dtype.
  Raises ValueError naming the mismatch, or what this kernel does not take (see supports);
  NotImplementedError for softcap or sliding_window (paged_attention takes them).
  """
  # Accepted so a caller passing the Triton kernel's arguments fails loudly, not silently.
  for name, value in (("softcap", softcap), ("sliding_window", sliding_window)):
    if value is not None:
      raise NotImplementedError(f"paged_attention_mgpu has no {name} (got {value}); "
                                f"use paged_attention")
  validate_cache_args(q, k_cache, v_cache, block_tables, seq_lens, k_scale, v_scale)
  if q.shape[0] != block_tables.shape[0]:
    raise ValueError(f"q sequences {q.shape[0]} != block_tables rows {block_tables.shape[0]}")
  reason = supports(q, k_cache)
  if reason is not None:
    raise ValueError(f"paged_attention_mgpu does not take {reason}")
  config = config or MosaicDecodeConfig()
  num_seqs, num_q_heads, head_size = q.shape
  num_kv_heads, _, block_size, _ = k_cache.shape
  if config.tokens_per_step % block_size and block_size % config.tokens_per_step:
    raise ValueError(f"tokens_per_step {config.tokens_per_step} and the block size "
                     f"{block_size} must divide one another")
  interpret = backend.use_interpret(interpret)
  if MAX_BARRIERS // max(1, config.tokens_per_step // block_size) < 2:
    raise ValueError(f"tokens_per_step {config.tokens_per_step} at block size {block_size}: "
                     f"two steps of pages need more than {MAX_BARRIERS} barriers")
  if not ring_slots(config, head_size, block_size, q.dtype, interpret, k_cache.dtype):
    raise ValueError(f"tokens_per_step {config.tokens_per_step} at head size {head_size}: "
                     f"two steps of K and V exceed {MAX_SMEM_BYTES} bytes of shared memory")
  if config.k_splits is None:
    splits = tuning.resolve_decode(
        None, num_seqs=num_seqs, num_kv_heads=num_kv_heads, max_blocks=block_tables.shape[1],
        block_size=block_size, head_size=head_size).k_splits
    config = dataclasses.replace(config, k_splits=splits)
  q4 = q.reshape(num_seqs, num_kv_heads, num_q_heads // num_kv_heads, head_size)
  o, m, l = _decode_call(q4, k_cache, v_cache, block_tables, seq_lens, scale=scale * k_scale,
                         v_scale=v_scale, config=config, interpret=interpret)
  group = num_q_heads // num_kv_heads
  out = merge_splits(o[..., :group, :], m[..., :group], l[..., :group])
  return out.reshape(q.shape).astype(q.dtype)
