"""The Gemma 2 and Gemma 3 text decoders (Gemma2ForCausalLM, Gemma3ForCausalLM) as flax NNX
modules, used functionally as the Llama family is (models/layers.py's Linear and parameters
with logical axis names, the attention dispatch).

What differs from Llama: RMSNorms scale by (1 + weight), computed in float32; each layer
normalizes attention's and the MLP's outputs too (post_attention_layernorm,
pre/post_feedforward_layernorm); the MLP is GeGLU (tanh GELU); the embeddings are scaled by
sqrt(hidden_size) and tied to the output head; the attention scale is
query_pre_attn_scalar^-1/2; and layers alternate between a sliding window
("sliding_attention") and the full context ("full_attention").
Gemma 2: attention scores and the final logits soft-capped (cap * tanh(x / cap)).
Gemma 3: queries and keys RMS-normalized per head before rope; sliding layers with a rope
theta of their own, the global theta and scaling on the full ones.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from paged_jax.attention import AttentionMetadata, attention, attention_per_kv_head
from paged_jax.models.config import ModelConfig
from paged_jax.models.layers import GatedMLP, Linear, RMSNorm, _param, sow_kv_amax
from paged_jax.models.rope import apply_rope, inv_freq


class GemmaRMSNorm(RMSNorm):
    def __call__(self, x):  # scaled by 1 + weight, in float32, then cast back
        w = self.weight[...].astype(jnp.float32)
        return (self.normalized(x) * (1.0 + w)).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, dtype):
        h, d = cfg.hidden_size, cfg.head_dim
        self.cfg = cfg
        self.kv_scales = cfg.layer_kv_scales(layer)
        sliding = cfg.layer_types is not None and cfg.layer_types[layer] == "sliding_attention"
        self.window = cfg.sliding_window if sliding else None
        # Gemma 3's sliding layers: their own theta, no scaling; full ones (and every Gemma 2
        # layer): the global theta and scaling
        self.rope = (dataclasses.replace(cfg, rope_theta=cfg.rope_local_theta, rope_scaling=None)
                     if sliding and cfg.rope_local_theta is not None else cfg)
        quant = cfg.weight_quant
        self.q_proj = Linear(h, cfg.num_heads * d, ("embed", "q_heads"), dtype, quant=quant)
        self.k_proj = Linear(h, cfg.num_kv_heads * d, ("embed", "kv_heads"), dtype, quant=quant)
        self.v_proj = Linear(h, cfg.num_kv_heads * d, ("embed", "kv_heads"), dtype, quant=quant)
        self.o_proj = Linear(cfg.num_heads * d, h, ("q_heads", "embed"), dtype, quant=quant)
        if cfg.qk_norm:  # Gemma 3
            self.q_norm = GemmaRMSNorm(d, cfg.rms_norm_eps, dtype)
            self.k_norm = GemmaRMSNorm(d, cfg.rms_norm_eps, dtype)

    def __call__(self, x, positions, kv_cache, md: AttentionMetadata):
        cfg, t = self.cfg, x.shape[0]
        freq = inv_freq(self.rope)
        q = self.q_proj(x).reshape(t, cfg.num_heads, cfg.head_dim)
        k = self.k_proj(x).reshape(t, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, positions, freq), apply_rope(k, positions, freq)
        v = self.v_proj(x).reshape(t, cfg.num_kv_heads, cfg.head_dim)
        sow_kv_amax(self, k, v, kv_cache)
        out, kv_cache = attention_per_kv_head(attention, q, k, v, kv_cache, md,
                                              scale=cfg.query_pre_attn_scalar ** -0.5,
                                              sliding_window=self.window,
                                              softcap=cfg.attn_logit_softcapping,
                                              kv_scales=self.kv_scales)
        return self.o_proj(out.reshape(t, cfg.num_heads * cfg.head_dim)), kv_cache


def _gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, dtype):
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(h, eps, dtype)
        self.self_attn = Attention(cfg, layer, dtype)
        self.post_attention_layernorm = GemmaRMSNorm(h, eps, dtype)
        self.pre_feedforward_layernorm = GemmaRMSNorm(h, eps, dtype)
        self.mlp = GatedMLP(h, cfg.intermediate_size, dtype, _gelu_tanh, cfg.weight_quant)
        self.post_feedforward_layernorm = GemmaRMSNorm(h, eps, dtype)

    def __call__(self, x, positions, kv_cache, md):
        attn, kv_cache = self.self_attn(self.input_layernorm(x), positions, kv_cache, md)
        x = x + self.post_attention_layernorm(attn)
        ffn = self.mlp(self.pre_feedforward_layernorm(x))
        return x + self.post_feedforward_layernorm(ffn), kv_cache


class GemmaForCausalLM(nnx.Module):
    def __init__(self, cfg: ModelConfig):
        dtype = jnp.dtype(cfg.dtype)
        self.cfg = cfg
        self.embed_tokens = _param((cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), dtype)
        self.layers = nnx.List([DecoderLayer(cfg, i, dtype) for i in range(cfg.num_layers)])
        self.norm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.lm_head = (None if cfg.tie_word_embeddings else
                        _param((cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), dtype))

    def __call__(self, input_ids, positions, kv_caches, md: AttentionMetadata):
        """As LlamaForCausalLM's: (logits [len(md.logits_indices), V] float32, kv_caches)."""
        embed = self.embed_tokens[...]
        # The scale in the model's dtype, as transformers rounds it
        x = embed[input_ids] * jnp.asarray(self.cfg.hidden_size ** 0.5, embed.dtype)
        new_caches = []
        for i, layer in enumerate(self.layers):
            x, cache = layer(x, positions, None if kv_caches is None else kv_caches[i], md)
            new_caches.append(cache)
        x = self.norm(x[md.logits_indices])
        head = embed.T if self.lm_head is None else self.lm_head[...]
        logits = (x @ head).astype(jnp.float32)
        cap = self.cfg.final_logit_softcapping
        if cap is not None:  # Gemma 2
            logits = cap * jnp.tanh(logits / cap)
        return logits, (None if kv_caches is None else new_caches)
