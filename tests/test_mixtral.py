"""Mixtral (sparse mixture of experts) against transformers in float32, and through the paged
engine against a dense run."""
import numpy as np
import pytest

from paged_jax import LLMEngine, SamplingParams
from paged_jax.config import EngineConfig
from paged_jax.models.config import ModelConfig
from paged_jax.models.forward import dense_greedy, dense_logits
from paged_jax.models.loader import load_model
from test_model_vs_hf import hf_logits, max_rel_diff


@pytest.fixture(scope="module")
def tiny_mixtral_dir(make_tiny_llama_dir):
    return make_tiny_llama_dir(num_local_experts=4, num_experts_per_tok=2, intermediate_size=48,
                               initializer_range=0.1)


def test_mixtral_logits_match_transformers(tiny_mixtral_dir):
    m = load_model(str(tiny_mixtral_dir), with_tokenizer=False)
    assert (m.config.num_experts, m.config.num_experts_per_tok) == (4, 2)
    ids = np.random.default_rng(0).integers(0, 256, 200).tolist()
    ours = dense_logits(m.graphdef, m.params, ids)
    ref, hf = hf_logits(tiny_mixtral_dir, ids)
    assert max_rel_diff(ours, ref) < 1e-4
    # The router really spreads tokens over the experts (checked on the embeddings).
    import torch

    with torch.no_grad():
        hidden = hf.model.embed_tokens(torch.tensor(ids))
        hidden = hf.model.layers[0].post_attention_layernorm(hidden)
        _, _, chosen = hf.model.layers[0].mlp.gate(hidden)  # transformers 5 names it mlp
    assert len(set(chosen.flatten().tolist())) == 4


@pytest.mark.parametrize("backend", ["auto", "xla"])
def test_mixtral_through_the_paged_engine_equals_dense(tiny_mixtral_dir, backend):
    m = load_model(str(tiny_mixtral_dir), with_tokenizer=False)
    assert_paged_greedy_equals_dense(m, (1, 9, 16, 33, 50), 12, attention_backend=backend)


def assert_paged_greedy_equals_dense(m, prompt_lens, max_tokens: int, **options) -> None:
    """Random prompts of these lengths, run together through a paged engine on model m,
    decode greedily what a dense run of each alone decodes."""
    engine = LLMEngine(EngineConfig(num_kv_blocks=64, max_model_len=128, max_num_seqs=8,
                                    **options), model=m)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 256, int(n)).tolist() for n in prompt_lens]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    for i, p in enumerate(prompts):
        assert done[str(i)].outputs[0].token_ids == dense_greedy(m.graphdef, m.params, p,
                                                                 max_tokens)


def test_mixtral_config_is_checked():
    with pytest.raises(ValueError, match="num_experts_per_tok 3 must be in"):
        ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1,
                    num_heads=1, num_kv_heads=1, head_dim=8, num_experts=2,
                    num_experts_per_tok=3)


def test_a_missing_expert_tensor_is_named(tiny_mixtral_dir):
    from paged_jax import weights
    from paged_jax.models.params import load_params

    m = load_model(str(tiny_mixtral_dir), with_tokenizer=False)
    tensors = dict(weights.read_safetensors(tiny_mixtral_dir))
    name = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    del tensors[name]
    with pytest.raises(ValueError, match=f"checkpoint is missing tensor '{name}'"):
        load_params(m.config, tensors)
    tensors[name] = np.zeros((3, 3), np.float32)
    with pytest.raises(ValueError, match=r"experts.3.w2.weight' has shape \(3, 3\), "
                                         r"expected \(64, 48\)"):
        load_params(m.config, tensors)


def test_unsupported_activations_and_moe_ggufs_are_refused(tiny_mixtral_dir):
    from paged_jax import weights
    from paged_jax.checkpoint.gguf_convert import gguf_config_dict

    hf = weights.load_hf_config(tiny_mixtral_dir)
    hf.hidden_act = "gelu"
    with pytest.raises(ValueError, match="hidden_act 'gelu' is not supported"):
        ModelConfig.from_hf(hf)
    with pytest.raises(ValueError, match="mixture-of-experts GGUF \\(8 experts\\)"):
        gguf_config_dict({"general.architecture": "llama", "llama.expert_count": 8}, [])


def test_bfloat16_mixtral_tracks_transformers_float32(tiny_mixtral_dir):
    m16 = load_model(str(tiny_mixtral_dir), "bfloat16", with_tokenizer=False)
    ids = np.random.default_rng(2).integers(0, 256, 60).tolist()
    ours = dense_logits(m16.graphdef, m16.params, ids)
    ref, _ = hf_logits(tiny_mixtral_dir, ids)
    assert m16.params["layers"][0]["block_sparse_moe"]["w1"][...].dtype.name == "bfloat16"
    assert max_rel_diff(ours, ref) < 5e-2  # the bound the Llama bfloat16 test uses


def test_fused_expert_checkpoints_load_the_same(tiny_mixtral_dir, tmp_path):
    """transformers 5's save_original_format=False layout: gate_up_proj / down_proj stacks."""
    import torch
    import transformers
    from flax import nnx

    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_mixtral_dir,
                                                           dtype=torch.float32)
    hf.save_pretrained(tmp_path, save_original_format=False)
    from paged_jax import weights

    assert any("gate_up_proj" in n for n in weights.read_safetensors(tmp_path))
    fused = load_model(str(tmp_path), with_tokenizer=False)
    legacy = load_model(str(tiny_mixtral_dir), with_tokenizer=False)
    a = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(fused.params)}
    b = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(legacy.params)}
    assert a.keys() == b.keys() and all(np.array_equal(a[p], b[p]) for p in b)
