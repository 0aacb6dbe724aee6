"""The model families paged-jax runs, in one place: which config.json architectures and
model types each takes, and the module that builds it. Adding a family is its module and a
line here (plus its fields in ModelConfig.from_hf). Plain Python, no JAX: the checkpoint
loaders and `paged-jax models` read it.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Family:
    architecture: str  # config.json's "architectures" entry
    model_type: str  # config.json's "model_type"
    model_class: str  # "module:Class" of the NNX model
    notes: str

    def load_class(self):
        import importlib

        module, name = self.model_class.split(":")
        return getattr(importlib.import_module(module), name)


FAMILIES: tuple[Family, ...] = (
    Family("LlamaForCausalLM", "llama", "paged_jax.models.llama:LlamaForCausalLM",
           "Llama 2 / 3 (rope scaling: linear, llama3), SmolLM2, TinyLlama"),
    Family("MistralForCausalLM", "mistral", "paged_jax.models.llama:LlamaForCausalLM",
           "sliding window: blocks it passed go back to the pool"),
    Family("MixtralForCausalLM", "mixtral", "paged_jax.models.llama:LlamaForCausalLM",
           "sparse MoE (top-k router, lax.ragged_dot)"),
    Family("Qwen2ForCausalLM", "qwen2", "paged_jax.models.llama:LlamaForCausalLM",
           "Qwen2 / 2.5 (q/k/v biases); use_sliding_window refused"),
    Family("Qwen3ForCausalLM", "qwen3", "paged_jax.models.llama:LlamaForCausalLM",
           "Qwen3 dense (per-head q/k RMSNorm); use_sliding_window refused"),
    Family("Qwen3MoeForCausalLM", "qwen3_moe", "paged_jax.models.llama:LlamaForCausalLM",
           "Qwen3 MoE (every layer sparse, norm_topk_prob as configured)"),
    Family("Qwen2MoeForCausalLM", "qwen2_moe", "paged_jax.models.llama:LlamaForCausalLM",
           "Qwen1.5 / Qwen2 MoE (q/k/v biases, a gated shared expert beside the routed ones)"),
    Family("Gemma2ForCausalLM", "gemma2", "paged_jax.models.gemma:GemmaForCausalLM",
           "Gemma 2: attention and final-logit soft-capping, sliding and full layers"),
    Family("Gemma3ForCausalLM", "gemma3_text", "paged_jax.models.gemma:GemmaForCausalLM",
           "Gemma 3 text models: sliding and full layers, each with its rope"),
    Family("Phi3ForCausalLM", "phi3", "paged_jax.models.llama:LlamaForCausalLM",
           "Phi-3 (fused qkv / gate_up split at load; LongRoPE factors by max_model_len)"),
)

SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(f.architecture for f in FAMILIES)
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(f.model_type for f in FAMILIES)
ARCHITECTURE_OF_MODEL_TYPE: dict[str, str] = {f.model_type: f.architecture for f in FAMILIES}
_BY_MODEL_TYPE = {f.model_type: f for f in FAMILIES}


def family(model_type: str) -> Family:
    if model_type not in _BY_MODEL_TYPE:
        raise ValueError(f"model type {model_type!r} is not supported; supported: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    return _BY_MODEL_TYPE[model_type]


def table() -> str:
    """What `paged-jax models` prints: one line per family."""
    width = max(len(f.architecture) for f in FAMILIES)
    return "\n".join(f"{f.architecture:<{width}}  {f.model_type:<12}  {f.notes}"
                     for f in FAMILIES)
