"""Session fixtures shared by the whole suite: the real SmolLM2 checkpoint and tiny random Llamas.

    def test_something(smollm2_dir, make_tiny_llama_dir):
        folder = make_tiny_llama_dir(num_key_value_heads=1, head_dim=80, rope_scaling="llama3")

Heavy imports (torch, transformers) happen inside the fixtures, so collecting tests stays cheap.
"""

from __future__ import annotations

import inspect
import json
import pathlib
from typing import Any

import pytest

SMOLLM2_VOCAB_SIZE = 49152

# Shortcuts for make_tiny_llama_dir(rope_scaling=...). The llama3 context must stay below
# max_position_embeddings (transformers warns otherwise).
ROPE_SCALING_PRESETS: dict[str, dict[str, Any]] = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 128,
    },
}


# The quick tier, `pytest -m "not slow"`: the host-side bookkeeping, the sampler and the
# kernels' unit tests, in under 3 minutes on 2 cores. These modules are the slow tier (CI
# runs both); a single test elsewhere may carry @pytest.mark.slow itself.
SLOW_MODULES = {
    # the real SmolLM2 (conversion, transformers as the reference)
    "test_model_vs_hf.py", "test_weights.py",
    # engines end to end: each compiles a model's step shapes, and checks outputs against
    # dense runs
    "test_engine.py", "test_swap.py", "test_chunked_prefill.py", "test_prefix_caching.py",
    "test_spec_decode.py", "test_beam_search.py", "test_step_failure.py", "test_mixtral.py",
    "test_precompile.py", "test_pallas_engine.py", "test_sharing.py", "test_model_families.py",
    "test_async_scheduling.py", "test_structured_outputs.py", "test_prompt_logprobs.py",
    "test_sliding_window_blocks.py", "test_weight_quant.py", "test_kv_scales.py",
    # several processes, or a live server process
    "test_tensor_parallel.py", "test_cli.py", "test_server_api.py", "test_server_errors.py",
    "test_server_fuzz.py", "test_server_hostile.py", "test_server_lifecycle.py",
    "test_server_loglikelihood.py", "test_server_tools.py",
    "test_server_load.py", "test_server_startup.py", "test_server_structured.py",
    "test_server_extras.py",
    "test_server_clients.py",  # instructor, langchain-openai, lm-eval
    "test_dashboard.py", "test_observability.py",  # a browser; an in-process engine
    # experiments and notebooks run end to end
    "test_notebooks.py", "test_batching.py", "test_memory_waste.py",
    "test_preemption_experiment.py", "test_schedule_cost_experiment.py",
    "test_host_overhead_experiment.py",
    "test_spec_decode_experiment.py", "test_throughput_peers.py",
    "test_structured_outputs_experiment.py", "test_kv_accuracy_experiment.py",
    # the Mosaic GPU kernel in its (slow) interpreter
    "test_paged_attention_mgpu.py",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
    # The full kernel parameter product runs only when asked for by name (`-m full`); done
    # here rather than with addopts' -m, which a `-m "not slow"` on the command line replaces.
    if "full" not in (config.option.markexpr or ""):
        full = [item for item in items if item.get_closest_marker("full")]
        if full:
            config.hook.pytest_deselected(items=full)
            items[:] = [item for item in items if not item.get_closest_marker("full")]


@pytest.fixture(scope="session")
def paged_jax_cache_dir(tmp_path_factory) -> pathlib.Path:
    """A GGUF conversion cache private to this test session (CI machines start empty)."""
    return tmp_path_factory.mktemp("paged_jax_cache")


@pytest.fixture(scope="session")
def smollm2_dir(paged_jax_cache_dir) -> pathlib.Path:
    """The embedded SmolLM2-135M-Instruct GGUF converted to a Hugging Face folder (about 5 s, once)."""
    from paged_jax.weights import resolve_model

    return resolve_model(None, cache_dir=paged_jax_cache_dir)


@pytest.fixture(scope="session")
def smollm2_tokenizer_files(tmp_path_factory) -> pathlib.Path:
    """SmolLM2's tokenizer files alone (built from the GGUF metadata, no weight conversion)."""
    from paged_jax.checkpoint.gguf_convert import gguf_tokenizer, read_gguf
    from paged_jax.weights import default_gguf_path

    folder = tmp_path_factory.mktemp("smollm2_tokenizer")
    _, metadata = read_gguf(default_gguf_path())
    gguf_tokenizer(metadata).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def make_tiny_llama_dir(tmp_path_factory, request):
    """A factory of tiny random Llama checkpoint folders, each built once per session per argument set.

    make_tiny_llama_dir(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2,  # MHA: kv == heads, MQA: kv == 1
        head_dim=None,                    # None: hidden_size // heads; may be anything, e.g. 80
        intermediate_size=96, num_hidden_layers=2,
        vocab_size=None,                  # None: 256, or SmolLM2's 49152 when tokenizer=True
        tie_word_embeddings=False,
        rope_scaling=None,                # None, "linear", "llama3" (ROPE_SCALING_PRESETS) or a dict
        rope_theta=10000.0, max_position_embeddings=512, rms_norm_eps=1e-5,
        initializer_range=0.02,           # std of the random linear/embedding weights
        dtype="float32",                  # or "bfloat16" / "float16": the dtype saved
        max_shard_size=None,              # e.g. "100KB": sharded files + model.safetensors.index.json
        tokenizer=False,                  # save SmolLM2's tokenizer too (needs vocab_size >= 49152)
        seed=0,
        num_local_experts=0,              # > 0: a Mixtral (sparse MoE), num_experts_per_tok of them
        num_experts_per_tok=2,            # per token; the router drawn wide (std 0.5) so it picks
    ) -> pathlib.Path

    Weights come from LlamaForCausalLM(config) under torch.manual_seed(seed); the RMSNorm weights are
    drawn around 1 (std 0.1) instead of all ones, so tests see them.
    """
    made: dict[str, pathlib.Path] = {}

    def make(
        *,
        hidden_size: int = 64,
        num_attention_heads: int = 4,
        num_key_value_heads: int = 2,
        head_dim: int | None = None,
        intermediate_size: int = 96,
        num_hidden_layers: int = 2,
        vocab_size: int | None = None,
        tie_word_embeddings: bool = False,
        rope_scaling: str | dict | None = None,
        rope_theta: float = 10000.0,
        max_position_embeddings: int = 512,
        rms_norm_eps: float = 1e-5,
        initializer_range: float = 0.02,
        dtype: str = "float32",
        max_shard_size: str | int | None = None,
        tokenizer: bool = False,
        seed: int = 0,
        num_local_experts: int = 0,
        num_experts_per_tok: int = 2,
    ) -> pathlib.Path:
        arguments = {name: value for name, value in locals().items() if name in _ARGUMENTS}
        key = json.dumps(arguments, sort_keys=True)
        if key in made:
            return made[key]

        import torch
        import transformers

        if vocab_size is None:
            vocab_size = SMOLLM2_VOCAB_SIZE if tokenizer else 256
        if tokenizer and vocab_size < SMOLLM2_VOCAB_SIZE:
            raise ValueError(f"tokenizer=True needs vocab_size >= {SMOLLM2_VOCAB_SIZE}, got {vocab_size}")
        if isinstance(rope_scaling, str):
            rope_scaling = ROPE_SCALING_PRESETS[rope_scaling]
        moe = dict(num_local_experts=num_local_experts, num_experts_per_tok=num_experts_per_tok)
        kind = "Mixtral" if num_local_experts else "Llama"
        config = getattr(transformers, f"{kind}Config")(
            **(moe if num_local_experts else {}),
            hidden_size=hidden_size,
            num_attention_heads=num_attention_heads,
            num_key_value_heads=num_key_value_heads,
            head_dim=head_dim if head_dim is not None else hidden_size // num_attention_heads,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_hidden_layers,
            vocab_size=vocab_size,
            tie_word_embeddings=tie_word_embeddings,
            rope_scaling=dict(rope_scaling) if rope_scaling else None,
            rope_theta=rope_theta,
            max_position_embeddings=max_position_embeddings,
            rms_norm_eps=rms_norm_eps,
            initializer_range=initializer_range,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=2,
        )
        config.architectures = [f"{kind}ForCausalLM"]
        torch.manual_seed(seed)
        model = getattr(transformers, f"{kind}ForCausalLM")(config).eval()
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name.endswith("norm.weight"):
                    parameter.normal_(1.0, 0.1)
                if name.endswith("gate.weight"):  # Mixtral's router
                    parameter.normal_(0.0, 0.5)
        model = model.to(getattr(torch, dtype))
        folder = tmp_path_factory.mktemp("tiny_llama")
        save_kwargs = {"max_shard_size": max_shard_size} if max_shard_size is not None else {}
        model.save_pretrained(folder, **save_kwargs)
        if tokenizer:
            tokenizer_files = request.getfixturevalue("smollm2_tokenizer_files")
            for file in tokenizer_files.iterdir():
                (folder / file.name).write_bytes(file.read_bytes())
        (folder / "tiny_llama_arguments.json").write_text(json.dumps(arguments, indent=2) + "\n")
        made[key] = folder
        return folder

    _ARGUMENTS = set(inspect.signature(make).parameters)
    return make


@pytest.fixture(scope="session")
def batching_run(tmp_path_factory, make_tiny_llama_dir):
    """experiments/batching.py run once on a tiny model, light and overloaded arrival rates:
    (the finished process, its out_dir). Checked by test_batching.py and plotted by notebook
    03 in test_notebooks.py (one run of about half a minute for both)."""
    import subprocess
    import sys

    model = make_tiny_llama_dir(tokenizer=True, initializer_range=0.2)
    out = tmp_path_factory.mktemp("batching")
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.batching", f"--model={model}", "--num_requests=24",
         "--rates=20,2000", "--kv_tokens=256", "--max_num_seqs=16", f"--out_dir={out}"],
        cwd=pathlib.Path(__file__).resolve().parents[1], capture_output=True, text=True,
        timeout=300)
    return proc, out

