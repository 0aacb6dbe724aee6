"""After precompile=True, a varied workload compiles nothing: every step shape is a bucket."""
import jax
import numpy as np
import pytest

from paged_jax import LLM, SamplingParams, spec_decode

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@pytest.mark.parametrize("backend, chunked, swap, spec", [
    ("auto", False, False, False),
    # (the plain XLA engine: its shapes are a subset of the chunked and spec runs' below)
    pytest.param("xla", False, False, False, marks=pytest.mark.full),
    ("xla", True, False, False),
    pytest.param("auto", False, True, False, marks=pytest.mark.full),  # (swap copies)
    ("xla", False, False, True)])
def test_precompiled_engine_compiles_nothing_while_generating(make_tiny_llama_dir, backend,
                                                              chunked, swap, spec, monkeypatch):
    folder = make_tiny_llama_dir(tokenizer=True, initializer_range=0.2)
    # With swap, a cache of 11 usable blocks for up to 13 requests of up to 4 blocks each.
    # With speculative decoding, drafts of 0 to 3 random tokens (a random tiny model seldom
    # repeats itself, so n-gram lookup would rarely draft).
    draw = np.random.default_rng(1)
    monkeypatch.setattr(spec_decode, "propose_ngram", lambda tokens, k, *_: draw.integers(
        3, 49152, int(draw.integers(0, k + 1))).tolist())
    # (Four sequences on the XLA paths: each of their step shapes compiles slowly, and the
    # ladders' logic is the same.)
    llm = LLM(str(folder), num_kv_blocks=12 if swap else 64, max_model_len=64,
              max_num_seqs=4 if backend == "xla" else 8,
              max_num_batched_tokens=32 if chunked else 128, enable_chunked_prefill=chunked,
              enable_prefix_caching=not chunked, precompile=True, attention_backend=backend,
              preemption_mode="swap" if swap else "recompute", num_cpu_blocks=64,
              speculative_method="ngram" if spec else None, num_speculative_tokens=3)
    runner = llm.llm_engine.runner
    variants = runner.num_compiled
    swap_variants = runner.swap_space.num_compiled if swap else 0
    assert swap_variants == (10 if swap else 0)  # copies of 1, 2, 4, 8 and 12 blocks each way
    assert variants == len(list(llm.llm_engine.buckets.all_shapes()))
    compiles = []

    def listener(event, duration, **kwargs):
        if event == BACKEND_COMPILE_EVENT:
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        rng = np.random.default_rng(0)
        stem = rng.integers(3, 49152, 20).tolist()  # prefix-cache hits: "mixed" steps on xla
        for batch in (1, 3, 8, 13):
            prompts = [{"prompt_token_ids": stem[:int(rng.choice([0, 20]))]
                        + rng.integers(3, 49152, int(rng.integers(1, 20))).tolist()}
                       for _ in range(batch)]
            params = [SamplingParams(temperature=float(rng.choice([0.0, 0.8])),
                                     top_k=int(rng.choice([-1, 5])),
                                     top_p=float(rng.choice([1.0, 0.9])),
                                     repetition_penalty=float(rng.choice([1.0, 1.2])),
                                     logprobs=int(rng.choice([0, 3])) or None,
                                     max_tokens=int(rng.integers(1, 24)), ignore_eos=True)
                      for _ in range(batch)]
            llm.generate(prompts, params, use_tqdm=False)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []
    assert runner.num_compiled == variants
    if spec:
        assert llm.llm_engine.stats.spec_draft_tokens > 0
    if swap:
        assert runner.swap_space.num_compiled == swap_variants
        assert llm.llm_engine.scheduler.num_swapped_out > 0
    if chunked:  # prompts of up to 39 tokens went through 32-token steps in chunks
        assert max(len(p["prompt_token_ids"]) for p in prompts) > 32
    else:
        assert llm.llm_engine.kv.cache_stats.hits > 0
