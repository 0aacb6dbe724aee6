"""The XLA attention algorithms over the paged KV cache: they run on every platform and are the
engine's reference for the kernels (pallas_kernels/, paged_jax/cpu_kernels/).

Each takes q [T, Hq, D], the caches [Hkv, N, B, D] (the step's K/V already written) and the
step's AttentionMetadata (paged_jax/attention.py), and returns [T, Hq, D]:

  prefill_dense     causal attention among the step's own tokens, flat (the dense reference)
  prefill_tiled     the same at a cost that grows with each sequence's own length
  decode            one query per sequence, walking its block table (row groups)
  with_decode_rows  a prefill step whose first rows are decodes
  mixed             the general ragged case: new tokens over a cached prefix, decodes among them
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from paged_jax.kv_quant import dequantize

DECODE_PAGES_PER_STEP = 4  # blocks gathered per iteration of the XLA decode loop (CPU-tuned)
# Decode rows are attended in groups of this many, each group's loop stopping at its own
# longest sequence; the engine sorts decode rows by length, so little of a group is padding.
DECODE_ROW_GROUP = 8
PREFILL_TILE = 32  # query and key tile of the XLA prefill loop (CPU-tuned: 32 < 64 < 128 here)


def _token_seq_ids(md, num_tokens: int) -> jax.Array:
    # Padding tokens past the last sequence get id S: they only see each other.
    return jnp.searchsorted(md.query_start_loc[1:], jnp.arange(num_tokens), side="right")


def _cap(scores, softcap):
    """Gemma 2's logit soft-capping, applied to the scaled scores before masking."""
    return scores if softcap is None else softcap * jnp.tanh(scores / softcap)


def _masked_softmax(scores, mask):
    """Softmax over the last axis in float32; fully masked rows give zeros, not NaNs."""
    scores = jnp.where(mask, scores, -jnp.inf)
    peak = jnp.max(scores, axis=-1, keepdims=True)
    weights = jnp.where(mask, jnp.exp(scores - jnp.where(jnp.isfinite(peak), peak, 0.0)), 0.0)
    return weights / jnp.maximum(jnp.sum(weights, axis=-1, keepdims=True), 1e-30)


def _online_softmax_step(carry, scores, values, pv: str):
    """One block of keys into a running (peak, total, acc) softmax-weighted sum: scores
    [..., K] (masked entries -inf), values contracted with the weights by einsum spec pv."""
    peak, total, acc = carry
    new_peak = jnp.maximum(peak, scores.max(-1))
    p = jnp.exp(scores - new_peak[..., None])
    rescale = jnp.exp(peak - new_peak)
    acc = acc * rescale[..., None] + jnp.einsum(pv, p, values)
    return new_peak, total * rescale + p.sum(-1), acc


def prefill_dense(q, k, v, md, scale, sliding_window, *, softcap=None):
    """Causal attention among the step's own tokens, sequences kept apart by a segment mask.

    Flat over the step (cost grows with the square of its tokens): the dense run's attention
    and the reference for prefill_tiled, which the engine uses."""
    t, hq, d = q.shape
    hkv = k.shape[1]
    seg = _token_seq_ids(md, t)
    pos = jnp.arange(t)  # flat index orders tokens within a sequence
    mask = (seg[:, None] == seg[None, :]) & (pos[None, :] <= pos[:, None])
    if sliding_window is not None:
        mask &= pos[:, None] - pos[None, :] < sliding_window
    qg = q.reshape(t, hkv, hq // hkv, d).astype(jnp.float32)
    scores = _cap(jnp.einsum("thgd,shd->hgts", qg, k.astype(jnp.float32)) * scale, softcap)
    weights = _masked_softmax(scores, mask[None, None])
    out = jnp.einsum("hgts,shd->thgd", weights, v.astype(jnp.float32))
    return out.reshape(t, hq, d).astype(q.dtype)


def prefill_tiled(q, k, v, md, scale, sliding_window, tile: int = PREFILL_TILE, *,
                  softcap=None):
    """prefill_dense's result at a cost that grows with each sequence's own length.

    The step's tokens are cut into tiles; a query tile visits only the key tiles from the one
    holding its first sequence's start up to itself (a loop with a data-dependent start), with
    an online softmax. Tiles of padding only are skipped and give zeros.
    """
    t, hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    c = min(tile, t)
    n = -(-t // c)
    pad = n * c - t
    if pad:
        q, k, v = (jnp.pad(x, ((0, pad), (0, 0), (0, 0))) for x in (q, k, v))
    s = md.seq_lens.shape[0]
    seg = _token_seq_ids(md, n * c)  # padding tokens get id s
    # Key tile where each query tile's first sequence starts; a tile of padding starts past
    # itself, so its loop runs zero times.
    first = seg[::c]
    lo = jnp.where(first < s, md.query_start_loc[jnp.minimum(first, s - 1)] // c,
                   jnp.arange(n) + 1)
    if sliding_window is not None:
        lo = jnp.maximum(lo, (jnp.arange(n) * c - sliding_window + 1) // c)
    qt = (q.astype(jnp.float32) * scale).reshape(n, c, hkv, g, d).transpose(0, 2, 3, 1, 4)
    kt = k.astype(jnp.float32).reshape(n, c, hkv, d).transpose(0, 2, 1, 3)  # [n, Hkv, c, D]
    vt = v.astype(jnp.float32).reshape(n, c, hkv, d).transpose(0, 2, 1, 3)
    segt = seg.reshape(n, c)

    def query_tile(_, i):
        qi, qseg = qt[i], segt[i]  # [Hkv, G, c, D], [c]
        qpos = i * c + jnp.arange(c)

        def key_tile(j, carry):
            kpos = j * c + jnp.arange(c)
            mask = (qseg[:, None] == segt[j][None, :]) & (kpos[None, :] <= qpos[:, None])
            if sliding_window is not None:
                mask &= qpos[:, None] - kpos[None, :] < sliding_window
            scores = jnp.where(mask, _cap(jnp.einsum("hgqd,hkd->hgqk", qi, kt[j]), softcap),
                               -jnp.inf)
            return _online_softmax_step(carry, scores, vt[j], "hgqk,hkd->hgqd")

        init = (jnp.full((hkv, g, c), -1e30, jnp.float32), jnp.zeros((hkv, g, c), jnp.float32),
                jnp.zeros((hkv, g, c, d), jnp.float32))
        _, total, acc = jax.lax.fori_loop(lo[i], i + 1, key_tile, init)
        return None, acc / jnp.maximum(total, 1e-30)[..., None]

    _, out = jax.lax.scan(query_tile, None, jnp.arange(n))  # [n, Hkv, G, c, D]
    out = out.transpose(0, 3, 1, 2, 4).reshape(n * c, hq, d)[:t]
    return out.astype(q.dtype)


def with_decode_rows(out, q, k_cache, v_cache, md, scale, sliding_window, *, softcap=None,
                     kv_scales=(1.0, 1.0)):
    """A prefill step whose first num_decodes rows are decodes: those rows' tokens (the first
    num_decodes tokens) attend over their pages instead. Rows past num_decodes get length 0,
    so their groups of the decode loop run no iteration."""
    t, s = q.shape[0], md.seq_lens.shape[0]
    rows = jnp.arange(s)
    dec_lens = jnp.where(rows < md.num_decodes, md.seq_lens, 0)
    dec = decode(q[:s], k_cache, v_cache,
                      dataclasses.replace(md, seq_lens=dec_lens, mode="decode"),
                      scale, sliding_window, softcap=softcap, kv_scales=kv_scales)
    dec = jnp.pad(dec, ((0, t - s), (0, 0), (0, 0)))
    return jnp.where((jnp.arange(t) < md.num_decodes)[:, None, None], dec, out)


def decode(q, k_cache, v_cache, md, scale, sliding_window, *, softcap=None,
           kv_scales=(1.0, 1.0)):
    """One query per sequence: q [S, Hq, D] (T == S in decode steps), in row groups.
    kv_scales: fp8 pages' (k_scale, v_scale) (kv_quant.py)."""
    s = q.shape[0]
    parts = []
    for lo in range(0, s, DECODE_ROW_GROUP):
        rows = slice(lo, lo + DECODE_ROW_GROUP)
        parts.append(decode_rows(q[rows], k_cache, v_cache, md.seq_lens[rows],
                                  md.block_tables[rows], scale, sliding_window,
                                  softcap=softcap, kv_scales=kv_scales))
    return jnp.concatenate(parts)


def decode_rows(q, k_cache, v_cache, seq_lens, block_tables, scale, sliding_window, *,
                softcap=None, kv_scales=(1.0, 1.0)):
    """Decode attention of some rows: q [S, Hq, D], seq_lens [S], block_tables [S, MB].

    Walks the block table a few columns at a time with an online softmax, so only
    [Hkv, S, P * B, D] of K and V is gathered per iteration instead of the whole padded
    context. The loop stops at the longest of these rows (a data-dependent trip count), so
    a wide table costs nothing past it: one table width serves every decode step.
    Padded entries of shorter sequences point at block 0, which stays in the CPU's caches.
    """
    s, hq, d = q.shape
    hkv, _, b, _ = k_cache.shape
    g = hq // hkv
    mb = block_tables.shape[1]
    pages = math.gcd(mb, DECODE_PAGES_PER_STEP)
    tables = block_tables.reshape(s, mb // pages, pages)
    qg = q.reshape(s, hkv, g, d).transpose(1, 0, 2, 3).astype(jnp.float32) * scale  # [Hkv,S,G,D]
    lo = (seq_lens - sliding_window if sliding_window is not None
          else jnp.zeros_like(seq_lens))

    def column(j, carry):
        cols = jax.lax.dynamic_index_in_dim(tables, j, axis=1, keepdims=False)  # [S, P]
        # (8-bit pages come back as float32 here: kv_quant.py)
        k = dequantize(k_cache[:, cols], d, kv_scales[0]).reshape(hkv, s, pages * b, d)
        v = dequantize(v_cache[:, cols], d, kv_scales[1]).reshape(hkv, s, pages * b, d)
        pos = j * pages * b + jnp.arange(pages * b)
        valid = (pos[None, :] < seq_lens[:, None]) & (pos[None, :] >= lo[:, None])  # [S, B]
        scores = jnp.where(valid[None, :, None],
                           _cap(jnp.einsum("hsgd,hsbd->hsgb", qg, k), softcap), -jnp.inf)
        return _online_softmax_step(carry, scores, v, "hsgb,hsbd->hsgd")

    # The running max starts finite so fully masked columns give exp(-inf - m) = 0, not NaN.
    init = (jnp.full((hkv, s, g), -1e30, jnp.float32), jnp.zeros((hkv, s, g), jnp.float32),
            jnp.zeros((hkv, s, g, d), jnp.float32))
    first = 0 if sliding_window is None else jnp.maximum(jnp.min(lo), 0) // (pages * b)
    stop = jnp.minimum(-(-jnp.max(seq_lens) // (pages * b)), mb // pages)
    _, total, acc = jax.lax.fori_loop(first, stop, column, init)
    out = acc / jnp.maximum(total, 1e-30)[..., None]  # padded rows (seq_len 0) give zeros
    return out.transpose(1, 0, 2, 3).reshape(s, hq, d).astype(q.dtype)


def mixed(q, k_cache, v_cache, md, scale, sliding_window, tile: int = PREFILL_TILE, *,
          softcap=None, kv_scales=(1.0, 1.0)):
    """General ragged case (prompts over a cached prefix, with decode rows): each token
    attends to its sequence's pages up to its own position.

    Query tiles run one after another; each walks its tokens' block tables a few pages at a
    time with an online softmax, from the first page any of its tokens can see up to the
    last (data-dependent bounds), so a tile costs its own contexts, not the table's width,
    and a tile of padding costs nothing."""
    t, hq, d = q.shape
    hkv, _, b, _ = k_cache.shape
    g = hq // hkv
    s, mb = md.block_tables.shape
    c = min(tile, t)
    n = -(-t // c)
    pages = math.gcd(mb, DECODE_PAGES_PER_STEP)
    span = pages * b
    q = jnp.pad(q, ((0, n * c - t), (0, 0), (0, 0)))
    seg = _token_seq_ids(md, n * c)  # padding tokens get id s
    seg_c = jnp.minimum(seg, s - 1)
    qlen = md.query_start_loc[1:] - md.query_start_loc[:-1]
    qpos = md.seq_lens[seg_c] - qlen[seg_c] + (jnp.arange(n * c) - md.query_start_loc[seg_c])
    qpos = jnp.where(seg < s, qpos, -1)  # padding sees nothing
    tables = md.block_tables.reshape(s, mb // pages, pages)
    qt = (q.astype(jnp.float32) * scale).reshape(n, c, hkv, g, d).transpose(0, 2, 1, 3, 4)

    def query_tile(args):
        qi, segi, posi = args  # [Hkv, c, G, D], [c], [c]
        lo = (posi - sliding_window + 1 if sliding_window is not None
              else jnp.zeros_like(posi))
        rows = tables[jnp.minimum(segi, s - 1)]  # [c, MB / P, P]

        def column(j, carry):
            cols = jax.lax.dynamic_index_in_dim(rows, j, axis=1, keepdims=False)  # [c, P]
            k = dequantize(k_cache[:, cols], d, kv_scales[0]).reshape(hkv, c, span, d)
            v = dequantize(v_cache[:, cols], d, kv_scales[1]).reshape(hkv, c, span, d)
            kpos = j * span + jnp.arange(span)
            valid = (kpos[None, :] <= posi[:, None]) & (kpos[None, :] >= lo[:, None])
            scores = jnp.where(valid[None, :, None],
                               _cap(jnp.einsum("hcgd,hckd->hcgk", qi, k), softcap), -jnp.inf)
            return _online_softmax_step(carry, scores, v, "hcgk,hckd->hcgd")

        init = (jnp.full((hkv, c, g), -1e30, jnp.float32), jnp.zeros((hkv, c, g), jnp.float32),
                jnp.zeros((hkv, c, g, d), jnp.float32))
        real = posi >= 0
        first = jnp.min(jnp.where(real, jnp.maximum(lo, 0), mb * b)) // span
        stop = jnp.minimum(jnp.max(posi) // span + 1, mb // pages)  # 0 for a padding tile
        _, total, acc = jax.lax.fori_loop(first, stop, column, init)
        return acc / jnp.maximum(total, 1e-30)[..., None]  # [Hkv, c, G, D]

    out = jax.lax.map(query_tile, (qt, seg.reshape(n, c), qpos.reshape(n, c)))
    out = out.transpose(0, 2, 1, 3, 4).reshape(n * c, hq, d)[:t]
    return out.astype(q.dtype)
