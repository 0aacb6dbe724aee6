"""Our forward equals transformers' (PyTorch, float32, CPU) on the same weights."""
import numpy as np
import pytest

from paged_jax.models.forward import dense_greedy, dense_logits
from paged_jax.models.loader import load_model

CONFIGS = {
    "mha-untied": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa-tied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "mqa": dict(num_attention_heads=4, num_key_value_heads=1),
    "gqa-head80-llama3": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=80,
                              rope_scaling="llama3"),
    "linear-rope-theta": dict(num_attention_heads=2, num_key_value_heads=1,
                              rope_scaling="linear", rope_theta=500000.0),
}


def hf_logits(folder, ids):
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy(), model


def max_rel_diff(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_tiny_llama_logits_match_transformers(make_tiny_llama_dir, name):
    folder = make_tiny_llama_dir(initializer_range=0.1, max_position_embeddings=512,
                                 **CONFIGS[name])
    m = load_model(str(folder), with_tokenizer=False)
    ids = np.random.default_rng(0).integers(0, 256, 300).tolist()  # past the llama3 wavelength
    ours = dense_logits(m.graphdef, m.params, ids)
    ref, _ = hf_logits(folder, ids)
    assert max_rel_diff(ours, ref) < 1e-4


@pytest.mark.parametrize("dtype, tolerance", [("bfloat16", 5e-2), ("float16", 5e-3)])
def test_half_precision_weights_load_and_track_float32(make_tiny_llama_dir, dtype, tolerance):
    """Saved in the half dtype, loaded in float32 and in it: the logits agree to the half
    dtype's precision (float16 keeps 3 more mantissa bits than bfloat16)."""
    folder = make_tiny_llama_dir(initializer_range=0.1, dtype=dtype)
    m32 = load_model(str(folder), "float32", with_tokenizer=False)
    m16 = load_model(str(folder), dtype, with_tokenizer=False)
    ids = np.random.default_rng(1).integers(0, 256, 40).tolist()
    a, b = dense_logits(m32.graphdef, m32.params, ids), dense_logits(m16.graphdef, m16.params, ids)
    assert m16.params["embed_tokens"][...].dtype.name == dtype
    assert 0 < max_rel_diff(b, a) < tolerance


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return load_model(str(smollm2_dir))


def test_smollm2_logits_match_transformers(smollm2, smollm2_dir):
    ids = smollm2.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 4)
    ours = dense_logits(smollm2.graphdef, smollm2.params, ids)
    ref, _ = hf_logits(smollm2_dir, ids)
    assert max_rel_diff(ours, ref) < 1e-4


@pytest.fixture(scope="module")
def smollm2_greedy_refs(smollm2, smollm2_dir):
    """Prompts and transformers' greedy 32-token continuations of them."""
    import torch
    import transformers

    from paged_jax.tokenizer import apply_chat_template

    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir,
                                                           dtype=torch.float32).eval()
    tok = smollm2.tokenizer
    prompts = [apply_chat_template(tok, [{"role": "user", "content": q}]) for q in
               ("What is the capital of France?", "Name three colors.")]
    prompts.append(tok.encode("Once upon a time, in a small village,"))
    refs = []
    for ids in prompts:
        with torch.no_grad():
            refs.append(hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                                    eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist())
    return prompts, refs


def test_smollm2_greedy_32_tokens_match_transformers_generate(smollm2, smollm2_greedy_refs):
    for ids, ref in zip(*smollm2_greedy_refs):
        assert dense_greedy(smollm2.graphdef, smollm2.params, ids, 32) == ref


def test_paged_engine_on_smollm2_matches_transformers(smollm2, smollm2_greedy_refs):
    from paged_jax import LLMEngine, SamplingParams
    from paged_jax.config import EngineConfig

    engine = LLMEngine(EngineConfig(num_kv_blocks=64, max_model_len=128, max_num_seqs=4,
                                    max_num_batched_tokens=128), model=smollm2)
    prompts, refs = smollm2_greedy_refs
    for i, ids in enumerate(prompts):
        engine.add_request(str(i), {"prompt_token_ids": ids},
                           SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    assert [done[str(i)].outputs[0].token_ids for i in range(len(prompts))] == refs
