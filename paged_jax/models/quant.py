"""Weight-only quantization of the linear layers (vLLM's `quantization`): how a weight is
stored, quantized at load, and multiplied.

  int8  values in [-127, 127] with float32 scales [G, out] beside the kernel [in, out]: one
        scale per output channel (G = 1) when quantized here from a full-precision
        checkpoint, one per 32 inputs of each output (G = in / 32) when the checkpoint is a
        GGUF file of Q8_0 weights, whose blocks are kept as they are (exact)
  fp8   float8_e4m3fn values, one float32 scale per output channel (GPUs with fp8 matmuls)

int8 is weight-only: activations stay in the compute dtype, and the product dequantizes the
weight (or, with one scale per output channel, scales the product's columns, which is the same
sum). fp8 is vLLM's W8A8 scheme: activations are quantized per token to e4m3 and the product
is fp8 x fp8 (Mixtral-style experts are widened instead: ragged_dot takes one dtype). Quantized: the
attention and MLP projections, Mixtral-style experts. Kept in full precision, as vLLM keeps
them: embeddings, the LM head, norms, the MoE router and Qwen2-MoE's shared-expert gate.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from paged_jax.models.config import WeightQuant

_LEVELS = {"int8": 127.0, "fp8": float(jnp.finfo(jnp.float8_e4m3fn).max)}


def storage_dtype(quant: WeightQuant):
    return jnp.dtype(jnp.int8 if quant.kind == "int8" else jnp.float8_e4m3fn)


def quantize(w: np.ndarray, quant: WeightQuant) -> tuple[np.ndarray, np.ndarray]:
    """w [..., in, out] float -> (values [..., in, out] in quant.dtype, scales [..., G, out]
    float32): symmetric, each scale max |w| of its group over the format's largest value."""
    w = np.asarray(w, np.float32)
    n_in, n_out = w.shape[-2:]
    g = quant.num_groups(n_in)
    grouped = w.reshape(*w.shape[:-2], g, n_in // g, n_out)
    scale = np.abs(grouped).max(axis=-2) / _LEVELS[quant.kind]  # [..., G, out]
    safe = np.where(scale > 0, scale, 1.0)  # an all-zero column: zeros, scale 0
    scaled = grouped / safe[..., None, :]
    if quant.kind == "int8":
        values = np.clip(np.rint(scaled), -127, 127).astype(np.int8)
    else:
        values = np.asarray(jnp.asarray(scaled).astype(storage_dtype(quant)))
    return values.reshape(w.shape), scale.astype(np.float32)


def dequantize(values, scale, dtype=jnp.float32):
    """values [..., in, out], scale [..., G, out] -> the weight [..., in, out] in dtype."""
    n_in, n_out = values.shape[-2:]
    g = scale.shape[-2]
    grouped = values.reshape(*values.shape[:-2], g, n_in // g, n_out).astype(jnp.float32)
    return (grouped * scale[..., None, :]).reshape(values.shape).astype(dtype)


def matmul(x: jax.Array, values: jax.Array, scale: jax.Array) -> jax.Array:
    """x [T, in] @ the weight that (values, scale) store, in x's dtype."""
    if values.dtype == jnp.float8_e4m3fn:
        return _fp8_matmul(x, values, scale)
    if scale.shape[-2] == 1:  # per output channel: scale the product's columns
        return (x @ values.astype(x.dtype)) * scale[0].astype(x.dtype)
    return x @ dequantize(values, scale, x.dtype)


def _fp8_matmul(x, values, scale):
    """vLLM's fp8 scheme on GPUs with fp8 tensor cores: the activations quantized to e4m3 on
    the fly with a scale per token, one fp8 x fp8 product accumulated in float32 (a dot of
    fp8 operands, which XLA can lower to an fp8 GEMM on sm_89+; not yet checked on a GPU),
    then both scales applied to its rows and columns."""
    xf = x.astype(jnp.float32)
    top = _LEVELS["fp8"]
    x_scale = jnp.max(jnp.abs(xf), axis=-1, keepdims=True) / top
    x_scale = jnp.where(x_scale > 0, x_scale, 1.0)
    x8 = jnp.clip(xf / x_scale, -top, top).astype(jnp.float8_e4m3fn)
    y = jax.lax.dot_general(x8, values, (((x.ndim - 1,), (0,)), ((), ())),
                            preferred_element_type=jnp.float32)
    return (y * x_scale * scale[0]).astype(x.dtype)
