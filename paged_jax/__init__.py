"""paged-jax: a JAX and Pallas reimplementation of vLLM's PagedAttention serving engine.

The names below load on first use (PEP 562), so that importing the host bookkeeping
(paged_jax.scheduler, .kv_cache_manager, .block_pool, ...) does not load JAX and flax.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "LLM": "paged_jax.llm",
    "LLMEngine": "paged_jax.engine",
    "EngineConfig": "paged_jax.config",
    "SamplingParams": "paged_jax.sampling_params",
    "StructuredOutputsParams": "paged_jax.structured_outputs",
    "RequestOutput": "paged_jax.request",
    "CompletionOutput": "paged_jax.request",
    "Logprob": "paged_jax.request",
    "BeamSearchParams": "paged_jax.beam_search",
    "BeamSearchOutput": "paged_jax.beam_search",
    "BeamSearchSequence": "paged_jax.beam_search",
}
__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from paged_jax.beam_search import BeamSearchOutput, BeamSearchParams, BeamSearchSequence
    from paged_jax.config import EngineConfig
    from paged_jax.engine import LLMEngine
    from paged_jax.llm import LLM
    from paged_jax.request import CompletionOutput, Logprob, RequestOutput
    from paged_jax.sampling_params import SamplingParams
    from paged_jax.structured_outputs import StructuredOutputsParams


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'paged_jax' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
