"""Attention over the paged KV cache: metadata, cache writes, and backend dispatch.

Layouts are documented in docs/ARCHITECTURE.md. The XLA algorithms (paged_jax/xla_attention.py)
run everywhere and are the engine's reference; the Pallas kernels (pallas_kernels/) and the
CPU kernel (paged_jax/cpu_kernels/) read pages where they lie.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
from jax.sharding import PartitionSpec as P

from paged_jax import kv_quant, xla_attention
from paged_jax.sharding import TP


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    slot_mapping: jax.Array  # [T] int32
    query_start_loc: jax.Array  # [S + 1] int32
    seq_lens: jax.Array  # [S] int32
    block_tables: jax.Array  # [S, MB] int32
    logits_indices: jax.Array  # [S] int32 (or [T] for a dense all-token run)
    # int32 scalar: leading rows (and tokens) of a prefill step that are decodes; None: none.
    num_decodes: jax.Array | None = None
    # "prefill": every sequence's context is exactly its new tokens (nothing cached before),
    #   except the first num_decodes rows, which are decodes (one token over a cached context);
    # "decode": one new token per sequence; "mixed": anything else (cached prefix + new tokens).
    mode: str = dataclasses.field(default="prefill", metadata=dict(static=True))
    backend: str = dataclasses.field(default="xla", metadata=dict(static=True))


def write_kv(cache: jax.Array, new: jax.Array, slot_mapping: jax.Array,
             kv_scale: float = 1.0, in_place_kernel: bool = False) -> jax.Array:
    """cache [Hkv, N, B, D (+ 2 for int8's scale)]; new [T, Hkv, D]; returns the cache with
    new written (quantized to the pages' dtype, kv_quant.py; fp8 over kv_scale) at its
    slots. in_place_kernel (on the CPU, either backend): 8- and 16-bit float pages are written
    by the CPU kernel library (cpu_kernels.write_rows), whose cost is the rows, not the
    pool."""
    hkv, n, b, d = cache.shape
    rows = kv_quant.quantize(new, cache.dtype, kv_scale).transpose(1, 0, 2)
    if in_place_kernel and kv_quant.widened_by_cpu_scatter(cache.dtype):
        from paged_jax import cpu_kernels

        return cpu_kernels.write_rows(cache, rows, slot_mapping)
    flat = cache.reshape(hkv, n * b, d)
    flat = kv_quant.set_rows(flat, (slice(None), slot_mapping), rows)
    return flat.reshape(hkv, n, b, d)


@functools.cache
def _cpu_library_writes() -> bool:
    """On the CPU the XLA path's 8- and 16-bit cache writes go through the CPU kernel
    library too (write_kv), where it builds: XLA's own scatter there copies the pool."""
    if jax.default_backend() != "cpu":
        return False
    from paged_jax import cpu_kernels

    return cpu_kernels.unavailable_reason() is None


def as_stored(x: jax.Array, page_dtype, kv_scale: float) -> jax.Array:
    """x [T, Hkv, D] as pages of page_dtype give it back (itself when they hold its dtype)."""
    if page_dtype == x.dtype:
        return x
    stored = kv_quant.quantize(x, page_dtype, kv_scale)
    return kv_quant.dequantize(stored, x.shape[-1], kv_scale).astype(x.dtype)


def attention(q, k, v, kv_cache, md: AttentionMetadata, *, scale: float, sliding_window=None,
              softcap=None, kv_scales=(1.0, 1.0)):
    """q [T, Hq, D], k/v [T, Hkv, D]; kv_cache (k_cache, v_cache) or None for a dense run.
    sliding_window: keys within this many positions of the query (None: all before it);
    softcap: Gemma 2's attention logits capped at +-softcap by tanh (None: not capped);
    kv_scales: this layer's (k_scale, v_scale) for fp8 pages (kv_quant.py, kv_scales.py).

    Returns (out [T, Hq, D], new kv_cache).
    """
    if kv_cache is None:
        if md.mode != "prefill":
            raise ValueError(f"a run without a KV cache must be a prefill, got mode {md.mode!r}")
        return xla_attention.prefill_dense(q, k, v, md, scale, sliding_window,
                                           softcap=softcap), None
    if not kv_quant.is_fp8(kv_cache[0].dtype):
        kv_scales = (1.0, 1.0)  # per-tensor scales are fp8's; other pages store values as-is
    in_place = md.backend == "cpu" or (md.backend == "xla" and _cpu_library_writes())
    k_cache = write_kv(kv_cache[0], k, md.slot_mapping, kv_scales[0], in_place)
    v_cache = write_kv(kv_cache[1], v, md.slot_mapping, kv_scales[1], in_place)
    if md.backend == "pallas":
        out = _pallas(q, k_cache, v_cache, md, scale, sliding_window, softcap, kv_scales)
    elif md.backend == "cpu":
        from paged_jax import cpu_kernels  # lazily: builds the kernel on first use

        # One ragged kernel for every mode: decode rows of prefill steps are sequences with
        # one new token, so no separate pass (or lax.cond) is needed.
        out = cpu_kernels.paged_attention(q, k_cache, v_cache, md.query_start_loc, md.seq_lens,
                                          md.block_tables, scale=scale,
                                          sliding_window=sliding_window, softcap=softcap,
                                          k_scale=kv_scales[0], v_scale=kv_scales[1])
    elif md.mode == "prefill":
        # A prefill attends its new K/V as the pages hold them, as every other reader does,
        # so a prefix-cache hit, a recompute and a chunked prompt see the same keys.
        k, v = as_stored(k, k_cache.dtype, kv_scales[0]), as_stored(v, v_cache.dtype,
                                                                    kv_scales[1])
        out = xla_attention.prefill_tiled(q, k, v, md, scale, sliding_window, softcap=softcap)
        if md.num_decodes is not None:
            # Skipped at run time when no row decodes: even loops of zero trips cost here.
            out = jax.lax.cond(md.num_decodes > 0,
                               functools.partial(xla_attention.with_decode_rows,
                                                 softcap=softcap, kv_scales=kv_scales),
                               lambda out, *_: out, out, q, k_cache, v_cache, md, scale,
                               sliding_window)
    elif md.mode == "decode":
        out = xla_attention.decode(q, k_cache, v_cache, md, scale, sliding_window,
                                   softcap=softcap, kv_scales=kv_scales)
    else:
        out = xla_attention.mixed(q, k_cache, v_cache, md, scale, sliding_window,
                                  softcap=softcap, kv_scales=kv_scales)
    return out, (k_cache, v_cache)


def _pallas(q, k_cache, v_cache, md, scale, sliding_window, softcap, kv_scales):
    # Imported lazily: the kernels pull in Pallas/Triton lowering that the XLA path never needs.
    from pallas_kernels import ragged_paged_attention
    from pallas_kernels.dispatch import paged_decode

    features = dict(scale=scale, sliding_window=sliding_window, softcap=softcap,
                    k_scale=kv_scales[0], v_scale=kv_scales[1])
    if md.mode == "decode":
        return paged_decode(q, k_cache, v_cache, md.block_tables, md.seq_lens, **features)
    return ragged_paged_attention(q, k_cache, v_cache, md.block_tables, md.seq_lens,
                                  md.query_start_loc, **features)


# ---- attention under shard_map ---------------------------------------------------------------

def attention_per_kv_head(fn, q, k, v, kv_cache, md, **kwargs):
    """fn(q, k, v, kv_cache, md, **kwargs) on each device's KV heads when traced under a mesh
    with tp > 1 (jax.set_mesh, as the ModelRunner lowers its steps); fn itself otherwise.

    q [T, Hq, D] and k, v [T, Hkv, D] split on axis 1, the caches [Hkv, N, B, D] on axis 0,
    the metadata replicated: attention never mixes KV head groups, so no collective runs."""
    mesh = jax.sharding.get_abstract_mesh()
    if kv_cache is None or mesh.empty or TP not in mesh.axis_names or mesh.shape[TP] == 1:
        return fn(q, k, v, kv_cache, md, **kwargs)
    heads, cache = P(None, TP, None), P(TP)
    per_shard = jax.shard_map(functools.partial(fn, **kwargs), mesh=mesh,
                              in_specs=(heads, heads, heads, (cache, cache), P()),
                              out_specs=(heads, (cache, cache)), check_vma=False)
    return per_shard(q, k, v, tuple(kv_cache), md)
