"""The one place that decides how a Pallas kernel is lowered.

Backends:
  "triton"      Pallas' Triton lowering (any CUDA GPU; deprecated on JAX main, still shipped).
  "mosaic_gpu"  Pallas' Mosaic GPU lowering (Hopper and newer), used by paged_attention_mgpu.
  "interpret"   the Pallas interpreter, the default off GPU (CPU tests).
Callers pass `interpret=None` to take the platform default, True to force the interpreter,
False to force compilation.
"""
from __future__ import annotations

import jax
from jax.experimental.pallas import triton as pl_triton

TRITON = "triton"
MOSAIC_GPU = "mosaic_gpu"

# The lowering of the engine's decode kernel (dispatch.paged_decode). MOSAIC_GPU sends the
# decode steps it supports to paged_attention_mgpu. Measured on an H200 it was slower than
# the Triton kernel (docs/RESULTS.md); switch when it wins, or when the Triton lowering
# leaves JAX (the ragged kernel is Triton-only so far).
COMPILED_BACKEND = TRITON


def on_gpu() -> bool:
  return jax.default_backend() == "gpu"


def use_interpret(interpret: bool | None) -> bool:
  """Resolves `interpret=None` to the platform default: compiled on GPU, interpreted elsewhere."""
  if interpret is None:
    return not on_gpu()
  return bool(interpret)


def triton_params(num_warps: int, num_stages: int) -> pl_triton.CompilerParams:
  return pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
