"""Qwen2 (q/k/v biases) and Qwen3 (per-head q/k RMSNorm) against transformers in float32, and
through the paged engine against a dense run; Qwen's per-layer sliding window refused by
name."""
import json

import numpy as np
import pytest

from paged_jax.models.forward import dense_logits
from paged_jax.models.loader import load_model
from test_mixtral import assert_paged_greedy_equals_dense
from test_model_vs_hf import hf_logits, max_rel_diff


def make_qwen_dir(folder, kind: str, **overrides):
    import torch
    import transformers

    config = getattr(transformers, f"{kind}Config")(**{
        **dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
               initializer_range=0.1, rope_theta=10000.0, tie_word_embeddings=False,
               bos_token_id=1, eos_token_id=2),
        **overrides})
    config.architectures = [f"{kind}ForCausalLM"]
    torch.manual_seed(0)
    model = getattr(transformers, f"{kind}ForCausalLM")(config).eval()
    with torch.no_grad():  # norms and biases away from their 1 / 0 init, so tests see them
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.normal_(1.0, 0.1)
            if name.endswith(".bias"):
                parameter.normal_(0.0, 0.1)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=["Qwen2", "Qwen3"])
def qwen_dir(request, tmp_path_factory):
    extra = dict(head_dim=32) if request.param == "Qwen3" else {}  # != hidden / heads
    return make_qwen_dir(tmp_path_factory.mktemp(request.param.lower()), request.param, **extra)


def test_qwen_logits_match_transformers(qwen_dir):
    m = load_model(str(qwen_dir), with_tokenizer=False)
    kind = json.loads((qwen_dir / "config.json").read_text())["model_type"]
    assert m.config.attention_bias == (kind == "qwen2") and m.config.qk_norm == (kind == "qwen3")
    ids = np.random.default_rng(0).integers(0, 256, 150).tolist()
    ours = dense_logits(m.graphdef, m.params, ids)
    ref, _ = hf_logits(qwen_dir, ids)
    assert max_rel_diff(ours, ref) < 1e-4


def test_qwen_through_the_paged_engine_equals_dense(qwen_dir):
    m = load_model(str(qwen_dir), with_tokenizer=False)
    assert_paged_greedy_equals_dense(m, (1, 17, 40), 10)


def test_qwens_layer_sliding_window_is_refused_by_name(tmp_path):
    folder = make_qwen_dir(tmp_path, "Qwen2", num_hidden_layers=1, use_sliding_window=True,
                           sliding_window=32, max_window_layers=0)
    with pytest.raises(ValueError, match="use_sliding_window"):
        load_model(str(folder), with_tokenizer=False)
