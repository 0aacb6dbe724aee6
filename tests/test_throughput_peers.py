"""experiments/throughput.py's optional peers: transformers' continuous batching runs on a tiny
model, and llama.cpp is skipped with a message when llama-cpp-python cannot be imported."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_peers_run_or_are_skipped(tmp_path, make_tiny_llama_dir):
    pytest.importorskip("torch")
    model = make_tiny_llama_dir(tokenizer=True, initializer_range=0.2)
    blocker = tmp_path / "blocker" / "llama_cpp"  # makes `import llama_cpp` fail, installed or not
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('blocked by the test')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(blocker.parent), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, "experiments/throughput.py", f"--model={model}", "--nochat", "--nohf",
         "--num_requests=6", "--mean_input_len=12", "--mean_output_len=8", "--max_num_seqs=8",
         "--max_model_len=64", "--hf_cb_num_blocks=16", f"--out={out}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "llama.cpp: skipped (llama-cpp-python is not installed" in proc.stdout
    results = json.loads(out.read_text())
    assert "llama_cpp" not in results and "transformers_static" not in results
    tokens = results["paged_jax"]["output_tokens"]
    try:
        from transformers.generation.configuration_utils import ContinuousBatchingConfig  # noqa
    except ImportError:
        assert "transformers continuous batching: skipped" in proc.stdout
        return
    cb = results["transformers_continuous"]
    assert cb["output_tokens"] == tokens and cb["output_tokens_per_s"] > 0
    assert results["ratio_vs_transformers_continuous"] > 0
    assert "ratio paged-jax / transformers continuous batching" in proc.stdout

