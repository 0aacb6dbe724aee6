"""The engine with the Pallas kernels (interpret mode on the CPU, compiled on a GPU) produces
the same greedy tokens as with the XLA attention path."""
import dataclasses

import numpy as np
import pytest

from paged_jax import LLMEngine, SamplingParams
from paged_jax.block_pool import BlockPool
from paged_jax.config import EngineConfig
from paged_jax.models.loader import load_model


def run_outputs(engine, prompts, max_tokens, logprobs=None):
    """Greedy completions of the prompts, in order; no block left held afterwards."""
    for i, p in enumerate(prompts):
        engine.add_request(str(i), {"prompt_token_ids": p},
                           SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True,
                                          logprobs=logprobs))
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    assert engine.kv.pool.num_free == engine.kv.pool.num_usable
    return [done[str(i)].outputs[0] for i in range(len(prompts))]


def run(engine, prompts, max_tokens):
    return [o.token_ids for o in run_outputs(engine, prompts, max_tokens)]


def test_pallas_backend_gives_the_xla_backends_tokens(make_tiny_llama_dir):
    # head_dim 64 (the kernels' smallest), GQA 4/2, peaked logits for stable greedy choices.
    folder = make_tiny_llama_dir(hidden_size=64, head_dim=64, num_attention_heads=4,
                                 num_key_value_heads=2, initializer_range=0.2)
    model = load_model(str(folder), "float32", with_tokenizer=False)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 256, n).tolist() for n in (1, 5, 16, 17, 30)]
    # Shares the 30-token prompt's first block: a prefix-cache hit in the same step.
    prompts.append(prompts[4][:16] + rng.integers(3, 256, 9).tolist())
    outs = {}
    for backend in ("xla", "pallas"):
        config = EngineConfig(dtype="float32", num_kv_blocks=32, max_model_len=64,
                              max_num_seqs=8, max_num_batched_tokens=64,
                              attention_backend=backend)
        engine = LLMEngine(config, model=model)
        engine.kv.pool = BlockPool(engine.kv.pool.num_blocks, shuffle_seed=3)  # scattered
        decodes_in_prefill, schedule = [], engine.scheduler.schedule

        def recording_schedule(drafts=None, schedule=schedule, seen=decodes_in_prefill):
            batch = schedule(drafts)
            if batch is not None and batch.kind == "prefill":
                seen.append(batch.num_decodes)
            return batch

        engine.scheduler.schedule = recording_schedule
        outs[backend] = run(engine, prompts, 12)
        # The 30-token prompt misses the first step's 64-token budget and joins the others'
        # first decode step with the last prompt, 16 of whose tokens come from the cache:
        # the kernels see decode rows, a prefill and a prefill over a cached prefix at once.
        assert decodes_in_prefill == [0, 4]
        assert engine.kv.cache_stats.hits == 16
    assert outs["pallas"] == outs["xla"]


@pytest.mark.parametrize("kv_cache_dtype", [
    "auto", "int8", pytest.param("fp8_e4m3", marks=pytest.mark.full)])  # (fp8: CI time)
def test_pallas_backend_with_chunked_prefill_gives_the_xla_backends_tokens(make_tiny_llama_dir,
                                                                           kv_cache_dtype):
    """8-bit pages too: int8 rows with their scales, fp8 with per-layer scales other than 1
    (as calculate_kv_scales sets them), read by the ragged and decode kernels."""
    folder = make_tiny_llama_dir(hidden_size=64, head_dim=64, num_attention_heads=4,
                                 num_key_value_heads=2, initializer_range=0.2)
    model = load_model(str(folder), "float32", with_tokenizer=False)
    if kv_cache_dtype.startswith("fp8"):
        model = model.with_config(dataclasses.replace(
            model.config, kv_scales=((0.05, 0.02), (0.03, 0.04))))
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 256, n).tolist() for n in (3, 40)]  # 40 > the 16-token budget
    outs = {}
    for backend in ("xla", "pallas"):
        config = EngineConfig(dtype="float32", num_kv_blocks=32, max_model_len=64,
                              max_num_seqs=4, max_num_batched_tokens=16,
                              enable_chunked_prefill=True, attention_backend=backend,
                              kv_cache_dtype=kv_cache_dtype)
        outs[backend] = run(LLMEngine(config, model=model), prompts, 6)
    assert outs["pallas"] == outs["xla"]



def assert_same_greedy_choices(ref, out, tie: float = 0.05, atol: float = 0.1):
    """Greedy token lists equal up to the first position where the reference itself nearly
    tied (its top two within `tie` nats): there a bfloat16 rounding may pick either, and the
    continuations part. The log-probabilities of the shared tokens agree within `atol`."""
    assert len(ref) == len(out)
    for want, got in zip(ref, out):
        assert len(want.token_ids) == len(got.token_ids)
        for step, (a, b) in enumerate(zip(want.token_ids, got.token_ids)):
            np.testing.assert_allclose(got.logprobs[step][b].logprob,
                                       want.logprobs[step][a].logprob, atol=atol)
            if a != b:
                assert b in want.logprobs[step], (step, a, b)
                gap = want.logprobs[step][a].logprob - want.logprobs[step][b].logprob
                assert gap < tie, f"step {step}: {b} chosen over {a}, {gap:.4f} nats apart"
                break


def test_mosaic_decode_kernel_makes_the_xla_backends_choices(make_tiny_llama_dir, monkeypatch):
    """backend.COMPILED_BACKEND = "mosaic_gpu": the engine's bfloat16 decode steps run the
    Mosaic GPU kernel (compiled on a Hopper GPU, Mosaic's interpreter elsewhere)."""
    import jax

    from pallas_kernels import backend, dispatch

    if jax.default_backend() != "gpu":
        # The interpreter's transposed wgmma operands. Loaded from its file: the name
        # `kernels` is also a package transformers installs, which shadows tests/kernels/.
        import importlib.util
        import pathlib

        path = pathlib.Path(__file__).parent / "kernels" / "mgpu_interpret.py"
        spec = importlib.util.spec_from_file_location("mgpu_interpret", path)
        mgpu_interpret = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mgpu_interpret)
        mgpu_interpret.install()
    folder = make_tiny_llama_dir(hidden_size=64, head_dim=64, num_attention_heads=4,
                                 num_key_value_heads=2, initializer_range=0.2)
    model = load_model(str(folder), "bfloat16", with_tokenizer=False)
    rng = np.random.default_rng(2)
    prompts = [rng.integers(3, 256, n).tolist() for n in (1, 7, 20, 33)]
    calls = []
    real = dispatch.paged_attention_mgpu
    monkeypatch.setattr(dispatch, "paged_attention_mgpu",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(backend, "COMPILED_BACKEND", backend.MOSAIC_GPU)
    outs = {}
    for name in ("xla", "pallas"):
        config = EngineConfig(dtype="bfloat16", num_kv_blocks=32, max_model_len=64,
                              max_num_seqs=4, max_num_batched_tokens=64,
                              attention_backend=name)
        engine = LLMEngine(config, model=model)
        engine.kv.pool = BlockPool(engine.kv.pool.num_blocks, shuffle_seed=5)  # scattered
        outs[name] = run_outputs(engine, prompts, 10, logprobs=2)
    assert calls, "the decode steps did not reach the Mosaic GPU kernel"
    assert_same_greedy_choices(outs["xla"], outs["pallas"])


def test_gemma2_windows_and_soft_caps_through_every_kernel(tmp_path):
    """Gemma 2 (models/gemma.py: a sliding and a full layer, attention and final-logit soft
    caps) through the Pallas kernels (interpret mode) and the CPU kernel: the same tokens and
    logprobs as the XLA path; the window and the caps are in force (the same weights without
    them give other logits). (Large weights: peaked logits, so greedy choices do not flip on
    ulps.)"""
    import dataclasses

    from paged_jax.models.forward import dense_logits
    from test_model_families import make_hf_dir

    folder = make_hf_dir(tmp_path, "Gemma2", hidden_size=64, head_dim=64, num_hidden_layers=2,
                         sliding_window=8, query_pre_attn_scalar=64,
                         layer_types=["sliding_attention", "full_attention"],
                         attn_logit_softcapping=4.0, final_logit_softcapping=20.0,
                         initializer_range=0.3)
    m = load_model(str(folder), "float32", with_tokenizer=False)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 256, n).tolist() for n in (3, 12, 21)]

    def outputs(backend):
        """(tokens, their logprobs) of each prompt."""
        outs = run_outputs(LLMEngine(EngineConfig(
            dtype="float32", num_kv_blocks=32, max_model_len=64, max_num_seqs=4,
            max_num_batched_tokens=64, attention_backend=backend), model=m), prompts, 10,
            logprobs=0)
        return ([o.token_ids for o in outs],
                np.array([[e[t].logprob for t, e in zip(o.token_ids, o.logprobs)]
                          for o in outs]))

    xla = outputs("xla")
    for backend in ("pallas", "cpu"):
        got = outputs(backend)
        assert got[0] == xla[0], backend
        np.testing.assert_allclose(got[1], xla[1], atol=1e-4, err_msg=backend)
    ids = prompts[2]
    logits = dense_logits(m.graphdef, m.params, ids)
    for change in (dict(sliding_window=None), dict(attn_logit_softcapping=None)):
        other = m.with_config(dataclasses.replace(m.config, **change))
        assert np.abs(dense_logits(other.graphdef, other.params, ids) - logits).max() > 1e-3
