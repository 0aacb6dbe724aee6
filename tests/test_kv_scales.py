"""Calibrated fp8 KV scales (calculate_kv_scales, kv_scales.py): the scales are vLLM's
max |K| / 200 and max |V| / 100 of the calibration prompts, taken from transformers' own K
(after rope) and V; a model whose keys and values pass e4m3's range (448) is read back
faithfully from fp8 pages with them and not without; the option refused where it means
nothing."""
import numpy as np
import pytest

from paged_jax import LLMEngine, SamplingParams
from paged_jax.config import EngineConfig
from paged_jax.kv_scales import calculate_kv_scales
from paged_jax.models.loader import load_model
from paged_jax.plan import check_options

# K and V weights scaled up so |K| and |V| pass e4m3's largest value (Q's down by as much, so
# the attention scores are the model's own)
BIG = 4000.0


@pytest.fixture(scope="module")
def loud_model_dir(make_tiny_llama_dir, tmp_path_factory):
    """A tiny Llama with SmolLM2's tokenizer whose k/v projections are scaled by BIG and its
    q projections by 1 / BIG."""
    import torch
    import transformers

    folder = make_tiny_llama_dir(tokenizer=True, initializer_range=0.1)
    out = tmp_path_factory.mktemp("loud")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("k_proj.weight", "v_proj.weight")):
                parameter.mul_(BIG)
            if name.endswith("q_proj.weight"):
                parameter.div_(BIG)
    model.save_pretrained(out)
    for file in folder.iterdir():
        if file.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            (out / file.name).write_bytes(file.read_bytes())
    return out


def hf_kv_amax(folder, prompts):
    """[layers, 2]: max |K| after rope and max |V| in transformers' forward over prompts."""
    import torch
    import transformers
    from transformers.models.llama import modeling_llama

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    n = model.config.num_hidden_layers
    amax, calls = np.zeros((n, 2)), []
    rotate = modeling_llama.apply_rotary_pos_emb

    def spy(q, k, *args, **kwargs):  # called once per layer, in order
        q_out, k_out = rotate(q, k, *args, **kwargs)
        calls.append(float(k_out.abs().max()))
        return q_out, k_out

    hooks = [layer.self_attn.v_proj.register_forward_hook(
        lambda _m, _i, out, i=i: amax.__setitem__((i, 1), max(amax[i, 1], float(out.abs().max()))))
        for i, layer in enumerate(model.model.layers)]
    modeling_llama.apply_rotary_pos_emb = spy
    try:
        with torch.no_grad():
            for ids in prompts:
                calls.clear()
                model(torch.tensor([ids]))
                amax[:, 0] = np.maximum(amax[:, 0], calls)
    finally:
        modeling_llama.apply_rotary_pos_emb = rotate
        for hook in hooks:
            hook.remove()
    return amax


def test_scales_are_vllms_maxima_of_transformers_keys_and_values(loud_model_dir):
    m = load_model(str(loud_model_dir))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 49152, n).tolist() for n in (9, 30)]
    scales = np.array(calculate_kv_scales(m, prompts))
    want = hf_kv_amax(loud_model_dir, prompts) / [200.0, 100.0]
    np.testing.assert_allclose(scales, want, rtol=1e-5)
    assert scales.min() > 448 / 200  # (so these keys and values do pass e4m3's range)


def prompt_logprobs(model, kv_cache_dtype, prompt, calculate=False):
    engine = LLMEngine(EngineConfig(kv_cache_dtype=kv_cache_dtype, attention_backend="xla",
                                    enable_chunked_prefill=True, max_num_batched_tokens=16,
                                    max_model_len=128, num_kv_blocks=16,
                                    enable_prefix_caching=False,
                                    calculate_kv_scales=calculate), model=model)
    engine.add_request("r", {"prompt_token_ids": prompt},
                       SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0))
    while engine.has_unfinished_requests():
        done = [o for o in engine.step() if o.finished]
    entries = done[0].prompt_logprobs[1:]
    return engine, np.array([e[t].logprob for t, e in zip(prompt[1:], entries)])


def test_calibrated_fp8_pages_hold_keys_past_e4m3s_range(loud_model_dir):
    """Every 16-token chunk after the first reads the earlier ones from the fp8 pages."""
    m = load_model(str(loud_model_dir))
    prompt = np.random.default_rng(1).integers(3, 49152, 64).tolist()
    _, exact = prompt_logprobs(m, "auto", prompt)
    engine, calibrated = prompt_logprobs(m, "fp8_e4m3", prompt, calculate=True)
    assert engine.model.config.kv_scales == calculate_kv_scales(m)  # the default prompts
    _, unscaled = prompt_logprobs(m, "fp8_e4m3", prompt)
    calibrated_err = np.abs(calibrated - exact)[15:].max()
    unscaled_err = np.abs(unscaled - exact)[15:].max()
    assert calibrated_err < 0.1 * unscaled_err, (calibrated_err, unscaled_err)
    assert np.isfinite(unscaled).all()  # saturated, never NaN


def test_calculate_kv_scales_is_refused_without_fp8_pages():
    for dtype in ("auto", "int8", "bfloat16"):
        with pytest.raises(ValueError, match=f"calculate_kv_scales sets fp8 pages' scales; "
                                             f"kv_cache_dtype is '{dtype}'"):
            check_options(EngineConfig(kv_cache_dtype=dtype, calculate_kv_scales=True))
