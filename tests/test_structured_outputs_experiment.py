"""experiments/structured_outputs.py on a tiny model: every constrained output is valid JSON
and the mixes report their throughput and bitmask cost."""
import json
import subprocess
import sys


def test_structured_outputs_run_reports_every_mix(make_tiny_llama_dir, tmp_path):
    model = make_tiny_llama_dir(tokenizer=True, initializer_range=0.2)
    out = subprocess.run(
        [sys.executable, "-m", "experiments.structured_outputs", f"--model={model}",
         "--num_requests=4", "--prompt_len=8", "--max_tokens=12", f"--out_dir={tmp_path}"],
        capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    mixes = {m["fraction"]: m for m in results["mixes"]}
    assert sorted(mixes) == [0.0, 0.5, 1.0]
    assert [mixes[f]["constrained"] for f in (0.0, 0.5, 1.0)] == [0, 2, 4]
    for m in mixes.values():
        # The schema bounds every field: each constrained output closes and parses.
        assert m["valid_json"] == m["constrained"] and m["finished_by_length"] == 0
        assert m["tokens_per_s"] > 0 and m["throughput_vs_unconstrained"] > 0
    assert mixes[1.0]["bitmask_ms_per_step"] > 0
