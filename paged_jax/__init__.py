"""paged-jax: a JAX and Pallas reimplementation of vLLM's PagedAttention serving engine."""
from paged_jax.beam_search import BeamSearchOutput, BeamSearchParams, BeamSearchSequence
from paged_jax.config import EngineConfig
from paged_jax.engine import LLMEngine
from paged_jax.llm import LLM
from paged_jax.request import CompletionOutput, Logprob, RequestOutput
from paged_jax.sampling_params import SamplingParams

__all__ = ["LLM", "LLMEngine", "EngineConfig", "SamplingParams", "RequestOutput",
           "CompletionOutput", "Logprob", "BeamSearchParams", "BeamSearchOutput",
           "BeamSearchSequence"]
