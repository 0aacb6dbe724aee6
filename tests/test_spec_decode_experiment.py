"""experiments/spec_decode.py on a tiny model: both engines run, the report is complete."""
from experiments import spec_decode


def test_spec_decode_run_reports_both_engines(make_tiny_llama_dir):
    model = make_tiny_llama_dir(tokenizer=True, initializer_range=0.2)
    out = spec_decode.run(str(model), num_prompts=2, max_tokens=8, k=2, batch_sizes=[1, 2],
                           max_model_len=256, precompile=False)
    for r in out.values():
        assert r["plain"]["tokens_per_s"] > 0 and r["ngram"]["tokens_per_s"] > 0
        assert r["plain"]["drafted"] == 0 and 0 <= r["acceptance"] <= 1
        assert 0 <= r["identical_outputs"] <= r["num_prompts"] == 2
    assert "ngram tok/s" in spec_decode.report(out, 2)
