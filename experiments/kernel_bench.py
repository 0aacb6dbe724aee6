"""Decode-attention benchmark: our paged kernel vs JAX's shipped one, XLA gather, and dense.

Achieved bandwidth = bytes of K, V (each read once, up to each sequence's length), Q and the
output / time, set against a device-to-device copy measured in the same run. Paged overhead
is our paged kernel's latency over the best dense (contiguous) attention of the same
lengths (paper Fig. 18: 20-26% for vLLM's kernel over FasterTransformer's).

  python experiments/kernel_bench.py --batch_sizes=8,64 --context_lens=512,2048 \
      --block_sizes=16 --out=/tmp/kernel_bench.json

On a CPU the XLA paths and, in float32, the engine's C++ CPU kernel (decode) are timed (the
Pallas kernels would run interpreted).

KV page dtypes (issue 17): --kv_cache_dtypes times the decode kernels over pages of each
listed kv_cache_dtype instead (q stays in --dtype), on the same random data quantized with
paged_jax.kv_quant (fp8 with vLLM's calibrated scales, max |K| / 200 and max |V| / 100), and
reports per kernel seconds, decode tokens/s, KV bytes read per second (as stored: int8 rows
D + 2 bytes, fp8 1 byte a value) and tokens/s over the first listed dtype's:

  python experiments/kernel_bench.py --batch_sizes=64 --context_lens=2048 \
      --block_sizes=16,64 --kv_cache_dtypes=bfloat16,fp8_e4m3,int8 --out=/tmp/kv8.json

On a GPU: the Triton decode kernel (ours), the ragged kernel on the decode batch
(ours_ragged), the Mosaic GPU kernel on an H100/H200 where it takes the pages (int8 only at
block size >= 64; elsewhere dispatch.paged_decode runs ours, and the row says why) and the
XLA gather path; on a CPU: the C++ CPU kernel (ours_cpu) and the XLA gather path.
"""
from __future__ import annotations

import functools
import json
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from pallas_kernels import DecodeConfig, paged_attention, ragged_paged_attention
from pallas_kernels.paged_attention_mgpu import (MosaicDecodeConfig, paged_attention_mgpu,
                                                 ring_slots, supports)
from pallas_kernels import backend
from paged_jax import cpu_kernels, kv_quant
from paged_jax.config import KV_CACHE_DTYPES
from paged_jax.kv_scales import K_SCALE_CONSTANT, V_SCALE_CONSTANT
from pallas_kernels.reference import gather_pages

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
# say: the lines printed during the sweep, drawn above its bar rather than on it.
from progress import progress, say  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("batch_sizes", ["8", "64"], "sequences per step")
flags.DEFINE_list("context_lens", ["256", "2048"], "tokens of context per sequence")
flags.DEFINE_list("block_sizes", ["8", "16", "32"], "KV block sizes to sweep")
flags.DEFINE_integer("num_q_heads", 64, "query heads")
flags.DEFINE_integer("num_kv_heads", 8, "KV heads")
flags.DEFINE_integer("head_size", 128, "head size")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float16", "float32"], "cache/query dtype")
flags.DEFINE_integer("iters", 20, "timed calls per repetition")
flags.DEFINE_integer("reps", 5, "repetitions (the median is reported)")
flags.DEFINE_bool("tune", False, "also sweep our kernel's DecodeConfig at every point")
flags.DEFINE_bool("tune_mosaic", False, "also sweep the Mosaic GPU kernel's MosaicDecodeConfig")
flags.DEFINE_float("max_rel_err", 2e-2, "an implementation whose output is further than this "
                   "(relative L2) from a float32 dense reference is reported as wrong")
flags.DEFINE_string("out", "", "write results as JSON here")
flags.DEFINE_list("kv_cache_dtypes", [], "time the decode kernels over KV pages of each of "
                  f"these kv_cache_dtypes ({', '.join(KV_CACHE_DTYPES)}; auto: --dtype), q "
                  "in --dtype, instead of comparing implementations; ratios are to the first "
                  "listed. Empty: the implementation comparison")
flags.DEFINE_integer("copy_mib", 1024, "MiB per launch of the copy-bandwidth measurement")

PAPER_OVERHEAD = "20-26%"


def _seconds(fn, *args, calls: int, launches: int = 1, best: bool = False) -> float:
  """Median (or best) over `reps` of the seconds per call; `launches` dispatches per rep."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(FLAGS.reps):
    start = time.perf_counter()
    for _ in range(launches):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / (calls * launches))
  return min(times) if best else statistics.median(times)


def time_fn(fn, q, *rest) -> float:
  """Median device seconds per call of fn(q, *rest) -> q-shaped.

  `iters` calls run inside one jitted program, each feeding the next (q + eps * out, eps a
  runtime 0), so neither host dispatch nor CSE hides the kernel; the tiny add per call
  (about 2 us on an H100) is included.
  """
  fn = jax.jit(fn)  # identical nested calls are lowered (and compiled) once

  @jax.jit
  def chain(eps, q, *rest):
    for _ in range(FLAGS.iters):
      q = q + eps * fn(q, *rest)
    return q

  return _seconds(chain, jnp.zeros((), q.dtype), q, *rest, calls=FLAGS.iters)


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
  """Bytes moved (read + write) per second by an elementwise device copy (best of reps;
  ten back-to-back launches of 1 GiB each (--copy_mib), so dispatch is hidden)."""
  x = jnp.ones((nbytes // 4,), jnp.float32)
  seconds = _seconds(jax.jit(lambda a: a + 1.0), x, calls=1, launches=10, best=True)
  return 2 * nbytes / seconds


def make_inputs(rng, batch, context, block_size, dtype):
  hq, hkv, d = FLAGS.num_q_heads, FLAGS.num_kv_heads, FLAGS.head_size
  max_blocks = -(-context // block_size)
  num_blocks = 1 + batch * max_blocks
  tables = (1 + rng.permutation(batch * max_blocks)).reshape(batch, max_blocks)
  key = jax.random.key(0)
  kk, kv, kq = jax.random.split(key, 3)
  shape = (hkv, num_blocks, block_size, d)
  k_cache = jax.random.normal(kk, shape, dtype)
  v_cache = jax.random.normal(kv, shape, dtype)
  q = jax.random.normal(kq, (batch, hq, d), dtype)
  lens = jnp.full((batch,), context, jnp.int32)
  return q, k_cache, v_cache, jnp.asarray(tables, jnp.int32), lens


def _attend_xla(q, k, v, lens, scale):
  """q [S, Hq, D]; k, v [S, Hkv, L, D] contiguous -> [S, Hq, D]; f32 softmax."""
  s, hq, d = q.shape
  hkv, length = k.shape[1], k.shape[2]
  qg = q.reshape(s, hkv, hq // hkv, d)
  logits = jnp.einsum("shgd,shld->shgl", qg, k, preferred_element_type=jnp.float32) * scale
  logits = jnp.where(jnp.arange(length) < lens[:, None, None, None], logits, -jnp.inf)
  w = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("shgl,shld->shgd", w, v, preferred_element_type=jnp.float32
                    ).astype(q.dtype).reshape(q.shape)


@functools.partial(jax.jit, static_argnames=("scale",))
def xla_gather(q, k_cache, v_cache, tables, lens, *, scale):
  return _attend_xla(q, gather_pages(k_cache, tables), gather_pages(v_cache, tables), lens, scale)


def implementations(on_gpu: bool, scale: float, context: int, max_blocks: int, dtype):
  """name -> (fn, layout) where layout 'paged' or 'dense' picks the arguments."""
  impls = {"xla_gather": (functools.partial(xla_gather, scale=scale), "paged"),
           "xla_dense": (jax.jit(functools.partial(_attend_xla, scale=scale)), "dense")}
  if not on_gpu:
    if dtype == jnp.float32 and cpu_kernels.unavailable_reason() is None:
      # The engine's CPU kernel (C++ through the XLA FFI) on decode rows; float32 only.
      impls["ours_cpu"] = (jax.jit(lambda q, k, v, t, l: cpu_kernels.paged_decode(
          q, k, v, l, t, scale=scale)), "paged")
    return impls
  impls["ours"] = (functools.partial(paged_attention, scale=scale), "paged")
  # The same kernel with every sequence's pages in order: what page scattering costs.
  impls["ours_contiguous"] = (functools.partial(paged_attention, scale=scale), "contiguous")
  impls["ours_ragged"] = (lambda q, k, v, t, l: ragged_paged_attention(
      q, k, v, t, l, jnp.arange(q.shape[0] + 1, dtype=jnp.int32), scale=scale), "paged")
  if _on_hopper():
    # The Mosaic GPU (TMA + wgmma) variant; failures to lower are reported per point.
    impls["ours_mosaic"] = (functools.partial(paged_attention_mgpu, scale=scale), "paged")
  try:  # JAX's shipped Pallas (Triton) kernels; deprecated on JAX main.
    from jax.experimental.pallas.ops.gpu import decode_attention, paged_attention as jax_paged
    splits = max(k for k in (1, 2, 4, 8, 16) if max_blocks % k == 0)
    pages = max(p for p in (1, 2, 4, 8) if (max_blocks // splits) % p == 0)
    # It takes no softmax scale: q is scaled first (one small fused multiply per call).
    impls["jax_paged"] = (lambda q, k, v, t, l: jax_paged.paged_attention(
        q * scale, k, v, t, l, k_splits=splits, pages_per_compute_block=pages), "paged")
    dense_splits = max(k for k in (1, 2, 4, 8, 16) if context % k == 0 and context // k >= 16)
    impls["pallas_dense"] = (lambda q, k, v, l: decode_attention.gqa(
        q, k, v, kv_seq_len=l, sm_scale=scale, k_splits=dense_splits), "dense_token_major")
  except Exception as e:  # noqa: BLE001 - report and carry on with the rest
    say(f"JAX's shipped Pallas kernels unavailable: {e!r}")
  return impls


def rel_err(out, ref) -> float:
  """||out - ref|| / ||ref||, in float32."""
  out = jnp.asarray(out, jnp.float32)
  return float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))


def _on_hopper() -> bool:
  return any(card in jax.devices()[0].device_kind for card in ("H100", "H200"))


@functools.partial(jax.jit, static_argnames=("scale", "k_scale", "v_scale"))
def xla_gather_dequant(q, k_cache, v_cache, tables, lens, *, scale, k_scale, v_scale):
  """The XLA path over pages of any kv_cache_dtype: gather the stored pages, dequantize them
  (kv_quant) to q's dtype, attend."""
  d = q.shape[-1]
  k = kv_quant.dequantize(gather_pages(k_cache, tables), d, k_scale).astype(q.dtype)
  v = kv_quant.dequantize(gather_pages(v_cache, tables), d, v_scale).astype(q.dtype)
  return _attend_xla(q, k, v, lens, scale)


def kv_dtype_implementations(on_gpu, q, k_cache, scale, k_scale, v_scale):
  """name -> fn(q, k, v, tables, lens), or a str: why that kernel does not run these pages."""
  scales = dict(scale=scale, k_scale=k_scale, v_scale=v_scale)
  impls = {}
  if on_gpu:
    impls["ours"] = functools.partial(paged_attention, **scales)
    impls["ours_ragged"] = lambda q, k, v, t, l: ragged_paged_attention(
        q, k, v, t, l, jnp.arange(q.shape[0] + 1, dtype=jnp.int32), **scales)
    if _on_hopper():
      reason = supports(q, k_cache)
      impls["ours_mosaic"] = (functools.partial(paged_attention_mgpu, **scales)
                              if reason is None else
                              f"not taken ({reason}); dispatch.paged_decode runs ours")
  elif cpu_kernels.unavailable_reason() is None:
    impls["ours_cpu"] = lambda q, k, v, t, l: cpu_kernels.paged_decode(q, k, v, l, t, **scales)
  else:
    impls["ours_cpu"] = f"unavailable: {cpu_kernels.unavailable_reason()}"
  impls["xla_gather"] = functools.partial(xla_gather_dequant, **scales)
  return impls


def bench_kv_dtypes_point(rng, batch, context, block_size, dtype, copy_bw, on_gpu):
  """Every listed kv_cache_dtype at one point, on the same data: float32 normals quantized
  (kv_quant.quantize) into pages of each dtype. Each output is checked against float32
  dense attention over the dequantized pages (what the kernel must compute); quant_rel_err
  is that reference against attention over the unquantized values (what the pages lose).
  Returns flat rows, one per (dtype, implementation)."""
  q, k_exact, v_exact, tables, lens = make_inputs(rng, batch, context, block_size,
                                                  jnp.float32)
  q = q.astype(dtype)
  hq, hkv, d = FLAGS.num_q_heads, FLAGS.num_kv_heads, FLAGS.head_size
  scale = d ** -0.5
  attend = jax.jit(functools.partial(_attend_xla, scale=scale))
  dense = lambda cache: gather_pages(cache, tables)[:, :, :context]
  q32 = q.astype(jnp.float32)
  ref_exact = attend(q32, dense(k_exact), dense(v_exact), lens)
  # vLLM's calibrated fp8 scales (kv_scales.calculate_kv_scales) from this data's maxima.
  fp8_scales = (float(jnp.max(jnp.abs(k_exact))) / K_SCALE_CONSTANT,
                float(jnp.max(jnp.abs(v_exact))) / V_SCALE_CONSTANT)
  rows, first = [], {}
  for name in FLAGS.kv_cache_dtypes:
    page_dtype, extra = kv_quant.storage(name, dtype.name)
    k_scale, v_scale = fp8_scales if kv_quant.is_fp8(page_dtype) else (1.0, 1.0)
    k_cache = kv_quant.quantize(k_exact, page_dtype, k_scale)
    v_cache = kv_quant.quantize(v_exact, page_dtype, v_scale)
    ref = attend(q32, dense(kv_quant.dequantize(k_cache, d, k_scale)),
                 dense(kv_quant.dequantize(v_cache, d, v_scale)), lens)
    kv_bytes = 2 * batch * context * hkv * (d + extra) * page_dtype.itemsize
    nbytes = kv_bytes + 2 * batch * hq * d * dtype.itemsize  # and q in, out
    base = dict(batch=batch, context=context, block_size=block_size, kv_cache_dtype=name,
                page_dtype=page_dtype.name, k_scale=k_scale, v_scale=v_scale,
                kv_bytes=kv_bytes, quant_rel_err=rel_err(ref, ref_exact))
    args = (q, k_cache, v_cache, tables, lens)
    line = []
    for impl, fn in kv_dtype_implementations(on_gpu, q, k_cache, scale, k_scale,
                                             v_scale).items():
      row = dict(base, impl=impl)
      rows.append(row)
      if isinstance(fn, str):
        row["skipped"] = fn
        line.append(f"{impl} {fn}")
        continue
      try:
        err = rel_err(jax.jit(fn)(*args), ref)
        seconds = time_fn(fn, *args)
      except Exception as e:  # noqa: BLE001 - report and carry on with the rest
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        line.append(f"{impl} failed: {row['error']}")
        continue
      wrong = not err <= FLAGS.max_rel_err  # NaN too
      row.update(us=seconds * 1e6, tokens_per_s=batch / seconds, kv_gbps=kv_bytes / seconds / 1e9,
                 pct_copy=100 * nbytes / seconds / copy_bw, rel_err=err, wrong=wrong)
      if not wrong and name == FLAGS.kv_cache_dtypes[0]:
        first[impl] = row["tokens_per_s"]
      if not wrong and impl in first:
        row["speedup_vs_first"] = row["tokens_per_s"] / first[impl]
      line.append(f"{impl} {row['us']:.0f}us {row['tokens_per_s'] / 1e3:.0f}k tok/s "
                  f"{row['kv_gbps']:.1f} GB/s KV ({row['pct_copy']:.0f}% copy)"
                  + (f" WRONG: relative error {err:.3g} > {FLAGS.max_rel_err}" if wrong else
                     f" {row['speedup_vs_first']:.2f}x" if "speedup_vs_first" in row else ""))
    say(f"B={block_size:3d} batch={batch:3d} ctx={context:5d} {name:>9} "
        f"(quant err {base['quant_rel_err']:.3g}): " + "  ".join(line))
    del k_cache, v_cache, ref
  return rows


def bench_point(rng, batch, context, block_size, dtype, copy_bw, on_gpu):
  q, k_cache, v_cache, tables, lens = make_inputs(rng, batch, context, block_size, dtype)
  scale = FLAGS.head_size ** -0.5
  k_dense = gather_pages(k_cache, tables)[:, :, :context]  # [S, Hkv, L, D]
  v_dense = gather_pages(v_cache, tables)[:, :, :context]
  contiguous = 1 + jnp.arange(tables.size, dtype=jnp.int32).reshape(tables.shape)
  itemsize = jnp.dtype(dtype).itemsize
  nbytes = (2 * batch * context * FLAGS.num_kv_heads + 2 * q.shape[0] * q.shape[1]) \
      * FLAGS.head_size * itemsize
  row = dict(batch=batch, context=context, block_size=block_size, bytes=nbytes)
  # Every timing is of a function checked against float32 dense attention on the same data
  # (the contiguous layout reads other pages, so it has its own reference).
  f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
  attend = jax.jit(functools.partial(_attend_xla, scale=scale))
  ref = attend(f32(q), f32(k_dense), f32(v_dense), lens)
  ref_contiguous = attend(f32(q), f32(gather_pages(k_cache, contiguous)[:, :, :context]),
                          f32(gather_pages(v_cache, contiguous)[:, :, :context]), lens)
  for name, (fn, layout) in implementations(on_gpu, scale, context, tables.shape[1], dtype).items():
    args = {"paged": (q, k_cache, v_cache, tables, lens), "dense": (q, k_dense, v_dense, lens),
            "contiguous": (q, k_cache, v_cache, contiguous, lens),
            "dense_token_major": (q, k_dense.transpose(0, 2, 1, 3),
                                  v_dense.transpose(0, 2, 1, 3), lens)}[layout]
    try:
      err = rel_err(jax.jit(fn)(*args), ref_contiguous if layout == "contiguous" else ref)
      seconds = time_fn(fn, *args)
    except Exception as e:  # noqa: BLE001
      say(f"  {name}: failed: {type(e).__name__}: {str(e)[:300]}")
      continue
    wrong = not err <= FLAGS.max_rel_err  # NaN too
    if wrong:
      say(f"  {name}: WRONG: relative error {err:.3g} > {FLAGS.max_rel_err}")
    row[name] = dict(us=seconds * 1e6, gbps=nbytes / seconds / 1e9,
                     pct_copy=100 * nbytes / seconds / copy_bw, rel_err=err, wrong=wrong)
  if on_gpu and FLAGS.tune:
    row["tuning"] = tune(q, k_cache, v_cache, tables, lens, scale, nbytes)
  if on_gpu and FLAGS.tune_mosaic and "ours_mosaic" in row:
    row["tuning_mosaic"] = tune_mosaic((q, k_cache, v_cache, tables, lens), ref, scale, nbytes)
  # Ratios only between implementations whose output passed the check.
  ok = {n: v for n, v in row.items() if isinstance(v, dict) and not v["wrong"]}
  dense = [ok[n]["us"] for n in ("pallas_dense", "xla_dense") if n in ok]
  paged = ok.get("ours", ok.get("ours_cpu", ok.get("xla_gather")))
  if dense and paged:
    row["paged_overhead_pct"] = 100 * (paged["us"] / min(dense) - 1)
  if "ours" in ok and "jax_paged" in ok:
    row["speedup_vs_jax_paged"] = ok["jax_paged"]["us"] / ok["ours"]["us"]
  if "ours" in ok and "ours_mosaic" in ok:
    row["mosaic_speedup_vs_ours"] = ok["ours"]["us"] / ok["ours_mosaic"]["us"]
  return row


def tune(q, k_cache, v_cache, tables, lens, scale, nbytes):
  results = []
  block_size = k_cache.shape[2]
  for tokens in (32, 64, 128):
    for splits in (1, 2):
      for stages in (2, 3, 4):
        config = DecodeConfig(pages_per_compute_block=max(1, tokens // block_size),
                              k_splits=splits, num_warps=4, num_stages=stages)
        fn = functools.partial(paged_attention, scale=scale, config=config)
        try:
          seconds = time_fn(fn, q, k_cache, v_cache, tables, lens)
        except Exception as e:  # noqa: BLE001
          say(f"  tune {config}: failed: {type(e).__name__}")
          continue
        results.append(dict(tokens_per_step=tokens, k_splits=splits, num_stages=stages,
                            us=seconds * 1e6, gbps=nbytes / seconds / 1e9))
  results.sort(key=lambda r: r["us"])
  for r in results[:5]:
    say(f"  tune: {r}")
  return results


def tune_mosaic(args, ref, scale, nbytes):
  """Sweeps MosaicDecodeConfig (keys per step, ring depth, output chunk, p from registers);
  each configuration's output is checked before it is timed. A ring that does not fit is
  cut (ring_slots): such configurations are the same kernel as a shallower one, and skipped."""
  q, k_cache = args[0], args[1]
  head_size, block_size = k_cache.shape[3], k_cache.shape[2]
  results, seen = [], set()
  for tokens, slots in ((64, 2), (64, 3), (64, 4), (128, 2), (128, 3)):
    for out_cols in (64, 128):
      for p_regs in (False, True):
        config = MosaicDecodeConfig(tokens_per_step=tokens, num_slots=slots,
                                    out_cols=out_cols, p_from_registers=p_regs)
        runs = ring_slots(config, head_size, block_size, q.dtype, interpret=False)
        if (tokens, runs, out_cols, p_regs) in seen:
          say(f"  tune_mosaic {config}: runs with {runs} slots, already timed")
          continue
        seen.add((tokens, runs, out_cols, p_regs))
        fn = functools.partial(paged_attention_mgpu, scale=scale, config=config)
        try:
          err = rel_err(jax.jit(fn)(*args), ref)
          seconds = time_fn(fn, *args)
        except Exception as e:  # noqa: BLE001
          say(f"  tune_mosaic {config}: failed: {type(e).__name__}: {str(e)[:200]}")
          continue
        if not err <= FLAGS.max_rel_err:
          say(f"  tune_mosaic {config}: WRONG: relative error {err:.3g}")
        results.append(dict(tokens_per_step=tokens, num_slots=runs, out_cols=out_cols,
                            p_from_registers=p_regs, us=seconds * 1e6,
                            gbps=nbytes / seconds / 1e9, rel_err=err))
  results.sort(key=lambda r: r["us"])
  for r in results[:6]:
    say(f"  tune_mosaic: {r}")
  return results


def main(argv):
  del argv
  on_gpu = backend.on_gpu()
  device = jax.devices()[0]
  dtype = jnp.dtype(FLAGS.dtype)
  print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
        f"Hq={FLAGS.num_q_heads} Hkv={FLAGS.num_kv_heads} D={FLAGS.head_size} {dtype.name}")
  if not on_gpu and not FLAGS.kv_cache_dtypes:
    print("CPU: timing the XLA paths and the CPU kernel (float32); the Pallas kernels' "
          "numbers need a GPU.")
  copy_bw = copy_bandwidth(FLAGS.copy_mib << 20)
  print(f"measured copy bandwidth: {copy_bw / 1e9:.0f} GB/s (read + write)")
  rng = np.random.default_rng(0)
  if FLAGS.kv_cache_dtypes:
    return main_kv_dtypes(rng, dtype, copy_bw, on_gpu, device)
  rows = []
  for block_size, batch, context in sweep("kernel bench"):
    row = bench_point(rng, batch, context, block_size, dtype, copy_bw, on_gpu)
    rows.append(row)
    timings = "  ".join(f"{n} {v['us']:.0f}us {v['pct_copy']:.0f}%"
                        + (" (WRONG)" if v["wrong"] else "")
                        for n, v in row.items() if isinstance(v, dict))
    extra = ""
    if "paged_overhead_pct" in row:
      extra += f"  paged overhead {row['paged_overhead_pct']:.0f}% (paper {PAPER_OVERHEAD})"
    if "speedup_vs_jax_paged" in row:
      extra += f"  vs jax_paged {row['speedup_vs_jax_paged']:.2f}x"
    if "mosaic_speedup_vs_ours" in row:
      extra += f"  mosaic vs ours {row['mosaic_speedup_vs_ours']:.2f}x"
    say(f"B={block_size:3d} batch={batch:3d} ctx={context:5d}: {timings}{extra}")
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump(dict(device=device.device_kind, jax=jax.__version__, dtype=dtype.name,
                     copy_gbps=copy_bw / 1e9, num_q_heads=FLAGS.num_q_heads,
                     num_kv_heads=FLAGS.num_kv_heads, head_size=FLAGS.head_size,
                     rows=rows), f, indent=1)


def sweep(desc: str):
  """The flags' (block size, batch, context) points, with a progress bar that steps after
  each point's timings."""
  bar = progress(len(FLAGS.block_sizes) * len(FLAGS.batch_sizes) * len(FLAGS.context_lens),
                 desc, unit="point")
  for block_size in map(int, FLAGS.block_sizes):
    for batch in map(int, FLAGS.batch_sizes):
      for context in map(int, FLAGS.context_lens):
        bar.set_postfix_str(f"B={block_size} batch={batch} ctx={context}")
        yield block_size, batch, context
        bar.update()
  bar.close()


# What each implementation of the KV-dtype rows is (the JSON carries this legend).
KV_DTYPE_IMPLS = dict(
    ours="the Triton-lowered Pallas decode kernel (paged_attention; dispatch.paged_decode's "
         "kernel under COMPILED_BACKEND triton, and wherever the Mosaic kernel is not taken)",
    ours_ragged="the Triton-lowered ragged kernel (ragged_paged_attention) on the decode batch",
    ours_mosaic="the Mosaic GPU decode kernel (paged_attention_mgpu), H100/H200 only; "
                "skipped, with supports()'s reason, where it does not take the pages",
    ours_cpu="the C++ CPU kernel (paged_jax.cpu_kernels.paged_decode)",
    xla_gather="XLA: gather the stored pages, dequantize (kv_quant) to q's dtype, attend")


def write_kv_dtypes(rows, dtype, copy_bw, device) -> None:
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump(dict(device=device.device_kind, jax=jax.__version__, dtype=dtype.name,
                     kv_cache_dtypes=FLAGS.kv_cache_dtypes, copy_gbps=copy_bw / 1e9,
                     compiled_backend=backend.COMPILED_BACKEND,
                     num_q_heads=FLAGS.num_q_heads, num_kv_heads=FLAGS.num_kv_heads,
                     head_size=FLAGS.head_size, iters=FLAGS.iters, reps=FLAGS.reps,
                     impls=KV_DTYPE_IMPLS, rows=rows), f, indent=1)


def main_kv_dtypes(rng, dtype, copy_bw, on_gpu, device):
  for name in FLAGS.kv_cache_dtypes:
    kv_quant.storage(name, dtype.name)  # raises on an unknown name, before any timing
  print(f"KV page dtypes {', '.join(FLAGS.kv_cache_dtypes)} (q in {dtype.name}); tokens/s "
        f"ratios are to {FLAGS.kv_cache_dtypes[0]}'s, kernel by kernel"
        + ("" if on_gpu else "; CPU: the C++ CPU kernel and the XLA gather path"))
  rows = []
  for block_size, batch, context in sweep("kernel bench (KV dtypes)"):
    rows += bench_kv_dtypes_point(rng, batch, context, block_size, dtype, copy_bw, on_gpu)
    write_kv_dtypes(rows, dtype, copy_bw, device)  # after each point: a timeout keeps them
  print("block batch context kv_cache_dtype impl: us, tokens/s, KV GB/s, x first dtype")
  for r in rows:
    figures = (f"{r['us']:.0f} us, {r['tokens_per_s']:.0f} tok/s, {r['kv_gbps']:.1f} GB/s, "
               + (f"{r['speedup_vs_first']:.2f}x" if "speedup_vs_first" in r else
                  "WRONG" if r["wrong"] else "no first-dtype figure")
               if "us" in r else r.get("skipped") or f"failed: {r['error']}")
    print(f"{r['block_size']} {r['batch']} {r['context']} {r['kv_cache_dtype']} {r['impl']}: "
          f"{figures}")


if __name__ == "__main__":
  app.run(main)
