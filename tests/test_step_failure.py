"""A step that fails fails only the requests it held: their blocks are freed, the others go
on to the outputs they would have had, and later requests run. Values the device arrays
cannot hold are refused at add_request, alone."""
import numpy as np
import pytest

from paged_jax import LLM, SamplingParams
from paged_jax import engine as engine_module
from paged_jax.engine import EngineBrokenError, StepError

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
POISON_SEED = 666  # a request with this seed makes the step that holds it raise


@pytest.fixture(scope="module")
def tiny_dir(make_tiny_llama_dir):
    return make_tiny_llama_dir(tokenizer=True, initializer_range=0.2)


@pytest.fixture(scope="module")
def llm(tiny_dir):
    return LLM(str(tiny_dir), num_kv_blocks=64, max_model_len=128, max_num_seqs=8)


@pytest.fixture
def poisoned(monkeypatch):
    """Steps holding a POISON_SEED request raise in the host's input building, as an
    OverflowError from a value no check caught would."""
    real = engine_module.step_inputs.build

    def build(batch, *args, **kwargs):
        if any(r.params.seed == POISON_SEED for r in batch.requests):
            raise OverflowError("Python int too large to convert to C long")
        return real(batch, *args, **kwargs)
    monkeypatch.setattr(engine_module.step_inputs, "build", build)


def prompts(n, seed):
    rng = np.random.default_rng(seed)
    return [{"prompt_token_ids": rng.integers(3, 49152, int(rng.integers(5, 30))).tolist()}
            for _ in range(n)]


def run(engine, done):
    errors = []
    while engine.has_unfinished_requests():
        try:
            done.update({o.request_id: o for o in engine.step() if o.finished})
        except StepError as err:
            errors.append(err)
    return errors


def test_a_failed_step_fails_its_requests_and_the_others_go_on(tiny_dir, poisoned):
    # Prefill-first steps: the poisoned prompt's prefill step holds no decoding request.
    llm = LLM(str(tiny_dir), num_kv_blocks=64, max_model_len=128, max_num_seqs=8,
              mixed_batches=False)
    engine = llm.llm_engine
    good, late = prompts(2, 1), prompts(1, 2)[0]
    want = [o.outputs[0].token_ids for o in llm.generate(good + [late], GREEDY,
                                                         use_tqdm=False)]
    engine.add_request("a", good[0], GREEDY)
    engine.add_request("b", good[1], GREEDY)
    engine.step()  # both prefilled; from here on they decode
    engine.add_request("poisoned", prompts(1, 3)[0],
                       SamplingParams(temperature=0.5, seed=POISON_SEED, max_tokens=12))
    done = {}
    errors = run(engine, done)
    assert [e.request_ids for e in errors] == [["poisoned"]]
    assert isinstance(errors[0].cause, OverflowError)
    assert "OverflowError" in str(errors[0])
    assert sorted(done) == ["a", "b"]
    assert [done["a"].outputs[0].token_ids, done["b"].outputs[0].token_ids] == want[:2]
    assert engine.stats.finished["error"] == 1
    assert engine.kv.pool.num_free == engine.kv.pool.num_usable  # nothing leaked
    # The engine serves on.
    engine.add_request("late", late, GREEDY)
    done = {}
    assert run(engine, done) == [] and done["late"].outputs[0].token_ids == want[2]


def test_a_failed_mixed_step_fails_every_request_it_held(llm, poisoned):
    engine = llm.llm_engine
    engine.add_request("a", prompts(1, 4)[0], GREEDY)
    engine.step()
    engine.add_request("poisoned", prompts(1, 5)[0],
                       SamplingParams(temperature=0.5, seed=POISON_SEED))
    with pytest.raises(StepError) as info:
        engine.step()  # "a" decodes in the same step as the poisoned prefill
    assert sorted(info.value.request_ids) == ["a", "poisoned"]
    assert not engine.has_unfinished_requests()
    assert engine.kv.pool.num_free == engine.kv.pool.num_usable


def test_a_step_that_loses_the_kv_cache_breaks_the_engine(llm, poisoned, monkeypatch):
    engine = llm.llm_engine
    monkeypatch.setattr(engine.runner, "caches_alive", lambda: False)
    engine.add_request("poisoned", prompts(1, 6)[0],
                       SamplingParams(temperature=0.5, seed=POISON_SEED))
    with pytest.raises(EngineBrokenError, match="KV cache was lost"):
        engine.step()


def test_caches_alive_sees_donated_caches(tiny_dir):
    llm = LLM(str(tiny_dir), num_kv_blocks=16, max_model_len=64, max_num_seqs=2)
    runner = llm.llm_engine.runner
    assert runner.caches_alive()
    for leaf in __import__("jax").tree.leaves(runner.kv_caches):
        leaf.delete()
    assert not runner.caches_alive()


def test_top_k_at_or_past_the_vocabulary_keeps_every_token(llm):
    """As in vLLM: no limit, the same draws as top_k=-1 (only int32 overflow is refused)."""
    def sample(**kw):
        params = SamplingParams(temperature=0.8, seed=3, max_tokens=8, ignore_eos=True, **kw)
        return llm.generate(prompts(1, 7), params, use_tqdm=False)[0].outputs[0].token_ids

    assert sample(top_k=49152) == sample(top_k=10**9) == sample(top_k=2**31 - 1) == sample()
    with pytest.raises(ValueError, match="top_k must be -1 .* got 2147483648"):
        SamplingParams(top_k=2**31)


def test_the_device_probe_refuses_what_no_named_check_caught(llm, monkeypatch):

    def build_inputs(reqs, *args, **kwargs):
        raise OverflowError("too large")
    monkeypatch.setattr(engine_module.sampler, "build_inputs", build_inputs)
    with pytest.raises(ValueError, match="cannot be put on the device: OverflowError"):
        llm.llm_engine.add_request("x", prompts(1, 9)[0], GREEDY)
    assert not llm.llm_engine.has_unfinished_requests()


def test_a_failed_step_that_swaps_fails_its_requests_and_frees_both_pools(tiny_dir,
                                                                         monkeypatch):
    # 12 usable blocks for 4 requests of up to 60 tokens: decodes preempt by swap.
    llm = LLM(str(tiny_dir), num_kv_blocks=13, max_model_len=128, max_num_seqs=4,
              preemption_mode="swap", num_cpu_blocks=64)
    engine = llm.llm_engine
    real = engine_module.step_inputs.build
    failed_swaps = []

    def build(batch, *args, **kwargs):
        if batch.swap_out and not failed_swaps:
            failed_swaps.append([r.request_id for r in batch.preempted])
            raise OverflowError("the first step that swaps out fails")
        return real(batch, *args, **kwargs)
    monkeypatch.setattr(engine_module.step_inputs, "build", build)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    for i, prompt in enumerate(prompts(4, 10)):
        engine.add_request(f"r{i}", prompt, params)
    done = {}
    errors = run(engine, done)
    assert failed_swaps and failed_swaps[0], "no step swapped out"
    assert len(errors) == 1
    assert set(failed_swaps[0]) <= set(errors[0].request_ids)
    assert sorted(done) == sorted({f"r{i}" for i in range(4)} - set(errors[0].request_ids))
    assert engine.kv.pool.num_free == engine.kv.pool.num_usable
    assert engine.kv.cpu_pool.usage() == 0


def test_a_failed_step_fails_all_n_samples_of_a_request(llm, poisoned):
    engine = llm.llm_engine
    engine.add_request("many", prompts(1, 11)[0],
                       SamplingParams(n=3, temperature=0.5, seed=POISON_SEED))
    with pytest.raises(StepError) as info:
        engine.step()
    assert info.value.request_ids == ["many"]
    assert not engine.has_unfinished_requests()
    assert engine.kv.pool.num_free == engine.kv.pool.num_usable
