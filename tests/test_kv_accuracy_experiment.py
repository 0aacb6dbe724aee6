"""experiments/kv_cache_dtype_accuracy.py's transformers reference: its rounding of K/V (in
torch) agrees with the pages' (paged_jax.kv_quant), and its scores of a float32 model agree
with the engine's."""
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from experiments import kv_cache_dtype_accuracy as acc
from paged_jax import kv_quant
from paged_jax.models.loader import load_model

STORED = {"bfloat16": jnp.bfloat16, "fp8_e4m3": jnp.float8_e4m3fn,
          "fp8_e5m2": jnp.float8_e5m2, "int8": jnp.int8}


@pytest.mark.parametrize("name", sorted(STORED))
def test_the_reference_rounds_rows_as_the_pages_store_them(name):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((5, 3, 64)) * rng.uniform(0.01, 20, (5, 3, 1))).astype(np.float32)
    x[0, 0] *= 200  # past e4m3's 448: both saturate
    ours = np.asarray(kv_quant.dequantize(kv_quant.quantize(jnp.asarray(x), STORED[name]), 64))
    theirs = acc.rounded_as_stored(torch.from_numpy(x), name).numpy()
    # int8: one float32 division's rounding apart at most, when a value sits on a half step
    np.testing.assert_allclose(theirs, ours, rtol=1e-6, atol=1e-6)
    assert np.abs(theirs - x).max() > 0  # the rounding is in force


def test_the_reference_scores_a_float32_model_as_the_engine_does(make_tiny_llama_dir):
    folder = make_tiny_llama_dir(tokenizer=True, initializer_range=0.2, num_hidden_layers=2,
                                 hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    rng = np.random.default_rng(4)
    windows = [rng.integers(0, 49152, 40).tolist(), rng.integers(0, 49152, 25).tolist()]
    model = load_model(str(folder))
    logprobs, top1, _ = acc.score(model, windows, "auto", chunk=16)
    ref_logprobs, ref_top1, _ = acc.hf_score(folder, windows, "auto")
    np.testing.assert_allclose(logprobs, ref_logprobs, atol=1e-4)
    assert np.mean(top1 == ref_top1) >= 0.95  # (near-ties may flip)
    # With int8 pages the scores move, the engine's and the reference's alike; and the
    # reference puts back what it patched.
    q_logprobs, _, _ = acc.score(model, windows, "int8", chunk=16)
    ref_q_logprobs, _, _ = acc.hf_score(folder, windows, "int8")
    moved = np.abs(ref_q_logprobs - ref_logprobs).max()
    assert moved > 1e-3
    assert np.abs(q_logprobs - ref_q_logprobs).max() < moved / 10
    again, _, _ = acc.hf_score(folder, windows, "auto")
    np.testing.assert_array_equal(again, ref_logprobs)
