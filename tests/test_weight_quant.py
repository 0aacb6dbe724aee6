"""Weight-only quantization (`quantization`, models/quant.py): the quantizer's error bounds;
every family's logits with int8 (and fp8) weights against transformers in float32 whose
projections went through the same quantization, written here in numpy on the Hugging Face
tensors; the paged engine against a dense run; fp8 refused by name on the CPU."""
import ml_dtypes
import numpy as np
import pytest

from paged_jax import LLMEngine
from paged_jax.config import EngineConfig
from paged_jax.models import quant as wq
from paged_jax.models.config import WeightQuant
from paged_jax.models.forward import dense_logits
from paged_jax.models.loader import load_model
from test_mixtral import assert_paged_greedy_equals_dense
from test_model_families import EXTRA, make_hf_dir
from test_model_vs_hf import max_rel_diff

LEVELS = {"int8": 127.0, "fp8": 448.0}


def test_quantizer_error_bounds_and_products():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((96, 40)) * rng.uniform(0.01, 3, (1, 40))).astype(np.float32)
    w[:, 7] = 0  # an all-zero output channel stays zero
    x = rng.standard_normal((5, 96)).astype(np.float32)
    for quant in (WeightQuant("int8"), WeightQuant("int8", 32), WeightQuant("fp8")):
        values, scale = wq.quantize(w, quant)
        groups = 1 if not quant.group else 96 // quant.group
        assert values.shape == w.shape and scale.shape == (groups, 40)
        back = np.asarray(wq.dequantize(values, scale))
        assert np.all(back[:, 7] == 0) and np.all(scale[:, 7] == 0)
        amax = np.abs(w.reshape(groups, -1, 40)).max(1, keepdims=True)
        err = np.abs(back - w).reshape(groups, -1, 40)
        if quant.kind == "int8":
            assert values.dtype == np.int8
            assert np.all(err <= amax / 254 * 1.0001) and err.max() > 0  # half a step
        else:
            assert values.dtype == ml_dtypes.float8_e4m3fn
            big = np.abs(w.reshape(groups, -1, 40)) > amax / 64  # normal numbers of e4m3
            assert np.all(err[big] <= np.abs(w.reshape(groups, -1, 40))[big] / 16 * 1.0001)
        # fp8 is W8A8: each row of x goes through e4m3 with its own scale as well
        xq = fake_quantized(x, "fp8") if quant.kind == "fp8" else x
        np.testing.assert_allclose(np.asarray(wq.matmul(x, values, scale)), xq @ back,
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="divisible by 32, got 40"):
        wq.quantize(w.T, WeightQuant("int8", 32))


def fake_quantized(weight: np.ndarray, kind: str) -> np.ndarray:
    """A Hugging Face weight [..., out, in] through symmetric quantization with one scale per
    output channel (its last axis)."""
    scale = np.abs(weight).max(-1, keepdims=True) / LEVELS[kind]
    safe = np.where(scale > 0, scale, 1)
    if kind == "int8":
        return np.clip(np.rint(weight / safe), -127, 127) * scale
    return (weight / safe).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * scale


def is_projection(name: str) -> bool:
    # attention and MLP projections and the experts; not the router, the shared-expert gate,
    # embeddings, the LM head or norms
    return name.endswith("_proj.weight") or (".experts." in name and "bias" not in name)


def hf_quantized_logits(folder, ids, kind):
    """transformers' logits with the projections' weights quantized; for fp8 (W8A8) also
    their inputs, each token's row with its own scale."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder,
                                                              dtype=torch.float32).eval()
    with torch.no_grad():
        touched = 0
        for name, parameter in model.named_parameters():
            if is_projection(name):
                parameter.copy_(torch.tensor(fake_quantized(parameter.numpy(), kind)))
                touched += 1
        assert touched
        if kind == "fp8":
            for name, module in model.named_modules():
                if name.endswith("_proj"):
                    module.register_forward_pre_hook(lambda _m, args: (torch.tensor(
                        fake_quantized(args[0].numpy(), "fp8")),))
        return model(torch.tensor([ids])).logits[0].numpy()


# Each module path once: Llama's, fused projections (Phi-3), experts with a shared expert
# (Qwen2-MoE), Gemma's; the rest of the families in the full tier.
CI_FAMILIES = ("Llama", "Phi3", "Qwen2Moe", "Gemma2")


@pytest.mark.parametrize("kind, family", [
    *[("int8", f) for f in CI_FAMILIES],
    *[pytest.param("int8", f, marks=pytest.mark.full) for f in sorted(EXTRA)
      if f not in CI_FAMILIES],
    ("fp8", "Llama")])  # (its logic on the CPU; the engine refuses it here)
def test_logits_match_transformers_with_the_same_quantization(tmp_path, kind, family):
    folder = make_hf_dir(tmp_path, family, **EXTRA.get(family, {}))
    m = load_model(str(folder), with_tokenizer=False, quantization=kind)
    assert m.config.weight_quant == WeightQuant(kind)
    ids = np.random.default_rng(0).integers(0, 256, 30).tolist()
    ours = dense_logits(m.graphdef, m.params, ids)
    assert max_rel_diff(ours, hf_quantized_logits(folder, ids, kind)) < 1e-4
    full = dense_logits(*(lambda f: (f.graphdef, f.params))(
        load_model(str(folder), with_tokenizer=False)), ids)
    assert max_rel_diff(ours, full) > 1e-4  # the quantization is in force


def test_paged_engine_with_int8_weights_equals_a_dense_run(tmp_path):
    m = load_model(str(make_hf_dir(tmp_path, "Llama")), with_tokenizer=False,
                   quantization="int8")
    assert_paged_greedy_equals_dense(m, [5, 17, 33], 6)


def test_fp8_weights_are_refused_by_name_on_the_cpu(tmp_path):
    folder = make_hf_dir(tmp_path, "Llama", num_hidden_layers=1)
    with pytest.raises(ValueError, match="quantization 'fp8' needs a GPU with fp8 matmuls.*"
                                         "this is cpu"):
        LLMEngine(EngineConfig(model=str(folder), quantization="fp8"))
    with pytest.raises(ValueError, match="quantization must be one of int8, fp8.*'int4'"):
        EngineConfig(quantization="int4")
