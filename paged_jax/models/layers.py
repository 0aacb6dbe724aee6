"""Building blocks every model family shares: parameters with logical axis names, and the
linear layer (kernels stored [in, out])."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def _param(shape, names, dtype):
    # Created abstractly (nnx.eval_shape) and filled from a checkpoint; zeros never reach a run.
    return nnx.Param(jnp.zeros(shape, dtype), out_sharding=names, eager_sharding=False)


class Linear(nnx.Module):
    def __init__(self, n_in, n_out, names, dtype, bias=False):
        self.kernel = _param((n_in, n_out), names, dtype)
        self.bias = _param((n_out,), names[1:], dtype) if bias else None

    def __call__(self, x):
        y = x @ self.kernel[...]
        return y if self.bias is None else y + self.bias[...]


class GatedMLP(nnx.Module):
    """down(act(gate(x)) * up(x)): SwiGLU with silu (Llama), GeGLU with tanh GELU (Gemma)."""

    def __init__(self, hidden: int, inner: int, dtype, act):
        self.gate_proj = Linear(hidden, inner, ("embed", "mlp"), dtype)
        self.up_proj = Linear(hidden, inner, ("embed", "mlp"), dtype)
        self.down_proj = Linear(inner, hidden, ("mlp", "embed"), dtype)
        self.act = act

    def __call__(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class RMSNorm(nnx.Module):
    def __init__(self, size: int, eps: float, dtype):
        self.weight = _param((size,), ("norm",), dtype)
        self.eps = eps

    def normalized(self, x):
        xf = x.astype(jnp.float32)
        return xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)

    def __call__(self, x):  # (cast back before the weight, as transformers' Llama does)
        return self.weight[...] * self.normalized(x).astype(x.dtype)
