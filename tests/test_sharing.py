"""experiments/sharing.py on tiny settings: the parallel-sampling accounting and the
shared-prefix run (outputs with and without the prefix cache must be equal)."""
from experiments import sharing


def test_parallel_sampling_saves_memory_only_when_sequences_share():
    kw = dict(num_requests=20, kv_tokens=4096, block_size=16, seed=1)
    alone = sharing.parallel_sampling("sharegpt", 1, **kw)
    assert alone["saving"] == 0  # hits then come only from recomputing preempted requests
    assert alone["preemptions"] > 0 or alone["hit_rate"] == 0
    roomy = sharing.parallel_sampling("sharegpt", 1, **dict(kw, kv_tokens=1 << 20))
    assert roomy["preemptions"] == 0 and roomy["hit_rate"] == 0 and roomy["saving"] == 0
    two, six = (sharing.parallel_sampling("sharegpt", n, **kw) for n in (2, 6))
    assert 0 < two["saving"] < six["saving"] < 1
    assert 0 < two["hit_rate"] < six["hit_rate"] < 1


def test_shared_prefix_run_reports_a_speedup_with_equal_outputs(make_tiny_llama_dir):
    model = make_tiny_llama_dir(tokenizer=True, initializer_range=0.2, num_hidden_layers=2,
                                hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    out = sharing.shared_prefix(str(model), [40], num_prompts=6, suffix_len=5, max_tokens=4,
                                block_size=16, seed=0, max_model_len=128, precompile=False)
    r = out["40"]  # (shared_prefix itself raises if the outputs differ)
    # The prefix's 2 full blocks are computed once and hit by the 5 other prompts (the
    # warm-up used another prefix).
    assert r["cached_prompt_tokens"] == 5 * 32 and r["prompt_tokens"] >= 6 * 41
    text = sharing.report({"shared_prefix": out})
    assert "prefix   40 tokens" in text


def test_beam_search_run_saves_more_with_wider_beams(make_tiny_llama_dir):
    model = make_tiny_llama_dir(tokenizer=True, initializer_range=0.2, num_hidden_layers=2,
                                hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    out = sharing.beam_sharing(str(model), [1, 2, 4], dataset="alpaca", num_prompts=3,
                               max_tokens=20, block_size=8, seed=0, max_model_len=128)
    assert out["1"]["saving"] == 0  # one beam shares with nobody
    assert 0 < out["2"]["saving"] < out["4"]["saving"] < 1
    assert out["4"]["steps"] == 20  # one engine step per generated position
    assert "Beam search" in sharing.report({"beam_search": out})
