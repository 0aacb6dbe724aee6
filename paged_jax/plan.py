"""EnginePlan: every default an engine leaves to "auto" or None, and every check across options,
resolved once from the EngineConfig, the model's config and the platform.

EngineConfig validates each field alone; `check_options` (called by the command line at parse
time and first thing by the engine) checks the fields against each other; `make_plan` adds what needs the
model and the platform (context length, KV pool size, host pool, attention backend, step
shape buckets). The engine, the scheduler it builds and the server read the plan's values and
repeat none of these checks.
"""
from __future__ import annotations

import dataclasses
import logging

from paged_jax.config import FP8_KV, EngineConfig

log = logging.getLogger(__name__)

DEFAULT_MAX_MODEL_LEN = 2048  # cap on the model's own context when max_model_len is not given


@dataclasses.dataclass(frozen=True)
class EnginePlan:
    backend: str  # "xla" | "pallas" | "cpu": the attention path "auto" stood for
    max_model_len: int
    max_num_batched_tokens: int  # token budget of one step
    num_kv_blocks: int  # device KV pool, block 0 included
    num_cpu_blocks: int  # host pool for preemption by swap (0: recompute only)
    num_speculative_tokens: int  # 0 without speculative decoding
    # Step shapes (step_inputs.Buckets): a ladder of table widths (the Pallas kernels' cost
    # grows with the width; the XLA and CPU loops stop at the longest row), and a separate
    # mixed step shape where prompts may start past a cached prefix on the XLA path.
    table_ladder: bool
    mixed_steps: bool
    # Steps scheduled while the one before runs (off with speculative decoding: a step's
    # drafts are looked up in the tokens of the step before).
    async_scheduling: bool = False

    @property
    def swapping(self) -> bool:
        return self.num_cpu_blocks > 0


def check_options(config: EngineConfig) -> None:
    """The checks between EngineConfig's fields; raises ValueError naming them."""
    if config.enable_chunked_prefill and not config.mixed_batches:
        raise ValueError("enable_chunked_prefill needs mixed_batches (prompt chunks ride in "
                         "decoding steps)")
    if config.speculative_method is not None:
        if not 1 <= config.num_speculative_tokens <= 16:
            raise ValueError(f"num_speculative_tokens must be in [1, 16] with "
                             f"speculative_method, got {config.num_speculative_tokens}")
        if not config.prompt_lookup_min <= config.prompt_lookup_max:
            raise ValueError(f"need 1 <= prompt_lookup_min <= prompt_lookup_max, got "
                             f"{config.prompt_lookup_min} and {config.prompt_lookup_max}")
        if not config.mixed_batches:
            raise ValueError("speculative decoding needs mixed_batches (a request's drafts "
                             "ride as a row of several tokens beside the decodes)")
    if config.calculate_kv_scales and config.kv_cache_dtype not in FP8_KV:
        raise ValueError(f"calculate_kv_scales sets fp8 pages' scales; kv_cache_dtype is "
                         f"{config.kv_cache_dtype!r} (use one of {', '.join(FP8_KV)})")
    if config.process_id is not None and config.num_processes is not None and not (
            config.process_id < config.num_processes):
        raise ValueError(f"process_id {config.process_id} is outside [0, num_processes "
                         f"{config.num_processes})")
    if config.max_num_batched_tokens is not None and config.max_model_len is not None:
        _check_budget(config.max_num_batched_tokens, config.max_model_len,
                      config.enable_chunked_prefill)


def _check_budget(max_num_batched_tokens: int, max_model_len: int, chunked: bool) -> None:
    if max_num_batched_tokens < max_model_len and not chunked:
        # Without chunked prefill a whole prompt must fit in one step's token budget.
        raise ValueError(f"max_num_batched_tokens {max_num_batched_tokens} is below "
                         f"max_model_len {max_model_len}: a prompt must fit one step "
                         "unless enable_chunked_prefill is on")


FP8_MATMUL_CAPABILITY = 8.9  # Ada and Hopper: the first NVIDIA GPUs with fp8 tensor cores


def check_quantization(quantization: str | None, platform: str,
                       compute_capability: str | None = None) -> None:
    """fp8 weights need fp8 matmuls; raises ValueError naming the platform otherwise."""
    if quantization != "fp8":
        return
    if platform != "gpu" or compute_capability is None or \
            float(compute_capability) < FP8_MATMUL_CAPABILITY:
        where = platform if compute_capability is None else \
            f"{platform} of compute capability {compute_capability}"
        raise ValueError(f"quantization 'fp8' needs a GPU with fp8 matmuls (compute "
                         f"capability {FP8_MATMUL_CAPABILITY} or newer); this is {where}. "
                         "On the CPU use quantization 'int8'")


def resolve_dtype(config: EngineConfig, platform: str) -> str:
    """The model dtype "auto" stands for: float32 on the CPU (XLA's CPU bfloat16 matmuls are
    slower), bfloat16 on accelerators."""
    if config.dtype != "auto":
        return config.dtype
    return "float32" if platform == "cpu" else "bfloat16"


def make_plan(config: EngineConfig, model_config, platform: str,
              multihost: bool) -> EnginePlan:
    """For a config that passed check_options (the engine checks it before anything else).
    model_config: the loaded model's ModelConfig (after tensor-parallel head changes);
    platform: jax.default_backend()."""
    from paged_jax import kv_cache

    backend = pick_backend(config.attention_backend, platform, multihost)
    max_model_len = config.max_model_len or min(model_config.max_position_embeddings,
                                                DEFAULT_MAX_MODEL_LEN)
    if max_model_len > model_config.max_position_embeddings:
        raise ValueError(f"max_model_len {max_model_len} exceeds the model's "
                         f"max_position_embeddings {model_config.max_position_embeddings}")
    # Default: one max_model_len of tokens per step. On the CPU a 2048-token budget ran the
    # throughput workload no faster (docs/RESULTS.md) and needs larger step buckets. Every
    # row counts against the budget, decodes too: at least a token per sequence.
    budget = config.max_num_batched_tokens or max(max_model_len, config.max_num_seqs)
    _check_budget(budget, max_model_len, config.enable_chunked_prefill)
    if budget < config.max_num_seqs:  # (vLLM refuses this; here it is allowed, and said)
        log.warning("max_num_batched_tokens %d is below max_num_seqs %d: at most %d "
                    "sequences advance in a step (every row counts against the budget)",
                    budget, config.max_num_seqs, budget)
    tp = config.tensor_parallel_size
    # kv_cache_memory_bytes is per device; each device holds Hkv / tp of every block.
    num_blocks = config.num_kv_blocks or kv_cache.num_blocks_for(
        model_config, config.block_size, config.kv_cache_memory_bytes * tp,
        config.kv_cache_dtype)
    num_cpu_blocks = 0
    if config.preemption_mode == "swap":
        if multihost:
            raise ValueError("preemption_mode 'swap' runs on one host; multi-host runs "
                             "preempt by recompute")
        # The host keeps whole blocks (all KV heads), whatever the tensor parallelism.
        block = kv_cache.block_bytes(model_config, config.block_size, config.kv_cache_dtype)
        num_cpu_blocks = config.num_cpu_blocks or config.swap_space_bytes // block
        if num_cpu_blocks < 1:
            raise ValueError(f"swap_space_bytes {config.swap_space_bytes} holds no block of "
                             f"{block} bytes")
    spec = config.num_speculative_tokens if config.speculative_method else 0
    if config.async_scheduling and spec:
        log.warning("async_scheduling: off with speculative decoding (drafts are looked up "
                    "in the tokens of the step before); steps run synchronously")
    return EnginePlan(
        backend=backend, max_model_len=max_model_len, max_num_batched_tokens=budget,
        num_kv_blocks=num_blocks, num_cpu_blocks=num_cpu_blocks, num_speculative_tokens=spec,
        table_ladder=backend == "pallas",
        mixed_steps=backend == "xla" and (config.enable_prefix_caching
                                          or config.enable_chunked_prefill or spec > 0),
        async_scheduling=config.async_scheduling and not spec)


def pick_backend(requested: str, platform: str, multihost: bool) -> str:
    """The attention backend "auto" stands for, or the requested one if it can run. (Every
    backend applies sliding windows and soft-capping, and reads every kv_cache_dtype's pages.)"""
    if requested not in ("auto", "cpu"):
        return requested
    if platform != "cpu":
        if requested == "cpu":
            raise ValueError(f"attention_backend 'cpu' needs the CPU platform, not "
                             f"{platform!r}")
        return "pallas"
    from paged_jax import cpu_kernels

    # Under a one-process tensor-parallel mesh attention runs under shard_map, so each call
    # sees one device's KV heads; across processes it is untested.
    reason = ("it is not tested across processes (multi-host)" if multihost
              else cpu_kernels.unavailable_reason())
    if reason is None:
        return "cpu"
    if requested == "cpu":
        raise ValueError(f"attention_backend 'cpu' cannot run here: {reason}")
    log.info("attention backend xla: the CPU kernel is unavailable (%s)", reason)
    return "xla"


def warn_half_on_cpu(dtype: str) -> None:
    """Says that a 16-bit model on the CPU is not the default, and why it may be slower. (No
    figure is quoted: the 3x once measured for bfloat16 predates the in-place cache writes,
    which removed most of it, and has not been measured again.)"""
    try:
        flags = set(open("/proc/cpuinfo").read().split())
    except OSError:
        flags = set()
    native = dtype == "bfloat16" and bool(flags & {"avx512_bf16", "amx_bf16"})
    log.warning("dtype %s on the CPU: float32 is the CPU's default (--dtype auto)%s.", dtype,
                "" if native else f"; this CPU has no native {dtype} matmul, so XLA widens "
                "each product's operands to float32")
