"""Tuning knobs of the paged-attention kernels, with per-device defaults.

A config is a frozen (hashable) dataclass so it can be a static argument of a jitted
function. `None` fields are filled per call by `resolve_*` from the shapes at hand.
head_size is always q's: int8 pages' rows are D + 2 wide (kv_pages.py). The defaults were
measured on 16-bit pages; 8-bit pages move half the bytes per token and have not been tuned.
"""
from __future__ import annotations

import dataclasses

import jax


def _is_pow2(n: int) -> bool:
  return n > 0 and n & (n - 1) == 0


def next_pow2(n: int) -> int:
  return 1 << max(0, n - 1).bit_length()


def _check_launch(num_warps: int | None, num_stages: int | None) -> None:
  if num_warps is not None and not _is_pow2(num_warps):
    raise ValueError(f"num_warps must be a power of two, got {num_warps}")
  if num_stages is not None and num_stages < 1:
    raise ValueError(f"num_stages must be >= 1, got {num_stages}")


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
  # KV tokens loaded per inner-loop step = pages_per_compute_block * block_size.
  pages_per_compute_block: int | None = None
  # Programs split each sequence's context into this many parts (split-K, merged after).
  k_splits: int | None = None
  num_warps: int | None = None
  num_stages: int | None = None

  def __post_init__(self):
    for name in ("pages_per_compute_block", "k_splits"):
      value = getattr(self, name)
      if value is not None and value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    if self.pages_per_compute_block is not None and not _is_pow2(self.pages_per_compute_block):
      raise ValueError(f"pages_per_compute_block must be a power of two, got {self.pages_per_compute_block}")
    _check_launch(self.num_warps, self.num_stages)


@dataclasses.dataclass(frozen=True)
class RaggedConfig:
  # Query rows (query tokens x padded query heads of one KV group) per program.
  block_rows: int | None = None
  pages_per_compute_block: int | None = None
  num_warps: int | None = None
  num_stages: int | None = None

  def __post_init__(self):
    for name in ("block_rows", "pages_per_compute_block"):
      value = getattr(self, name)
      if value is not None and not _is_pow2(value):
        raise ValueError(f"{name} must be a power of two, got {value}")
    _check_launch(self.num_warps, self.num_stages)


@dataclasses.dataclass(frozen=True)
class _DeviceDefaults:
  kv_tokens_per_step: int   # tokens of K (and of V) per inner-loop step
  num_sms: int              # fallback when the runtime does not report core_count
  min_programs_per_sm: int  # split-K until the grid has at least this many programs per SM
  num_stages: int


# Keyed by a substring of jax.Device.device_kind. On an H100 (bf16, batch 64, context 2048,
# docs/RESULTS.md) 64 tokens per step without split-K was best; 2-4 stages were within 3%.
_DEVICE_DEFAULTS = {
    "H100": _DeviceDefaults(kv_tokens_per_step=64, num_sms=132, min_programs_per_sm=2, num_stages=3),
    "H200": _DeviceDefaults(kv_tokens_per_step=64, num_sms=132, min_programs_per_sm=2, num_stages=3),
    "A100": _DeviceDefaults(kv_tokens_per_step=64, num_sms=108, min_programs_per_sm=2, num_stages=2),
}
_FALLBACK = _DeviceDefaults(kv_tokens_per_step=32, num_sms=80, min_programs_per_sm=2, num_stages=2)


def device_defaults(device: jax.Device | None = None) -> tuple[_DeviceDefaults, int]:
  device = device or jax.devices()[0]
  kind = getattr(device, "device_kind", "")
  defaults = next((d for key, d in _DEVICE_DEFAULTS.items() if key in kind), _FALLBACK)
  num_sms = getattr(device, "core_count", None) or defaults.num_sms
  return defaults, num_sms


def _pages_per_step(defaults: _DeviceDefaults, block_size: int, head_size: int) -> int:
  tokens = defaults.kv_tokens_per_step // (2 if head_size > 128 else 1)
  # Triton's dot needs >= 16 along every dimension, so never fewer than 16 tokens.
  return max(1, max(tokens, 16) // block_size)


def resolve_decode(config: DecodeConfig | None, *, num_seqs: int, num_kv_heads: int,
                   max_blocks: int, block_size: int, head_size: int) -> DecodeConfig:
  config = config or DecodeConfig()
  defaults, num_sms = device_defaults()
  pages = config.pages_per_compute_block or _pages_per_step(defaults, block_size, head_size)
  splits = config.k_splits
  if splits is None:
    # Small batches leave SMs idle; split the context until every SM has work.
    programs = num_seqs * num_kv_heads
    wanted = -(-num_sms * defaults.min_programs_per_sm // max(programs, 1))
    splits = max(1, min(wanted, -(-max_blocks // pages), 16))
  warps = config.num_warps or (4 if head_size <= 128 else 8)
  stages = config.num_stages or defaults.num_stages
  return dataclasses.replace(config, pages_per_compute_block=pages, k_splits=splits,
                             num_warps=warps, num_stages=stages)


def resolve_ragged(config: RaggedConfig | None, *, block_size: int, head_size: int) -> RaggedConfig:
  config = config or RaggedConfig()
  defaults, _ = device_defaults()
  pages = config.pages_per_compute_block or _pages_per_step(defaults, block_size, head_size)
  rows = config.block_rows or (64 if head_size <= 128 else 32)
  warps = config.num_warps or (4 if head_size <= 128 else 8)
  stages = config.num_stages or defaults.num_stages
  return dataclasses.replace(config, block_rows=rows, pages_per_compute_block=pages,
                             num_warps=warps, num_stages=stages)
