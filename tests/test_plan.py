"""EnginePlan: the checks between options and every "auto" default, resolved in one place
(paged_jax/plan.py), on a stand-in model config (no model loaded, nothing compiled)."""
from __future__ import annotations

import types

import pytest

from paged_jax.config import EngineConfig
from paged_jax.plan import check_options, make_plan, pick_backend, resolve_dtype

# 1,024 KV bytes per token: 2 (K, V) x 4 layers x 2 KV heads x 16 dims x 4 bytes
MODEL = types.SimpleNamespace(max_position_embeddings=4096, num_layers=4, num_kv_heads=2,
                              head_dim=16, dtype="float32", sliding_window=None)


def plan(platform="cpu", multihost=False, **options):
    options.setdefault("attention_backend", "xla")  # no C++ kernel build for these
    return make_plan(EngineConfig(**options), MODEL, platform, multihost)


def test_defaults_resolve_from_the_model_and_the_options():
    p = plan()
    assert (p.max_model_len, p.max_num_batched_tokens) == (2048, 2048)  # capped at 2048
    assert p.num_kv_blocks == (1 << 30) // (1024 * 16)  # the memory budget in 16-token blocks
    assert (p.num_cpu_blocks, p.swapping, p.num_speculative_tokens) == (0, False, 0)
    assert p.mixed_steps and not p.table_ladder  # XLA with prefix caching: mixed steps
    p = plan(max_model_len=512, max_num_batched_tokens=1024, num_kv_blocks=40,
             enable_prefix_caching=False, tensor_parallel_size=1)
    assert (p.max_model_len, p.max_num_batched_tokens, p.num_kv_blocks) == (512, 1024, 40)
    assert not p.mixed_steps
    p = plan(preemption_mode="swap", swap_space_bytes=10 * 1024 * 16 + 5)
    assert (p.num_cpu_blocks, p.swapping) == (10, True)
    assert plan(speculative_method="ngram", num_speculative_tokens=3).num_speculative_tokens == 3
    assert plan(num_speculative_tokens=3).num_speculative_tokens == 0  # no method: none


def test_every_row_counts_against_the_budget_so_its_default_covers_every_sequence(caplog):
    # Decodes count against max_num_batched_tokens (one budget loop): its default is at
    # least max_num_seqs, and a smaller one set by hand is said, not refused (vLLM refuses).
    assert plan(max_model_len=128, max_num_seqs=256).max_num_batched_tokens == 256
    assert plan(max_model_len=512, max_num_seqs=256).max_num_batched_tokens == 512
    with caplog.at_level("WARNING", logger="paged_jax.plan"):
        p = plan(max_model_len=128, max_num_seqs=64, max_num_batched_tokens=16,
                 enable_chunked_prefill=True)
    assert p.max_num_batched_tokens == 16
    assert "max_num_batched_tokens 16 is below max_num_seqs 64" in caplog.text


@pytest.mark.parametrize("options, message", [
    (dict(enable_chunked_prefill=True, mixed_batches=False), "needs mixed_batches"),
    (dict(max_num_batched_tokens=64, max_model_len=128),
     "max_num_batched_tokens 64 is below max_model_len 128"),
    (dict(speculative_method="ngram", num_speculative_tokens=0),
     r"num_speculative_tokens must be in \[1, 16\]"),
    (dict(speculative_method="ngram", num_speculative_tokens=2, prompt_lookup_min=3,
          prompt_lookup_max=2), "prompt_lookup_min <= prompt_lookup_max"),
    (dict(speculative_method="ngram", num_speculative_tokens=2, mixed_batches=False),
     "speculative decoding needs mixed_batches"),
    (dict(num_processes=2, process_id=2), r"process_id 2 is outside \[0, num_processes 2\)"),
])
def test_options_that_contradict_each_other_are_refused_by_name(options, message):
    config = EngineConfig(**options)  # each field is fine alone
    with pytest.raises(ValueError, match=message):
        check_options(config)


def test_what_needs_the_model_or_the_platform_is_refused_by_name():
    with pytest.raises(ValueError, match="max_model_len 8192 exceeds the model's "
                       "max_position_embeddings 4096"):
        plan(max_model_len=8192)
    # the default budget (max_model_len) is checked as a given one is
    with pytest.raises(ValueError, match="max_num_batched_tokens 100 is below"):
        plan(max_model_len=200, max_num_batched_tokens=100)
    assert plan(max_model_len=200, max_num_batched_tokens=100,
                enable_chunked_prefill=True).max_num_batched_tokens == 100
    with pytest.raises(ValueError, match="holds 0 blocks"):
        plan(kv_cache_memory_bytes=1000)
    with pytest.raises(ValueError, match="swap_space_bytes 100 holds no block"):
        plan(preemption_mode="swap", swap_space_bytes=100)
    with pytest.raises(ValueError, match="'swap' runs on one host"):
        plan(preemption_mode="swap", multihost=True)


def test_dtype_auto_is_float32_on_the_cpu_and_bfloat16_elsewhere():
    assert resolve_dtype(EngineConfig(), "cpu") == "float32"
    assert resolve_dtype(EngineConfig(), "gpu") == "bfloat16"
    assert resolve_dtype(EngineConfig(dtype="bfloat16"), "cpu") == "bfloat16"


def test_auto_backend_falls_back_to_xla_where_the_cpu_kernel_cannot_run():
    assert pick_backend("auto", "cpu", False) == "cpu"  # (every model and page dtype)
    assert pick_backend("auto", "cpu", True) == "xla"  # multi-host
    assert pick_backend("auto", "gpu", False) == "pallas"
    assert pick_backend("xla", "cpu", False) == "xla"
    with pytest.raises(ValueError, match="'cpu' cannot run here: it is not tested across"):
        pick_backend("cpu", "cpu", True)
    with pytest.raises(ValueError, match="'cpu' needs the CPU platform, not 'gpu'"):
        pick_backend("cpu", "gpu", False)
    assert plan(platform="gpu", attention_backend="auto").table_ladder  # hence a width ladder
