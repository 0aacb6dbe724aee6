"""Lets Mosaic GPU's interpreter (jax 0.10.2) run wgmma on transposed SMEM operands.

The interpreter's wgmma reads its operands through index transforms only and fails on a
transposed ref (`ref.T`, a TransposeTransform: "object has no attribute 'indices'"), although
wgmma itself takes K-major B operands and every Hopper attention kernel uses one (q K^T).
`install()` replaces the interpreter's wgmma callback with one that applies a trailing
transpose after reading the buffer and is otherwise the same computation
(acc += a @ b in acc's dtype). Only the CPU tests use it; compiled kernels never see it.
"""
from __future__ import annotations

import jax
import numpy as np
from jax._src.pallas.mosaic.interpret import utils as interpret_utils
from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
from jax._src.state.types import TransposeTransform


def _split_transpose(transforms):
  if transforms and isinstance(transforms[-1], TransposeTransform):
    return transforms[:-1], transforms[-1].permutation
  return transforms, None


def _wgmma(*, token, device_id, grid_point_coords, thread_id, acc_allocation_key_as_array,
           acc_transforms, acc_dtype, a_allocation_key_as_array, a_transforms,
           b_allocation_key_as_array, b_transforms, source_info=None):
  shared_memory = gpu_callbacks._get_shared_memory()
  global_thread_id = shared_memory.get_global_thread_id(int(device_id), int(thread_id))
  logging_info = interpret_utils.GPULoggingInfo(
      device_id=int(device_id), grid_point_coords=tuple(int(x) for x in grid_point_coords),
      thread_id=int(thread_id), source_info=source_info)

  def read(key_array, transforms):
    transforms = jax.tree.map(int, gpu_callbacks._remove_noop_transforms(transforms))
    transforms, perm = _split_transpose(transforms)
    key = gpu_callbacks.HostAllocationKey.from_array(key_array)
    value, _, _ = shared_memory.get_buffer_content(
        key, interpret_utils.to_range(transforms), global_thread_id,
        logging_info=logging_info)
    return value if perm is None else np.transpose(value, perm)

  a = read(a_allocation_key_as_array, a_transforms)
  b = read(b_allocation_key_as_array, b_transforms)
  acc_key = gpu_callbacks.HostAllocationKey.from_array(acc_allocation_key_as_array)
  acc_range = interpret_utils.to_range(
      jax.tree.map(int, gpu_callbacks._remove_noop_transforms(acc_transforms)))
  acc, _, _ = shared_memory.get_buffer_content(acc_key, acc_range, global_thread_id,
                                               logging_info=logging_info)
  shared_memory.store_buffer_content(acc_key, acc_range,
                                     acc + np.matmul(a, b, dtype=acc_dtype),
                                     global_thread_id, logging_info=logging_info)
  return token


def install() -> None:
  gpu_callbacks.wgmma = _wgmma
