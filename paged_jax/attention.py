"""Attention over the paged KV cache: metadata, cache writes, and backend dispatch.

Layouts are documented in docs/ARCHITECTURE.md. The XLA paths here run everywhere and are the
engine's reference; the Pallas kernels (pallas_kernels/) read pages where they lie.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

BACKENDS = ("xla", "pallas")
DECODE_PAGES_PER_STEP = 4  # blocks gathered per iteration of the XLA decode loop (CPU-tuned)
# "prefill": every sequence's context is exactly its new tokens (nothing cached before);
# "decode": one new token per sequence; "mixed": anything else (cached prefix + new tokens).
MODES = ("prefill", "decode", "mixed")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    slot_mapping: jax.Array  # [T] int32
    query_start_loc: jax.Array  # [S + 1] int32
    seq_lens: jax.Array  # [S] int32
    block_tables: jax.Array  # [S, MB] int32
    logits_indices: jax.Array  # [S] int32 (or [T] for a dense all-token run)
    mode: str = dataclasses.field(default="prefill", metadata=dict(static=True))
    backend: str = dataclasses.field(default="xla", metadata=dict(static=True))


def write_kv(cache: jax.Array, new: jax.Array, slot_mapping: jax.Array) -> jax.Array:
    """cache [Hkv, N, B, D]; new [T, Hkv, D]; returns the cache with new written at its slots."""
    hkv, n, b, d = cache.shape
    flat = cache.reshape(hkv, n * b, d)
    flat = flat.at[:, slot_mapping].set(new.transpose(1, 0, 2).astype(cache.dtype))
    return flat.reshape(hkv, n, b, d)


def attention(q, k, v, kv_cache, md: AttentionMetadata, *, scale: float, sliding_window=None):
    """q [T, Hq, D], k/v [T, Hkv, D]; kv_cache (k_cache, v_cache) or None for a dense run.

    Returns (out [T, Hq, D], new kv_cache).
    """
    if kv_cache is None:
        if md.mode != "prefill":
            raise ValueError(f"a run without a KV cache must be a prefill, got mode {md.mode!r}")
        return _prefill_xla(q, k, v, md, scale, sliding_window), None
    k_cache = write_kv(kv_cache[0], k, md.slot_mapping)
    v_cache = write_kv(kv_cache[1], v, md.slot_mapping)
    if md.backend == "pallas":
        out = _pallas(q, k_cache, v_cache, md, scale)
    elif md.mode == "prefill":
        out = _prefill_xla(q, k, v, md, scale, sliding_window)
    elif md.mode == "decode":
        out = _decode_xla(q, k_cache, v_cache, md, scale, sliding_window)
    else:
        out = _mixed_xla(q, k_cache, v_cache, md, scale, sliding_window)
    return out, (k_cache, v_cache)


def _token_seq_ids(md: AttentionMetadata, num_tokens: int) -> jax.Array:
    # Padding tokens past the last sequence get id S: they only see each other.
    return jnp.searchsorted(md.query_start_loc[1:], jnp.arange(num_tokens), side="right")


def _masked_softmax(scores, mask):
    """Softmax over the last axis in float32; fully masked rows give zeros, not NaNs."""
    scores = jnp.where(mask, scores, -jnp.inf)
    peak = jnp.max(scores, axis=-1, keepdims=True)
    weights = jnp.where(mask, jnp.exp(scores - jnp.where(jnp.isfinite(peak), peak, 0.0)), 0.0)
    return weights / jnp.maximum(jnp.sum(weights, axis=-1, keepdims=True), 1e-30)


def _prefill_xla(q, k, v, md, scale, sliding_window):
    """Causal attention among the step's own tokens, sequences kept apart by a segment mask."""
    t, hq, d = q.shape
    hkv = k.shape[1]
    seg = _token_seq_ids(md, t)
    pos = jnp.arange(t)  # flat index orders tokens within a sequence
    mask = (seg[:, None] == seg[None, :]) & (pos[None, :] <= pos[:, None])
    if sliding_window is not None:
        mask &= pos[:, None] - pos[None, :] < sliding_window
    qg = q.reshape(t, hkv, hq // hkv, d).astype(jnp.float32)
    scores = jnp.einsum("thgd,shd->hgts", qg, k.astype(jnp.float32)) * scale
    weights = _masked_softmax(scores, mask[None, None])
    out = jnp.einsum("hgts,shd->thgd", weights, v.astype(jnp.float32))
    return out.reshape(t, hq, d).astype(q.dtype)


def gather_pages(cache: jax.Array, block_tables: jax.Array) -> jax.Array:
    """cache [Hkv, N, B, D], block_tables [S, MB] -> [Hkv, S, MB * B, D] (no transpose: each
    extra pass over the gathered context costs as much as the gather on the CPU)."""
    hkv, _, b, d = cache.shape
    s, mb = block_tables.shape
    return cache[:, block_tables].reshape(hkv, s, mb * b, d)


def _decode_xla(q, k_cache, v_cache, md, scale, sliding_window):
    """One query per sequence: q [S, Hq, D] (T == S in decode steps).

    Walks the block table a few columns at a time with an online softmax, so only
    [Hkv, S, P * B, D] of K and V is gathered per iteration instead of the whole padded
    context; padded table entries all point at block 0, which stays in the CPU's caches.
    """
    s, hq, d = q.shape
    hkv, _, b, _ = k_cache.shape
    g = hq // hkv
    mb = md.block_tables.shape[1]
    pages = math.gcd(mb, DECODE_PAGES_PER_STEP)
    tables = md.block_tables.reshape(s, mb // pages, pages)
    qg = q.reshape(s, hkv, g, d).transpose(1, 0, 2, 3).astype(jnp.float32) * scale  # [Hkv,S,G,D]
    lo = (md.seq_lens - sliding_window if sliding_window is not None
          else jnp.zeros_like(md.seq_lens))

    def column(carry, j):
        peak, total, acc = carry
        k = k_cache[:, tables[:, j]].reshape(hkv, s, pages * b, d).astype(jnp.float32)
        v = v_cache[:, tables[:, j]].reshape(hkv, s, pages * b, d).astype(jnp.float32)
        pos = j * pages * b + jnp.arange(pages * b)
        valid = (pos[None, :] < md.seq_lens[:, None]) & (pos[None, :] >= lo[:, None])  # [S, B]
        scores = jnp.where(valid[None, :, None], jnp.einsum("hsgd,hsbd->hsgb", qg, k), -jnp.inf)
        new_peak = jnp.maximum(peak, scores.max(-1))
        p = jnp.exp(scores - new_peak[..., None])
        rescale = jnp.exp(peak - new_peak)
        acc = acc * rescale[..., None] + jnp.einsum("hsgb,hsbd->hsgd", p, v)
        return (new_peak, total * rescale + p.sum(-1), acc), None

    # The running max starts finite so fully masked columns give exp(-inf - m) = 0, not NaN.
    init = (jnp.full((hkv, s, g), -1e30, jnp.float32), jnp.zeros((hkv, s, g), jnp.float32),
            jnp.zeros((hkv, s, g, d), jnp.float32))
    (_, total, acc), _ = jax.lax.scan(column, init, jnp.arange(mb // pages))
    out = acc / jnp.maximum(total, 1e-30)[..., None]  # padded rows (seq_len 0) give zeros
    return out.transpose(1, 0, 2, 3).reshape(s, hq, d).astype(q.dtype)


def _mixed_xla(q, k_cache, v_cache, md, scale, sliding_window):
    """General ragged case: each token attends to its sequence's pages up to its position."""
    t, hq, d = q.shape
    hkv = k_cache.shape[0]
    seg = _token_seq_ids(md, t)
    s = md.seq_lens.shape[0]
    seg_c = jnp.minimum(seg, s - 1)
    qlen = md.query_start_loc[1:] - md.query_start_loc[:-1]
    qpos = md.seq_lens[seg_c] - qlen[seg_c] + (jnp.arange(t) - md.query_start_loc[seg_c])
    keys = gather_pages(k_cache, md.block_tables).astype(jnp.float32)  # [Hkv, S, L, D]
    vals = gather_pages(v_cache, md.block_tables).astype(jnp.float32)
    kpos = jnp.arange(keys.shape[2])
    mask = (kpos[None, :] <= qpos[:, None]) & (seg[:, None] < s)  # [T, L]
    if sliding_window is not None:
        mask &= kpos[None, :] > qpos[:, None] - sliding_window
    qg = q.reshape(t, hkv, hq // hkv, d).astype(jnp.float32)
    scores = jnp.einsum("thgd,htld->thgl", qg, keys[:, seg_c]) * scale
    weights = _masked_softmax(scores, mask[:, None, None, :])
    out = jnp.einsum("thgl,htld->thgd", weights, vals[:, seg_c])
    return out.reshape(t, hq, d).astype(q.dtype)


def _pallas(q, k_cache, v_cache, md, scale):
    # Imported lazily: the kernels pull in Pallas/Triton lowering that the XLA path never needs.
    from pallas_kernels import paged_attention, ragged_paged_attention

    if md.mode == "decode":
        return paged_attention(q, k_cache, v_cache, md.block_tables, md.seq_lens, scale=scale)
    return ragged_paged_attention(q, k_cache, v_cache, md.block_tables, md.seq_lens,
                                  md.query_start_loc, scale=scale)
