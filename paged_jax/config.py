"""Engine options, frozen, each field validated alone. Field names follow vLLM's engine
arguments; the command line spells them in kebab case (--max-num-seqs). The checks between
fields and every "auto" default are paged_jax/plan.py's."""
from __future__ import annotations

import dataclasses

# "auto": "pallas" on accelerators; on the CPU "cpu" (XLA plus the C++ attention kernel) where
# it can run (float32, one process, a C++ compiler), else "xla".
ATTENTION_BACKENDS = ("auto", "xla", "pallas", "cpu")
PREEMPTION_MODES = ("recompute", "swap")
DTYPES = ("auto", "float32", "bfloat16", "float16")
BLOCK_SIZES = (8, 16, 32, 64, 128)
# How KV pages are stored (vLLM's kv_cache_dtype; paged_jax/kv_quant.py)
KV_CACHE_DTYPES = ("auto", "float32", "bfloat16", "float16", "fp8", "fp8_e4m3", "fp8_e5m2",
                   "int8")
FP8_KV = ("fp8", "fp8_e4m3", "fp8_e5m2")
SPECULATIVE_METHODS = (None, "ngram")
# Weight-only quantization of the linear layers (vLLM's `quantization`; models/quant.py)
QUANTIZATIONS = (None, "int8", "fp8")
DEFAULT_KV_CACHE_BYTES = 1 << 30
DEFAULT_SWAP_SPACE_BYTES = 4 << 30  # vLLM's swap_space default, 4 GiB


def option(default, help: str, choices: tuple | None = None):
    """A field with its one-line description (and its choices), which `--help` shows."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    model: str | None = option(
        None, "a Hugging Face checkpoint folder, a .gguf file, an Orbax folder written by "
        "`paged-jax convert`, or a hub name (Org/Name) already in the local Hugging Face "
        "cache (default: the embedded SmolLM2-135M-Instruct)")
    revision: str | None = option(None, "with a hub name: the branch, tag or commit of its "
                                  "cached snapshot (default: main)")
    tokenizer: str | None = option(None, "the tokenizer's folder or hub name, when it is not "
                                   "the model's (default: the model's own)")
    tokenizer_revision: str | None = option(None, "with a tokenizer hub name: the revision "
                                            "of its cached snapshot (default: main)")
    dtype: str = option("auto", "the model's dtype; auto: float32 on the CPU (XLA's CPU "
                        "bfloat16 matmuls are slower), bfloat16 on accelerators",
                        DTYPES)
    block_size: int = option(16, "tokens per KV block", BLOCK_SIZES)
    kv_cache_dtype: str = option("auto", "how KV pages are stored: auto (the model's dtype), "
                                 "float32, bfloat16, float16, fp8 / fp8_e4m3, fp8_e5m2 (a "
                                 "scale per layer: 1.0, or see calculate_kv_scales), int8 (a "
                                 "scale per token and KV head)", KV_CACHE_DTYPES)
    calculate_kv_scales: bool = option(False, "fp8 KV pages: per-layer k_scale / v_scale "
                                       "from a calibration pass over a few prompts (vLLM's "
                                       "max / 200 and max / 100) instead of 1.0")
    quantization: str | None = option(None, "the linear layers' weights: int8 (quantized at "
                                      "load, a scale per output channel) or fp8 (e4m3; GPUs "
                                      "with fp8 matmuls); default: as the checkpoint stores "
                                      "them (a GGUF file's Q8_0 weights stay int8)",
                                      QUANTIZATIONS)
    num_kv_blocks: int | None = option(None, "KV blocks in the pool; overrides "
                                       "kv_cache_memory_bytes")
    kv_cache_memory_bytes: int = option(DEFAULT_KV_CACHE_BYTES,
                                        "device memory for the KV pool, per device (512M, 2G)")
    max_model_len: int | None = option(None, "longest prompt + output in tokens (default: the "
                                       "model's max_position_embeddings, at most "
                                       "2048)")
    max_num_seqs: int = option(64, "most sequences in one step")
    max_num_batched_tokens: int | None = option(
        None, "token budget of one step, decodes included (default: max_model_len, at "
        "least max_num_seqs)")
    precompile: bool = option(False, "compile every step shape at start-up, so that no "
                              "request waits for a compile")
    # Decodes and new prompts in one step (decode-first, as vLLM V1 batches); False: every
    # step is all prefill or all decode, prefill first (vLLM V0 and the paper).
    mixed_batches: bool = option(True, "new prompts join decoding steps (vLLM V1); off: "
                                 "prefill-only or decode-only steps, as in the paper")
    # Automatic prefix caching (vLLM's enable_prefix_caching, on by default as in vLLM V1):
    # full KV blocks are kept under a hash of their prefix and shared by later requests that
    # start with the same tokens (n > 1 samples, a common system prompt, a preempted request).
    enable_prefix_caching: bool = option(True, "share the KV blocks of common prompt "
                                         "prefixes between requests")
    # Chunked prefill: a prompt that does not fit a step's token budget beside the decodes is
    # computed over several steps, so long prompts never stall decoding and
    # max_num_batched_tokens may be below max_model_len. Needs mixed_batches.
    enable_chunked_prefill: bool = option(False, "compute a long prompt over several steps "
                                          "beside the decodes (needs mixed batches)")
    # How a request gives up its KV blocks when a decode finds none free: "recompute" (drop
    # them, compute its tokens again when readmitted) or "swap" (copy its computed blocks to
    # host memory and back; recompute when the host blocks run out). The paper's Sec. 4.5.
    preemption_mode: str = option("recompute", "how a preempted request gives up its KV "
                                  "blocks: dropped and recomputed, or swapped to host memory",
                                  PREEMPTION_MODES)
    swap_space_bytes: int = option(DEFAULT_SWAP_SPACE_BYTES,
                                   "host memory for swapped-out KV blocks")
    num_cpu_blocks: int | None = option(None, "host KV blocks for swap; overrides "
                                        "swap_space_bytes")
    # Speculative decoding (spec_decode.py): "ngram" drafts up to num_speculative_tokens
    # tokens a step by prompt lookup (the longest suffix of prompt_lookup_max down to
    # prompt_lookup_min tokens seen before), verified in one step. Needs mixed_batches.
    speculative_method: str | None = option(None, "speculative decoding: ngram (prompt "
                                            "lookup drafts; needs mixed batches)",
                                            SPECULATIVE_METHODS)
    num_speculative_tokens: int = option(0, "most drafts a step per request (1-16, with "
                                         "speculative_method)")
    prompt_lookup_max: int = option(4, "longest suffix an n-gram draft is looked up by")
    prompt_lookup_min: int = option(1, "shortest suffix an n-gram draft is looked up by")
    # Asynchronous scheduling (vLLM's async_scheduling): step N+1 is scheduled and dispatched
    # while step N runs; its sampled tokens stay on the device and feed step N+1 there, and
    # the host applies them one step late. Same tokens as synchronous steps.
    async_scheduling: bool = option(False, "schedule and dispatch each step while the one "
                                    "before runs (speculative decoding and requests with "
                                    "penalties run synchronously)")
    # vLLM's structured_outputs_config.disable_any_whitespace: JSON held to a schema or to
    # any object is written without whitespace between its tokens (small models given the
    # choice may emit whitespace until max_tokens).
    disable_any_whitespace: bool = option(False, "structured outputs: JSON without "
                                          "whitespace between its tokens, for every request")
    attention_backend: str = option("auto", "paged attention: auto (pallas on a GPU, the C++ "
                                    "kernel on the CPU where it builds, else xla)",
                                    ATTENTION_BACKENDS)
    seed: int = option(0, "seed of the engine's random draws (unseeded requests' seeds)")
    # vLLM's max_logprobs: the top-N logprobs are computed on the device for this many ranks
    # (one width for every step, so one compiled variant serves every request).
    max_logprobs: int = option(20, "most logprobs or prompt_logprobs a request may ask for")
    # As vLLM's --generation-config: the sampling parameters a request leaves unset come from
    # the model's generation_config.json (temperature, top_p, top_k, min_p,
    # repetition_penalty, max_new_tokens as max_tokens).
    generation_config: str = option("auto", "where default sampling parameters come from: "
                                    "auto (the model's generation_config.json), vllm "
                                    "(SamplingParams' own defaults) or a folder holding a "
                                    "generation_config.json")
    tensor_parallel_size: int = option(1, "devices the model is split over (a tp mesh axis)")
    cache_dir: str | None = option(None, "where converted checkpoints are kept (default: "
                                   "~/.cache/paged_jax)")
    # Multi-host (jax.distributed.initialize): "host:port" of process 0, the process count and
    # this process's index. None of them: JAX's own detection (Slurm, Open MPI,
    # JAX_COORDINATOR_ADDRESS) if the environment describes a cluster, else one process.
    coordinator_address: str | None = option(None, "multi-host: host:port of process 0")
    num_processes: int | None = option(None, "multi-host: the number of processes")
    process_id: int | None = option(None, "multi-host: this process's index")

    def __post_init__(self):
        for field in dataclasses.fields(self):  # every option with choices (config.option)
            choices, value = field.metadata.get("choices"), getattr(self, field.name)
            if choices is not None and value not in choices:
                named = ", ".join(str(c) for c in choices if c is not None)
                raise ValueError(f"{field.name} must be one of {named}"
                                 f"{' (or None)' if None in choices else ''}, got {value!r}")
        if self.max_logprobs < 0:
            raise ValueError(f"max_logprobs must be >= 0, got {self.max_logprobs}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 2:
            raise ValueError(f"num_kv_blocks must be >= 2, got {self.num_kv_blocks}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.swap_space_bytes < 0:
            raise ValueError(f"swap_space_bytes must be >= 0, got {self.swap_space_bytes}")
        if self.num_cpu_blocks is not None and self.num_cpu_blocks < 1:
            raise ValueError(f"num_cpu_blocks must be >= 1, got {self.num_cpu_blocks}")
        if self.num_speculative_tokens < 0:
            raise ValueError(f"num_speculative_tokens must be >= 0, got "
                             f"{self.num_speculative_tokens}")
        if self.prompt_lookup_min < 1:
            raise ValueError(f"prompt_lookup_min must be >= 1, got {self.prompt_lookup_min}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got "
                             f"{self.tensor_parallel_size}")
        if self.num_processes is not None and self.num_processes < 1:
            raise ValueError(f"num_processes must be >= 1, got {self.num_processes}")
        if self.process_id is not None and self.process_id < 0:
            raise ValueError(f"process_id must be >= 0, got {self.process_id}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got "
                             f"{self.max_num_batched_tokens}")

    @classmethod
    def from_kwargs(cls, **kwargs) -> "EngineConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown engine option(s) {unknown}; known: {sorted(names)}")
        return cls(**kwargs)


@dataclasses.dataclass(frozen=True)
class ServerLimits:
    """The HTTP server's limits (paged-jax serve flags of the same names)."""
    # A 128k-token prompt as ids is about 1 MB of JSON; parsing holds the GIL (0.25 s for
    # 14 MB of ids), so the limit also bounds how long one body can hold up the event loop.
    max_request_body_bytes: int = 8 << 20
    max_json_depth: int = 64
    # Prompts x n of one request: each is a sequence the engine thread checks and schedules.
    max_sequences_per_request: int = 1024
    shutdown_timeout: float = 30.0  # seconds running requests get to finish at SIGTERM
    header_read_timeout: float = 15.0  # seconds a new connection gets to send its headers

    def __post_init__(self):
        for name in ("max_request_body_bytes", "max_json_depth", "max_sequences_per_request"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("shutdown_timeout", "header_read_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
