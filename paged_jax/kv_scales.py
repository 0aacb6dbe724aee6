"""fp8 KV pages' per-layer scales from a calibration pass (vLLM's calculate_kv_scales).

vLLM computes k_scale = max |K| / 200 and v_scale = max |V| / 100 over the first forward pass
(VLLM_K_SCALE_CONSTANT, VLLM_V_SCALE_CONSTANT): the largest value lands well inside e4m3's
range (448) and small ones stay clear of its subnormals. Here the scales are static numbers of
the compiled step, so they are computed before the first compile: a dense forward over a few
calibration prompts (each layer records its max |K| and max |V|: models/layers.sow_kv_amax),
then the model's config carries them (ModelConfig.kv_scales) to every cache write and reader.
"""
from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

K_SCALE_CONSTANT = 200.0
V_SCALE_CONSTANT = 100.0
# A few kinds of text a served model reads: prose, code, numbers, a chat turn.
CALIBRATION_PROMPTS = (
    "The history of the printing press begins in the fifteenth century, when movable type "
    "made books cheap enough for merchants, students and clerks to own them.",
    "def merge(left, right):\n    out = []\n    while left and right:\n        out.append("
    "left.pop(0) if left[0] <= right[0] else right.pop(0))\n    return out + left + right\n",
    "Quarterly revenue rose 12.5% to $4.18 billion; operating margin was 23.1%, against "
    "19.7% a year earlier, on 1,024 new contracts.",
    "User: Can you explain why the sky is blue in two sentences?\nAssistant: Sunlight is "
    "scattered by the molecules of the air, and blue light, with its shorter wavelength, is "
    "scattered the most.",
)


@functools.partial(jax.jit, static_argnums=0)
def _kv_amax(graphdef, params, token_ids):
    """[layers, 2] max |K|, max |V| of one dense forward."""
    from flax import nnx

    from paged_jax.attention import AttentionMetadata

    t = token_ids.shape[0]
    md = AttentionMetadata(jnp.zeros((t,), jnp.int32), jnp.array([0, t], jnp.int32),
                           jnp.array([t], jnp.int32), jnp.zeros((1, 1), jnp.int32),
                           jnp.array([t - 1], jnp.int32), mode="prefill", backend="xla")
    model = nnx.merge(graphdef, params)
    _, sown = nnx.capture(model, nnx.Intermediate)(token_ids, jnp.arange(t, dtype=jnp.int32),
                                                   None, md)
    layers = sown["layers"]
    return jnp.stack([layers[i]["self_attn"]["kv_amax"][0] for i in range(len(layers))])


def calculate_kv_scales(model, prompts=CALIBRATION_PROMPTS) -> tuple[tuple[float, float], ...]:
    """Per layer (k_scale, v_scale) from the maxima over `prompts` (texts, or token id lists)."""
    amax = None
    for prompt in prompts:
        ids = model.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ValueError("a calibration prompt has no tokens")
        seen = np.asarray(_kv_amax(model.graphdef, model.params, jnp.asarray(ids, jnp.int32)))
        amax = seen if amax is None else np.maximum(amax, seen)
    # A layer whose K or V is all zeros keeps scale 1.0 (any scale stores zeros exactly).
    k = np.where(amax[:, 0] > 0, amax[:, 0] / K_SCALE_CONSTANT, 1.0)
    v = np.where(amax[:, 1] > 0, amax[:, 1] / V_SCALE_CONSTANT, 1.0)
    return tuple((float(a), float(b)) for a, b in zip(k, v))


def with_kv_scales(model, prompts=CALIBRATION_PROMPTS):
    """The LoadedModel with calibrated fp8 KV scales in its config."""
    scales = calculate_kv_scales(model, prompts)
    log.info("calculate_kv_scales: k_scale %.3g..%.3g, v_scale %.3g..%.3g over %d layers",
             min(s[0] for s in scales), max(s[0] for s in scales),
             min(s[1] for s in scales), max(s[1] for s in scales), len(scales))
    return model.with_config(dataclasses.replace(model.config, kv_scales=scales))
