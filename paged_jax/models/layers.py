"""Building blocks every model family shares: parameters with logical axis names, and the
linear layer (kernels stored [in, out], full precision or quantized: models/quant.py)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from paged_jax.models import quant as wq


def _param(shape, names, dtype):
    # Created abstractly (nnx.eval_shape) and filled from a checkpoint; zeros never reach a run.
    return nnx.Param(jnp.zeros(shape, dtype), out_sharding=names, eager_sharding=False)


def quantized_param(shape, names, dtype, quant: wq.WeightQuant | None):
    """A weight [..., in, out] and its scales [..., G, out] (None when not quantized)."""
    if quant is None:
        return _param(shape, names, dtype), None
    groups = quant.num_groups(shape[-2])
    scale_names = (*names[:-2], "quant_groups", names[-1])
    return (_param(shape, names, wq.storage_dtype(quant)),
            _param((*shape[:-2], groups, shape[-1]), scale_names, jnp.float32))


class Linear(nnx.Module):
    """quant: the kernel stored quantized (models/quant.py) beside `kernel_scale`."""

    def __init__(self, n_in, n_out, names, dtype, bias=False, quant=None):
        self.kernel, self.kernel_scale = quantized_param((n_in, n_out), names, dtype, quant)
        self.bias = _param((n_out,), names[1:], dtype) if bias else None

    def __call__(self, x):
        if self.kernel_scale is None:
            y = x @ self.kernel[...]
        else:
            y = wq.matmul(x, self.kernel[...], self.kernel_scale[...])
        return y if self.bias is None else y + self.bias[...]


class GatedMLP(nnx.Module):
    """down(act(gate(x)) * up(x)): SwiGLU with silu (Llama), GeGLU with tanh GELU (Gemma)."""

    def __init__(self, hidden: int, inner: int, dtype, act, quant=None):
        self.gate_proj = Linear(hidden, inner, ("embed", "mlp"), dtype, quant=quant)
        self.up_proj = Linear(hidden, inner, ("embed", "mlp"), dtype, quant=quant)
        self.down_proj = Linear(inner, hidden, ("mlp", "embed"), dtype, quant=quant)
        self.act = act

    def __call__(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def sow_kv_amax(module: nnx.Module, k, v, kv_cache) -> None:
    """Under nnx.capture, a dense run (no KV cache) records each layer's max |K| and max |V|
    for the fp8 scales' calibration (kv_scales.py); other runs record nothing (flax warns of
    a sow outside a capture)."""
    if kv_cache is None and hasattr(module, "__captures__"):
        module.sow(nnx.Intermediate, "kv_amax",
                   jnp.stack([jnp.max(jnp.abs(k)), jnp.max(jnp.abs(v))]).astype(jnp.float32))


class RMSNorm(nnx.Module):
    def __init__(self, size: int, eps: float, dtype):
        self.weight = _param((size,), ("norm",), dtype)
        self.eps = eps

    def normalized(self, x):
        xf = x.astype(jnp.float32)
        return xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)

    def __call__(self, x):  # (cast back before the weight, as transformers' Llama does)
        return self.weight[...] * self.normalized(x).astype(x.dtype)
