"""Llama-family decoder (Llama, Mistral, Mixtral, Qwen2, Qwen3, Phi-3) as flax NNX modules,
used functionally. Qwen2 is Llama with q/k/v biases; Qwen3 Llama with an RMSNorm on each query
and key head; Phi-3 Llama with its projections stored fused (split at load, params.py).

Every parameter carries logical axis names (`out_sharding`) that paged_jax/sharding.py maps
to a device mesh. Kernels are stored [in, out]. Layers are a Python list, unrolled under jit:
on this project's measurements a per-layer list beat scanning over stacked weights (see
shared MEASURED.md), and it lets each layer keep its own donated KV cache.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from paged_jax.attention import AttentionMetadata, attention, attention_per_kv_head
from paged_jax.models.config import ModelConfig
from paged_jax.models import quant as wq
from paged_jax.models.layers import (GatedMLP, Linear, RMSNorm, _param, quantized_param,
                                     sow_kv_amax)
from paged_jax.models.registry import family
from paged_jax.models.rope import apply_rope, attention_scale, inv_freq


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, dtype):
        h, d = cfg.hidden_size, cfg.head_dim
        self.cfg = cfg
        self.kv_scales = cfg.layer_kv_scales(layer)
        quant, bias = cfg.weight_quant, cfg.attention_bias
        self.q_proj = Linear(h, cfg.num_heads * d, ("embed", "q_heads"), dtype, bias, quant)
        self.k_proj = Linear(h, cfg.num_kv_heads * d, ("embed", "kv_heads"), dtype, bias, quant)
        self.v_proj = Linear(h, cfg.num_kv_heads * d, ("embed", "kv_heads"), dtype, bias, quant)
        self.o_proj = Linear(cfg.num_heads * d, h, ("q_heads", "embed"), dtype, quant=quant)
        if cfg.qk_norm:  # (named as the checkpoints name them)
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, dtype)

    def __call__(self, x, positions, kv_cache, md: AttentionMetadata):
        cfg, t = self.cfg, x.shape[0]
        freq, rope_scale = inv_freq(cfg), attention_scale(cfg)
        q = self.q_proj(x).reshape(t, cfg.num_heads, cfg.head_dim)
        k = self.k_proj(x).reshape(t, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = (apply_rope(q, positions, freq, rope_scale),
                apply_rope(k, positions, freq, rope_scale))
        v = self.v_proj(x).reshape(t, cfg.num_kv_heads, cfg.head_dim)
        sow_kv_amax(self, k, v, kv_cache)
        # Under a tensor-parallel mesh each device attends its own KV heads (shard_map).
        out, kv_cache = attention_per_kv_head(attention, q, k, v, kv_cache, md,
                                              scale=cfg.head_dim ** -0.5,
                                              sliding_window=cfg.sliding_window,
                                              kv_scales=self.kv_scales)
        return self.o_proj(out.reshape(t, cfg.num_heads * cfg.head_dim)), kv_cache


class SparseMoE(nnx.Module):
    """Mixtral's block_sparse_moe: a router scores num_experts SwiGLU experts per token, the
    top num_experts_per_tok run, their outputs weighted by the router's softmax renormalized
    over the chosen ones. Experts are stacked [E, ...] (the checkpoint's experts.{e}.w1/w3/w2);
    the (token, choice) pairs are sorted by expert and each expert multiplies only its own
    rows (lax.ragged_dot). Where ragged_dot has a grouped kernel that costs the chosen
    experts' work; XLA's CPU lowering (and by default its GPU one) computes it as a masked
    dense product over all E experts, E / k times that (noted in docs/ARCHITECTURE.md)."""

    def __init__(self, cfg: ModelConfig, dtype):
        h, i, e = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts
        self.top_k = cfg.num_experts_per_tok
        self.norm_topk = cfg.norm_topk_prob
        quant = cfg.weight_quant
        self.gate = Linear(h, e, ("embed", "experts"), dtype)  # the router: full precision
        # gate, up and down projections (+ their scales when quantized: models/quant.py)
        self.w1, self.w1_scale = quantized_param((e, h, i), ("experts", "embed", "mlp"), dtype,
                                                 quant)
        self.w3, self.w3_scale = quantized_param((e, h, i), ("experts", "embed", "mlp"), dtype,
                                                 quant)
        self.w2, self.w2_scale = quantized_param((e, i, h), ("experts", "mlp", "embed"), dtype,
                                                 quant)
        if cfg.shared_expert_intermediate_size:  # Qwen2-MoE's, beside the routed experts
            self.shared_expert = GatedMLP(h, cfg.shared_expert_intermediate_size, dtype,
                                          jax.nn.silu, quant)
            self.shared_expert_gate = Linear(h, 1, ("embed", "experts"), dtype)

    def __call__(self, x):
        t, k, e = x.shape[0], self.top_k, self.w1.shape[0]
        probs = jax.nn.softmax(self.gate(x).astype(jnp.float32), axis=-1)
        weights, experts = jax.lax.top_k(probs, k)  # [T, k]
        if self.norm_topk:
            weights = weights / weights.sum(-1, keepdims=True)
        flat = experts.reshape(-1)  # (token, choice) pairs, token-major
        order = jnp.argsort(flat, stable=True)  # grouped by expert
        rows = x[order // k]  # [T * k, H]
        sizes = jnp.bincount(flat, length=e).astype(jnp.int32)
        w1, w3, w2 = (self._expert_weights(name, x.dtype) for name in ("w1", "w3", "w2"))
        act = (jax.nn.silu(jax.lax.ragged_dot(rows, w1, sizes))
               * jax.lax.ragged_dot(rows, w3, sizes))
        out = jax.lax.ragged_dot(act, w2, sizes)  # [T * k, H]
        out = jnp.zeros_like(out).at[order].set(out).reshape(t, k, -1)
        routed = jnp.einsum("tkh,tk->th", out.astype(jnp.float32), weights).astype(x.dtype)
        if not hasattr(self, "shared_expert"):
            return routed
        return routed + jax.nn.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)

    def _expert_weights(self, name: str, dtype):
        values, scale = getattr(self, name), getattr(self, f"{name}_scale")
        # ragged_dot takes one dtype: quantized experts are widened in the step
        return values[...] if scale is None else wq.dequantize(values[...], scale[...], dtype)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, dtype):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = Attention(cfg, layer, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        # Named as the checkpoints name them (models/params.py maps paths to tensor names):
        # Mixtral's experts are block_sparse_moe, Qwen3-MoE's mlp.
        if cfg.num_experts and cfg.expert_names == "mixtral":
            self.block_sparse_moe = SparseMoE(cfg, dtype)
        else:
            self.mlp = SparseMoE(cfg, dtype) if cfg.num_experts else GatedMLP(
                cfg.hidden_size, cfg.intermediate_size, dtype, jax.nn.silu, cfg.weight_quant)

    def __call__(self, x, positions, kv_cache, md):
        attn, kv_cache = self.self_attn(self.input_layernorm(x), positions, kv_cache, md)
        x = x + attn
        ffn = self.block_sparse_moe if hasattr(self, "block_sparse_moe") else self.mlp
        return x + ffn(self.post_attention_layernorm(x)), kv_cache


class LlamaForCausalLM(nnx.Module):
    def __init__(self, cfg: ModelConfig):
        dtype = jnp.dtype(cfg.dtype)
        self.cfg = cfg
        self.embed_tokens = _param((cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), dtype)
        self.layers = nnx.List([DecoderLayer(cfg, i, dtype) for i in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.lm_head = (None if cfg.tie_word_embeddings else
                        _param((cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), dtype))

    def __call__(self, input_ids, positions, kv_caches, md: AttentionMetadata):
        """input_ids, positions [T]; kv_caches: list of (k, v) per layer, or None (dense run).

        Returns (logits [len(md.logits_indices), V] float32, new kv_caches).
        """
        x = self.embed_tokens[...][input_ids]
        new_caches = []
        for i, layer in enumerate(self.layers):
            x, cache = layer(x, positions, None if kv_caches is None else kv_caches[i], md)
            new_caches.append(cache)
        x = self.norm(x[md.logits_indices])
        head = self.embed_tokens[...].T if self.lm_head is None else self.lm_head[...]
        logits = (x @ head).astype(jnp.float32)
        return logits, (None if kv_caches is None else new_caches)


def abstract_model(cfg: ModelConfig) -> nnx.Module:
    """The module tree of cfg's family (models/registry.py) with shape-only parameters;
    weights.py fills it."""
    model_class = family(cfg.model_type).load_class()
    return nnx.eval_shape(lambda: model_class(cfg))
