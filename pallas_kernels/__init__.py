"""Pallas paged-attention kernels (decode and ragged prefill/decode) over the paged KV cache.

Layouts are fixed by docs/ARCHITECTURE.md: k_cache, v_cache [Hkv, N, B, D]; block 0 pads.
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
