"""experiments/kernel_bench.py --kv_cache_dtypes on the CPU at a tiny shape: every listed page
dtype timed on the same data, the bytes counted as stored, fp8 with its calibrated scales,
each output checked against attention over the dequantized pages."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # an experiment run end to end (the slow tier's convention)

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_kv_cache_dtypes_are_timed_on_the_same_decode(tmp_path):
    out = tmp_path / "kv8.json"
    batch, context, hkv, d = 2, 32, 2, 64
    done = subprocess.run(
        [sys.executable, "experiments/kernel_bench.py", f"--batch_sizes={batch}",
         f"--context_lens={context}", "--block_sizes=16", "--num_q_heads=8",
         f"--num_kv_heads={hkv}", f"--head_size={d}", "--iters=1", "--reps=1",
         "--copy_mib=8", "--kv_cache_dtypes=bfloat16,fp8_e4m3,int8", f"--out={out}"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
        timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["kv_cache_dtypes"] == ["bfloat16", "fp8_e4m3", "int8"]
    rows = {(r["kv_cache_dtype"], r["impl"]): r for r in result["rows"]}
    assert {impl for _, impl in rows} == {"ours_cpu", "xla_gather"}
    values = 2 * batch * context * hkv  # K and V rows read
    stored = {"bfloat16": values * d * 2, "fp8_e4m3": values * d, "int8": values * (d + 2)}
    for (name, impl), r in rows.items():
        assert r["kv_bytes"] == stored[name]
        if "skipped" in r:  # the CPU kernel needs a C++ compiler
            assert impl == "ours_cpu" and r["skipped"].startswith("unavailable")
            continue
        assert "error" not in r, r
        assert r["us"] > 0 and not r["wrong"] and r["rel_err"] < 2e-2
        assert r["tokens_per_s"] == pytest.approx(batch / (r["us"] * 1e-6))
        assert r["kv_gbps"] == pytest.approx(r["kv_bytes"] / (r["us"] * 1e-6) / 1e9)
        assert r["speedup_vs_first"] == pytest.approx(
            r["tokens_per_s"] / rows[("bfloat16", impl)]["tokens_per_s"])
    fp8 = rows[("fp8_e4m3", "xla_gather")]
    assert fp8["page_dtype"] == "float8_e4m3fn"
    assert 0 < fp8["k_scale"] < 1 and 0 < fp8["v_scale"] < 1 and fp8["k_scale"] != fp8["v_scale"]
    # the pages hold random data (quantization loses something), never zeros
    assert 0 < rows[("bfloat16", "xla_gather")]["quant_rel_err"] < rows[("int8", "xla_gather")][
        "quant_rel_err"] < fp8["quant_rel_err"] < 0.1
    assert "KV page dtypes bfloat16, fp8_e4m3, int8" in done.stdout
