"""Rotary position embeddings: inverse frequencies (with scaling) and their application."""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from paged_jax.models.config import ROPE_TYPES, ModelConfig


def inv_freq(cfg: ModelConfig) -> np.ndarray:
    """[head_dim // 2] float32, computed as transformers does so logits match to float32 ulps."""
    exponents = np.arange(0, cfg.head_dim, 2, dtype=np.int64).astype(np.float32) / cfg.head_dim
    freq = (1.0 / (np.float32(cfg.rope_theta) ** exponents)).astype(np.float32)
    scaling = cfg.rope_scaling_dict
    if scaling is None:
        return freq
    kind = scaling["rope_type"]
    if kind == "linear":
        return (freq / np.float32(scaling["factor"])).astype(np.float32)
    if kind == "llama3":
        return _llama3(freq, scaling)
    if kind == "longrope":
        factors = np.asarray(scaling["long_factor" if scaling["long"] else "short_factor"],
                             np.float32)
        base = (np.float32(cfg.rope_theta) ** exponents).astype(np.float32)
        return (np.float32(1.0) / (factors * base)).astype(np.float32)
    raise ValueError(f"rope scaling type {kind!r} is not supported; supported: {ROPE_TYPES}")


def attention_scale(cfg: ModelConfig) -> float:
    """What cos and sin are multiplied by (LongRoPE's attention factor; 1 otherwise)."""
    scaling = cfg.rope_scaling_dict
    return scaling["attention_factor"] if scaling and "attention_factor" in scaling else 1.0


def _llama3(freq: np.ndarray, s: dict) -> np.ndarray:
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / freq
    scaled = np.where(wavelen > old_len / low, freq / factor, freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jnp.ndarray, positions: jnp.ndarray, freq: np.ndarray,
               scale: float = 1.0) -> jnp.ndarray:
    """x: [T, H, D]; positions: [T]. Rotate-half convention (Hugging Face Llama); scale: the
    attention factor cos and sin are multiplied by (LongRoPE)."""
    angles = positions.astype(jnp.float32)[:, None] * jnp.asarray(freq)[None, :]  # [T, D/2]
    cos = jnp.cos(angles)[:, None, :]
    sin = jnp.sin(angles)[:, None, :]
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
