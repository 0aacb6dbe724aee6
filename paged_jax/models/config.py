"""The model's shape, read from a Hugging Face config and frozen."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

from paged_jax.models.registry import family

ROPE_TYPES = ("linear", "llama3", "longrope")  # rope scalings built (models/rope.py), besides none
DTYPES = ("float32", "bfloat16", "float16")
WEIGHT_QUANTIZATIONS = ("int8", "fp8")  # vLLM's `quantization` values built (models/quant.py)
Q8_0_GROUP = 32  # llama.cpp's Q8_0 block: 32 int8 values and one float16 scale


class WeightQuant(NamedTuple):
    """How a model's linear layers are stored (models/quant.py): kind in
    WEIGHT_QUANTIZATIONS; group: inputs per scale (0: all of them, one per output channel)."""
    kind: str
    group: int = 0

    def num_groups(self, n_in: int) -> int:
        if not self.group:
            return 1
        if n_in % self.group:
            raise ValueError(f"{self.kind} weights with {self.group} inputs per scale need an "
                             f"input size divisible by {self.group}, got {n_in}")
        return n_in // self.group


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Rope scaling as sorted (key, value) pairs so the config stays hashable.
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    # Qwen3: an RMSNorm over each query and key head (q_norm, k_norm) before rope
    qk_norm: bool = False
    sliding_window: int | None = None
    # Mixtral: a sparse mixture of SwiGLU experts (each intermediate_size wide) in place of
    # the MLP, num_experts_per_tok of them per token. 0: a dense MLP.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    # The chosen experts' router probabilities renormalized to sum to 1 (Mixtral always;
    # Qwen3-MoE as its norm_topk_prob says)
    norm_topk_prob: bool = True
    # How the checkpoint names the experts: "mixtral" (block_sparse_moe.experts.{e}.w1/w3/w2)
    # or "qwen" (mlp.experts.{e}.gate_proj/up_proj/down_proj)
    expert_names: str = "mixtral"
    # Qwen2-MoE: a dense SwiGLU expert of this width every token goes through, scaled by a
    # sigmoid gate (mlp.shared_expert, mlp.shared_expert_gate); 0: none
    shared_expert_intermediate_size: int = 0
    # config.json's model_type: which family's module builds the model (models/registry.py)
    model_type: str = "llama"
    # Gemma 3: per layer "sliding_attention" (a window of sliding_window, rope theta
    # rope_local_theta, no scaling) or "full_attention"; None: every layer the same
    layer_types: tuple[str, ...] | None = None
    rope_local_theta: float | None = None
    query_pre_attn_scalar: float | None = None  # attention scale = its -1/2 power (Gemma)
    # Gemma 2: attention scores and final logits through cap * tanh(x / cap); None: uncapped
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    dtype: str = "float32"
    # The linear layers' storage (models/quant.py); None: in dtype
    weight_quant: WeightQuant | None = None
    # fp8 KV pages' (k_scale, v_scale) per layer (kv_scales.py); None: 1.0 everywhere
    kv_scales: tuple[tuple[float, float], ...] | None = None

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not supported; choose one of {DTYPES}")
        if self.kv_scales is not None and len(self.kv_scales) != self.num_layers:
            raise ValueError(f"kv_scales has {len(self.kv_scales)} entries for "
                             f"{self.num_layers} layers")
        if self.weight_quant is not None and self.weight_quant.kind not in WEIGHT_QUANTIZATIONS:
            raise ValueError(f"weight quantization {self.weight_quant.kind!r} is not supported; "
                             f"choose one of {WEIGHT_QUANTIZATIONS}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_experts and not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok {self.num_experts_per_tok} must be in "
                             f"[1, num_experts {self.num_experts}]")

    def layer_kv_scales(self, layer: int) -> tuple[float, float]:
        return (1.0, 1.0) if self.kv_scales is None else self.kv_scales[layer]

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return dict(self.rope_scaling) if self.rope_scaling else None

    def for_max_model_len(self, max_model_len: int) -> "ModelConfig":
        """The config an engine of this max_model_len runs: a longrope model (Phi-3) takes its
        long factors for every position when sequences may pass the original context, its
        short ones otherwise (vLLM's rule). One factor set for a whole sequence keeps its
        cached keys and new queries rotated alike; transformers switches per forward pass and
        recomputes its cache when a sequence first crosses the threshold."""
        s = self.rope_scaling_dict
        if s is None or s["rope_type"] != "longrope":
            return self
        long = max_model_len > s["original_max_position_embeddings"]
        if long == s["long"]:
            return self
        return dataclasses.replace(self, rope_scaling=tuple(sorted({**s, "long": long}.items())))

    @property
    def kv_window(self) -> int | None:
        """The window every layer attends within, None if some layer reads the whole context:
        only then can a request's oldest blocks be given back (kv_cache_manager)."""
        if self.layer_types is not None and any(t != "sliding_attention"
                                                for t in self.layer_types):
            return None
        return self.sliding_window

    @classmethod
    def from_hf(cls, hf_config, dtype: str = "float32") -> "ModelConfig":
        model_type = getattr(hf_config, "model_type", None)
        family(model_type)  # a ValueError naming the supported types for any other
        act = getattr(hf_config, "hidden_act", "silu")
        if act not in ("silu", "swish") and model_type not in GEMMAS:  # SwiGLU
            raise ValueError(f"hidden_act {act!r} is not supported; supported: silu")
        num_heads = hf_config.num_attention_heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
        scaling = _rope_scaling(hf_config)
        if scaling is not None and scaling["rope_type"] == "longrope":
            scaling = _longrope(hf_config, scaling, head_dim)
        if scaling is not None and scaling["rope_type"] not in ROPE_TYPES:
            raise ValueError(f"rope scaling type {scaling['rope_type']!r} is not supported; "
                             f"supported: {', '.join(ROPE_TYPES)} (or none)")
        partial = _rope_params(hf_config).get(
            "partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", None))
        if partial not in (None, 1, 1.0):
            raise ValueError(f"partial_rotary_factor {partial} (rope on part of each head) "
                             "is not supported; every head dimension is rotated here")
        if model_type in ("qwen3_moe", "qwen2_moe") and (
                getattr(hf_config, "mlp_only_layers", None)
                or getattr(hf_config, "decoder_sparse_step", 1) != 1):
            raise ValueError(f"{model_type} with dense layers among the sparse ones "
                             "(mlp_only_layers, decoder_sparse_step > 1) is not supported yet")
        experts = {"mixtral": "num_local_experts", "qwen3_moe": "num_experts",
                   "qwen2_moe": "num_experts"}.get(model_type)
        fields = dict(
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            # (an MoE model's expert width: every layer is sparse)
            intermediate_size=(hf_config.moe_intermediate_size
                               if model_type in ("qwen3_moe", "qwen2_moe")
                               else hf_config.intermediate_size),
            num_layers=hf_config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=hf_config.rms_norm_eps,
            rope_theta=_rope_theta(hf_config),
            rope_scaling=tuple(sorted(scaling.items())) if scaling else None,
            max_position_embeddings=hf_config.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            # Qwen2's q/k/v projections always carry a bias (its config has no flag)
            attention_bias=(model_type == "qwen2" or bool(getattr(hf_config, "qkv_bias", False))
                            or bool(getattr(hf_config, "attention_bias", False))),
            qk_norm=model_type in ("qwen3", "qwen3_moe", "gemma3_text"),
            sliding_window=_sliding_window(hf_config, model_type),
            num_experts=getattr(hf_config, experts, 0) if experts else 0,
            num_experts_per_tok=getattr(hf_config, "num_experts_per_tok", 0) if experts else 0,
            norm_topk_prob=(bool(getattr(hf_config, "norm_topk_prob", True))
                            if model_type in ("qwen3_moe", "qwen2_moe") else True),
            expert_names="qwen" if model_type in ("qwen3_moe", "qwen2_moe") else "mixtral",
            shared_expert_intermediate_size=(
                getattr(hf_config, "shared_expert_intermediate_size", 0) or 0
                if model_type == "qwen2_moe" else 0),
            model_type=model_type,
            dtype=dtype,
        )
        if model_type in GEMMAS:
            fields.update(_gemma(hf_config, model_type))
        return cls(**fields)


GEMMAS = ("gemma2", "gemma3_text")


def _gemma(hf_config, model_type: str) -> dict:
    """Gemma 2's and 3's fields: GeGLU, the attention scale, the window pattern, the soft
    caps; Gemma 3's rope per layer type."""
    act = getattr(hf_config, "hidden_activation", None) or getattr(hf_config, "hidden_act", None)
    if act != "gelu_pytorch_tanh":
        raise ValueError(f"{model_type} hidden_activation {act!r} is not supported; "
                         "supported: gelu_pytorch_tanh")
    if getattr(hf_config, "use_bidirectional_attention", False):
        raise ValueError("use_bidirectional_attention is not supported: attention is causal")
    if getattr(hf_config, "attention_bias", False):
        raise ValueError(f"{model_type} with attention_bias is not supported")
    types = tuple(getattr(hf_config, "layer_types", None) or ())
    caps = {name: (float(getattr(hf_config, name)) if getattr(hf_config, name, None) is not None
                   else None)
            for name in ("attn_logit_softcapping", "final_logit_softcapping")}
    fields = dict(layer_types=types or None,
                  # (no sliding layer: no window anywhere)
                  sliding_window=(getattr(hf_config, "sliding_window", None)
                                  if "sliding_attention" in types else None),
                  query_pre_attn_scalar=float(hf_config.query_pre_attn_scalar),
                  tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", True)),
                  **caps)
    if model_type == "gemma2":  # one rope for every layer, as Llama's
        return fields
    rope = getattr(hf_config, "rope_parameters", None) or {}
    full, local = dict(rope.get("full_attention") or {}), dict(rope.get("sliding_attention") or {})
    theta = full.pop("rope_theta", getattr(hf_config, "rope_theta", 1e6))
    local_theta = local.get("rope_theta", getattr(hf_config, "rope_local_base_freq", 1e4))
    kind = full.get("rope_type", "default")
    if kind not in ("default",) + ROPE_TYPES:
        raise ValueError(f"rope scaling type {kind!r} is not supported; supported: "
                         f"{', '.join(ROPE_TYPES)} (or none)")
    if local.get("rope_type", "default") != "default":
        raise ValueError("gemma3 sliding layers with rope scaling are not supported")
    scaling = None if kind == "default" else {k: v for k, v in full.items() if v is not None}
    return dict(fields, rope_theta=float(theta), rope_local_theta=float(local_theta),
                rope_scaling=tuple(sorted(scaling.items())) if scaling else None)


def _sliding_window(hf_config, model_type: str) -> int | None:
    """Mistral's window (every layer); Qwen's sliding_window is only in force with
    use_sliding_window, and then from layer max_window_layers on: not built yet."""
    if model_type in ("qwen2", "qwen3", "qwen3_moe", "qwen2_moe"):
        if getattr(hf_config, "use_sliding_window", False):
            raise ValueError(f"{model_type} with use_sliding_window (a window on layers "
                             f"{getattr(hf_config, 'max_window_layers', '?')} and up) is not "
                             "supported yet; every layer attends over the whole context here")
        return None
    return getattr(hf_config, "sliding_window", None)


def _longrope(hf_config, scaling: dict, head_dim: int) -> dict:
    """Phi-3's LongRoPE as transformers computes it: per-frequency short and long factors and
    one attention factor (cos and sin are scaled by it) from the context extension. Starts
    with the short factors; ModelConfig.for_max_model_len picks."""
    original = (scaling.get("original_max_position_embeddings")
                or getattr(hf_config, "original_max_position_embeddings", None))
    if not original:
        raise ValueError("longrope rope scaling without original_max_position_embeddings")
    short, long = tuple(scaling["short_factor"]), tuple(scaling["long_factor"])
    if len(short) != head_dim // 2 or len(long) != head_dim // 2:
        raise ValueError(f"longrope short_factor ({len(short)}) and long_factor ({len(long)}) "
                         f"must each have head_dim / 2 = {head_dim // 2} entries")
    factor = scaling.get("factor") or hf_config.max_position_embeddings / original
    attention = scaling.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return dict(rope_type="longrope", short_factor=short, long_factor=long,
                original_max_position_embeddings=int(original),
                attention_factor=float(attention), long=False)


def _rope_params(hf_config) -> dict:
    # transformers 5 keeps rope settings in `rope_parameters`; 4.x in rope_theta/rope_scaling.
    params = getattr(hf_config, "rope_parameters", None)
    return dict(params) if isinstance(params, dict) else {}


def _rope_theta(hf_config) -> float:
    theta = _rope_params(hf_config).get("rope_theta")
    return float(theta if theta is not None else getattr(hf_config, "rope_theta", 10000.0))


def _rope_scaling(hf_config) -> dict | None:
    params = _rope_params(hf_config) or dict(getattr(hf_config, "rope_scaling", None) or {})
    params.pop("rope_theta", None)
    kind = params.get("rope_type", params.get("type", "default"))
    kind = {"su": "longrope"}.get(kind, kind)  # (Phi-3's first name for it)
    if kind == "default":
        return None
    params["rope_type"] = kind
    params.pop("type", None)
    return {k: v for k, v in params.items() if v is not None}
