"""experiments/preemption.py on tiny settings: both experiments run, the modes give equal
greedy outputs, and swap recomputes nothing while recompute does."""
from experiments import preemption


def test_microbenchmark_times_every_way_back(make_tiny_llama_dir):
    model = make_tiny_llama_dir(tokenizer=True, initializer_range=0.2)
    out = preemption.microbenchmark(str(model), [8, 32], tokens=64, reps=1)
    assert [out[b]["blocks"] for b in ("8", "32")] == [8, 2]
    assert out["8"]["bytes"] == out["32"]["bytes"]  # the same 64 tokens' K/V
    for r in out.values():
        assert r["swap_s"] > 0 and r["swap_per_block_s"] > 0 and r["recompute_s"] > 0
    assert "per-block copies" in preemption.report({"microbenchmark": out})


def test_end_to_end_swap_recomputes_nothing(make_tiny_llama_dir):
    model = make_tiny_llama_dir(tokenizer=True, initializer_range=0.2)
    out = preemption.end_to_end(str(model), [16], num_requests=8, length_scale=0.2,
                                kv_share=0.3, max_model_len=128, seed=0)
    runs = out["16"]  # (end_to_end raises if the two modes' outputs differ)
    assert runs["recompute"]["preemptions"] > 0 and runs["recompute"]["recomputed_tokens"] > 0
    assert runs["recompute"]["blocks_swapped"] == 0
    assert runs["swap"]["preemptions"] == runs["swap"]["swapped_out"] > 0
    assert runs["swap"]["recomputed_tokens"] == 0 and runs["swap"]["blocks_swapped"] > 0
    assert "swapped blk" in preemption.report({"end_to_end": out})
