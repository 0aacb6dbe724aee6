"""The engine's entry to the decode kernels: backend.COMPILED_BACKEND picks the lowering.

With COMPILED_BACKEND = MOSAIC_GPU, decode steps whose arguments the Mosaic GPU kernel takes
(paged_attention_mgpu.supports: among others no int8 pages of blocks under 64 tokens; and
neither softcap nor sliding_window, which it lacks) run it; everything else runs the
Triton-lowered kernel. Both read 16-bit, fp8 and int8 pages (kv_pages.py).
"""
from __future__ import annotations

from pallas_kernels import backend
from pallas_kernels.paged_attention import paged_attention
from pallas_kernels.paged_attention_mgpu import paged_attention_mgpu, supports


def paged_decode(q, k_cache, v_cache, block_tables, seq_lens, *, scale: float,
                 softcap: float | None = None, sliding_window: int | None = None,
                 k_scale: float = 1.0, v_scale: float = 1.0):
  """q [S, Hq, D] -> [S, Hq, D], as paged_attention.paged_attention."""
  if (backend.COMPILED_BACKEND == backend.MOSAIC_GPU and softcap is None
      and sliding_window is None and supports(q, k_cache) is None):
    return paged_attention_mgpu(q, k_cache, v_cache, block_tables, seq_lens, scale=scale,
                                k_scale=k_scale, v_scale=v_scale)
  return paged_attention(q, k_cache, v_cache, block_tables, seq_lens, scale=scale,
                         softcap=softcap, sliding_window=sliding_window, k_scale=k_scale,
                         v_scale=v_scale)
