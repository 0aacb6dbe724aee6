"""Pallas paged-attention kernels (decode and ragged prefill/decode) over the paged KV cache.

Layouts are fixed by docs/ARCHITECTURE.md: k_cache, v_cache [Hkv, N, B, D]; block 0 pads.
Pages are q's dtype, fp8 (e4m3fn, e5m2, with per-tensor k_scale / v_scale) or int8
([Hkv, N, B, D + 2], each row with its float16 scale): kv_pages.py. Every kernel reads all
of them, 8-bit pages as 8-bit; the Mosaic GPU kernel takes int8 pages of blocks >= 64 tokens.
"""
from pallas_kernels.paged_attention import paged_attention
from pallas_kernels.paged_attention_mgpu import MosaicDecodeConfig, paged_attention_mgpu
from pallas_kernels.ragged_paged_attention import ragged_paged_attention
from pallas_kernels.reference import paged_attention_reference, ragged_paged_attention_reference
from pallas_kernels.tuning import DecodeConfig, RaggedConfig

__all__ = [
    "paged_attention",
    "paged_attention_mgpu",
    "MosaicDecodeConfig",
    "ragged_paged_attention",
    "paged_attention_reference",
    "ragged_paged_attention_reference",
    "DecodeConfig",
    "RaggedConfig",
]
