"""Qwen2 (q/k/v biases), Qwen3 (per-head q/k RMSNorm), Qwen3-MoE (its experts unnormalized),
Gemma 2 and Gemma 3's text model (models/gemma.py: sliding and full layers, Gemma 2's soft
caps) and Phi-3 (fused qkv and gate_up
projections, a sliding window) against transformers in float32, and through the paged engine
against a dense run; Phi-3's LongRoPE (short and long factors); what is not built yet (Qwen's
per-layer window, partial rotary) refused by name."""
import json

import numpy as np
import pytest

from paged_jax import LLMEngine, SamplingParams
from paged_jax.config import EngineConfig
from paged_jax.models.forward import dense_logits
from paged_jax.models.loader import load_model
from test_mixtral import assert_paged_greedy_equals_dense
from test_model_vs_hf import hf_logits, max_rel_diff


def make_hf_dir(folder, kind: str, **overrides):
    import torch
    import transformers

    config = getattr(transformers, f"{kind}Config")(**{
        **dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
               initializer_range=0.1, rope_theta=10000.0, tie_word_embeddings=False,
               bos_token_id=1, eos_token_id=2, pad_token_id=2),
        **overrides})
    name = kind.removesuffix("Text")  # Gemma3TextConfig goes with Gemma3ForCausalLM
    config.architectures = [f"{name}ForCausalLM"]
    torch.manual_seed(0)
    model = getattr(transformers, f"{name}ForCausalLM")(config).eval()
    with torch.no_grad():  # norms and biases away from their 1 / 0 init, so tests see them
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):  # (Gemma scales by 1 + weight)
                parameter.normal_(0.0 if kind.startswith("Gemma") else 1.0, 0.1)
            if name.endswith(".bias"):
                parameter.normal_(0.0, 0.1)
            if name.endswith("mlp.gate.weight"):  # a router wide enough to spread tokens
                parameter.normal_(0.0, 0.5)
    model.save_pretrained(folder)
    return folder


# head_dim 32 != hidden / heads for Qwen3; a window shorter than the prompts for Phi-3
EXTRA = {"Qwen2": {}, "Qwen3": dict(head_dim=32), "Phi3": dict(sliding_window=24),
         # 4 experts of width 32, 2 a token, probabilities as the router gives them
         "Qwen3Moe": dict(head_dim=16, num_experts=4, num_experts_per_tok=2,
                          moe_intermediate_size=32, norm_topk_prob=False),
         # its shared expert, gated, beside 4 routed ones
         "Qwen2Moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                          shared_expert_intermediate_size=48),
         # sliding and full layers (their own windows and rope thetas), the global ones
         # with linear rope scaling, a query scale of its own, the tied head
         # Gemma 2: caps low enough that tanh bends the random model's scores and logits
         "Gemma2": dict(head_dim=16, num_hidden_layers=3, sliding_window=24,
                        layer_types=["sliding_attention", "full_attention",
                                     "sliding_attention"], query_pre_attn_scalar=24,
                        attn_logit_softcapping=0.5, final_logit_softcapping=0.8),
         "Gemma3Text": dict(head_dim=16, num_hidden_layers=3, sliding_window=24,
                            layer_types=["sliding_attention", "full_attention",
                                         "sliding_attention"], query_pre_attn_scalar=24,
                            tie_word_embeddings=True, rope_parameters={
                                "sliding_attention": {"rope_type": "default",
                                                      "rope_theta": 10000.0},
                                "full_attention": {"rope_type": "linear", "factor": 4.0,
                                                   "rope_theta": 1000000.0}})}


@pytest.fixture(scope="module", params=sorted(EXTRA))
def family_dir(request, tmp_path_factory):
    return make_hf_dir(tmp_path_factory.mktemp(request.param.lower()), request.param,
                       **EXTRA[request.param])


def test_logits_match_transformers(family_dir):
    m = load_model(str(family_dir), with_tokenizer=False)
    kind = json.loads((family_dir / "config.json").read_text())["model_type"]
    assert m.config.attention_bias == kind.startswith("qwen2")
    assert m.config.qk_norm == (kind.startswith("qwen3") or kind == "gemma3_text")
    assert m.config.num_experts == (4 if kind.endswith("_moe") else 0)
    assert m.config.shared_expert_intermediate_size == (48 if kind == "qwen2_moe" else 0)
    assert m.config.sliding_window == (24 if kind in ("phi3", "gemma2", "gemma3_text") else None)
    assert m.config.attn_logit_softcapping == (0.5 if kind == "gemma2" else None)
    ids = np.random.default_rng(0).integers(0, 256, 150).tolist()
    ours = dense_logits(m.graphdef, m.params, ids)
    ref, _ = hf_logits(family_dir, ids)
    assert max_rel_diff(ours, ref) < 1e-4


def test_through_the_paged_engine_equals_transformers_generate(family_dir):
    """Greedy tokens through the paged engine (chunked prefill, 16-token chunks, and prefix
    caching on), three prompts together, equal a dense run's of each alone and
    transformers' generate. (One engine for both references: each build compiles.)"""
    import torch
    import transformers

    from paged_jax.models.forward import dense_greedy

    m = load_model(str(family_dir), with_tokenizer=False)
    engine = LLMEngine(EngineConfig(num_kv_blocks=64, max_model_len=128, max_num_seqs=8,
                                    enable_chunked_prefill=True, max_num_batched_tokens=16),
                       model=m)
    rng = np.random.default_rng(2)
    prompts = {n: rng.integers(3, 256, n).tolist() for n in (1, 17, 40)}
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    for n, prompt in prompts.items():
        engine.add_request(str(n), prompt, params)
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished})
    hf = transformers.AutoModelForCausalLM.from_pretrained(family_dir,
                                                           dtype=torch.float32).eval()
    for n, prompt in prompts.items():
        assert done[str(n)] == dense_greedy(m.graphdef, m.params, prompt, 8), n
        if n > 1:
            with torch.no_grad():
                ref = hf.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8,
                                  do_sample=False)[0, n:].tolist()
            assert done[str(n)] == ref, n


def test_qwens_layer_sliding_window_is_refused_by_name(tmp_path):
    folder = make_hf_dir(tmp_path, "Qwen2", num_hidden_layers=1, use_sliding_window=True,
                           sliding_window=32, max_window_layers=0)
    with pytest.raises(ValueError, match="use_sliding_window"):
        load_model(str(folder), with_tokenizer=False)


@pytest.mark.parametrize("rope, words", [
    (dict(rope_type="default", partial_rotary_factor=0.75), "partial_rotary_factor 0.75")])
def test_phi3s_rope_variants_not_built_are_refused_by_name(tmp_path, rope, words):
    folder = make_hf_dir(tmp_path, "Phi3", num_hidden_layers=1, head_dim=16,
                         rope_parameters={"rope_theta": 10000.0, **rope})
    with pytest.raises(ValueError, match=words):
        load_model(str(folder), with_tokenizer=False)


def test_qwen3_moe_with_dense_layers_is_refused_by_name(tmp_path):
    folder = make_hf_dir(tmp_path, "Qwen3Moe", num_hidden_layers=2, head_dim=16, num_experts=2,
                         num_experts_per_tok=1, moe_intermediate_size=16, mlp_only_layers=[0])
    with pytest.raises(ValueError, match="mlp_only_layers"):
        load_model(str(folder), with_tokenizer=False)


@pytest.mark.parametrize("kind", ["Gemma2"])  # (one family: each compiles its own steps)
def test_float16_through_the_paged_engine_equals_a_float16_dense_run(kind, tmp_path):
    """float16 weights (Gemma's norms computed in float32, its soft caps in float32 logits)
    through the paged engine, chunked and prefix-cached, against the dense run in float16;
    and the float16 logits track float32's."""
    folder = make_hf_dir(tmp_path, kind, **EXTRA[kind])
    m16 = load_model(str(folder), "float16", with_tokenizer=False)
    assert m16.config.dtype == "float16"
    assert m16.params["embed_tokens"][...].dtype.name == "float16"
    ids = np.random.default_rng(0).integers(0, 256, 60).tolist()
    m32 = load_model(str(folder), with_tokenizer=False)
    got = dense_logits(m16.graphdef, m16.params, ids)
    want = dense_logits(m32.graphdef, m32.params, ids)
    assert np.all(np.isfinite(got)) and 0 < np.abs(got - want).max() < 2e-2
    assert_paged_greedy_equals_dense(m16, (5, 30), 8, enable_chunked_prefill=True,
                                     max_num_batched_tokens=16)


def test_phi3_longrope_short_and_long_factors_match_transformers(tmp_path):
    """LongRoPE with an original context of 64 extended to 512: short factors for sequences
    within 64 tokens, long ones (and the attention factor sqrt(1 + ln 8 / ln 64)) past it, as
    transformers picks them; an engine whose max_model_len passes 64 runs the long factors
    for every position (vLLM's rule), and its greedy tokens equal transformers' generate
    from a prompt already past 64."""
    import torch
    import transformers

    rng = np.random.default_rng(4)
    rope = dict(rope_type="longrope", rope_theta=10000.0, original_max_position_embeddings=64,
                short_factor=rng.uniform(1.0, 1.2, 8).tolist(),
                long_factor=rng.uniform(1.0, 8.0, 8).tolist())
    folder = make_hf_dir(tmp_path, "Phi3", head_dim=16, rope_parameters=rope,
                         original_max_position_embeddings=64)
    m = load_model(str(folder), with_tokenizer=False)
    scaling = m.config.rope_scaling_dict
    assert not scaling["long"] and scaling["attention_factor"] == pytest.approx(1.5 ** 0.5)
    long_model = m.with_config(m.config.for_max_model_len(128))
    assert m.config.for_max_model_len(64) is m.config
    for n, model in ((40, m), (100, long_model)):
        ids = rng.integers(0, 256, n).tolist()
        ref, _ = hf_logits(folder, ids)
        assert max_rel_diff(dense_logits(model.graphdef, model.params, ids), ref) < 1e-4, n
    # the other factor set is really different: the short model on the long sequence is not
    assert max_rel_diff(dense_logits(m.graphdef, m.params, ids), ref) > 1e-2

    engine = LLMEngine(EngineConfig(num_kv_blocks=32, max_model_len=128, max_num_seqs=2,
                                    enable_chunked_prefill=True, max_num_batched_tokens=32),
                       model=m)
    assert engine.model.config.rope_scaling_dict["long"]
    prompt = rng.integers(3, 256, 70).tolist()
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8,
                           do_sample=False)[0, 70:].tolist()
    engine.add_request("a", prompt, SamplingParams(temperature=0.0, max_tokens=8,
                                                   ignore_eos=True))
    out = []
    while engine.has_unfinished_requests():
        out += [o for o in engine.step() if o.finished]
    assert out[0].outputs[0].token_ids == want
