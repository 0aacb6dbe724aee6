"""Chunked prefill: prompts longer than a step's token budget are computed over several steps
beside the decodes, and every output equals a dense run's."""
import pytest

from paged_jax import SamplingParams
from paged_jax.block_pool import BlockPool
from paged_jax.config import EngineConfig
from test_engine import GREEDY, dense, make_llm, random_prompts, tiny_dir  # noqa: F401
from test_prefix_caching import shared_prefix_prompts


@pytest.mark.parametrize("backend", ["auto", "xla"])
def test_chunked_prompts_equal_dense(tiny_dir, backend):
    llm = make_llm(tiny_dir, attention_backend=backend, enable_chunked_prefill=True,
                   max_num_batched_tokens=24)
    engine = llm.llm_engine
    engine.kv.pool = BlockPool(engine.kv.pool.num_blocks, shuffle_seed=9)
    # Prompts of 1 to 59 tokens against a 24-token budget, and two sharing a 40-token stem
    # (a chunk that starts from a prefix-cache hit).
    prompts = random_prompts(6, 21, 1, 60) + shared_prefix_prompts(2, 40, seed=4)
    sizes, schedule = [], engine.scheduler.schedule

    def recording_schedule(drafts=None):
        batch = schedule(drafts)
        if batch is not None:
            sizes.append(batch.num_tokens)
        return batch

    engine.scheduler.schedule = recording_schedule
    chunks, done = 0, {}
    for i, prompt in enumerate(prompts):  # one arrival a step, while others decode
        engine.add_request(str(i), prompt, GREEDY)
        for out in engine.step():
            done[out.request_id] = out
        chunks += sum(r.num_computed_tokens < r.num_tokens - 1 for r in engine.scheduler.running)
    while engine.has_unfinished_requests():
        for out in engine.step():
            done[out.request_id] = out
        chunks += sum(r.num_computed_tokens < r.num_tokens - 1 for r in engine.scheduler.running)
    assert chunks > 0  # some prompt really was left part-way through a step
    assert max(sizes) == 24  # chunks fill the budget, never more
    for i, prompt in enumerate(prompts):
        assert done[str(i)].outputs[0].token_ids == dense(llm, prompt, 20), i
    assert done["7"].num_cached_tokens == 32
    assert engine.stats.prompt_tokens == sum(len(p["prompt_token_ids"]) for p in prompts)
    assert engine.stats.generation_tokens == 20 * len(prompts)  # chunks sample nothing
    assert engine.kv.pool.num_free == engine.kv.pool.num_usable


def test_a_chunked_prompt_yields_no_output_until_its_last_chunk(tiny_dir):
    llm = make_llm(tiny_dir, enable_chunked_prefill=True, max_num_batched_tokens=16)
    engine = llm.llm_engine
    engine.add_request("long", random_prompts(1, 5, 50, 51)[0],
                       SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    outputs = [engine.step() for _ in range(4)]  # 50 tokens in chunks of 16, 16, 16, 2
    assert [len(o) for o in outputs] == [0, 0, 0, 1]
    assert len(outputs[3][0].outputs[0].token_ids) == 1


def test_chunked_prefill_options_are_checked():
    from paged_jax.plan import check_options

    with pytest.raises(ValueError, match="needs mixed_batches"):
        check_options(EngineConfig(enable_chunked_prefill=True, mixed_batches=False))
    with pytest.raises(ValueError, match="max_num_batched_tokens 64 is below max_model_len 128"):
        check_options(EngineConfig(max_num_batched_tokens=64, max_model_len=128))
    check_options(EngineConfig(max_num_batched_tokens=64, max_model_len=128,
                               enable_chunked_prefill=True))


def test_chunked_prompts_under_block_pressure_equal_dense(tiny_dir):
    """A pool far smaller than the prompts' total: a prompt part-way through holds the blocks
    of its chunks so far (not its whole prompt), chunks are cut to the free blocks, requests
    are preempted, and every output still equals a dense run's."""
    llm = make_llm(tiny_dir, enable_chunked_prefill=True, max_num_batched_tokens=24,
                   num_kv_blocks=13, max_num_seqs=8)
    engine = llm.llm_engine
    engine.kv.pool = BlockPool(engine.kv.pool.num_blocks, shuffle_seed=3)
    block = engine.kv.block_size
    prompts = random_prompts(6, 33, 30, 60)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, GREEDY)
    done, holds_part = {}, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            done[out.request_id] = out
        holds_part += sum(
            r.num_computed_tokens < r.num_tokens - 1
            and len(engine.kv.block_table(r.request_id)) < -(-r.num_tokens // block)
            for r in engine.scheduler.running)
    assert holds_part > 0 and engine.scheduler.num_preemptions > 0
    for i, prompt in enumerate(prompts):
        assert done[str(i)].outputs[0].token_ids == dense(llm, prompt, 20), i
    assert engine.kv.pool.num_free == engine.kv.pool.num_usable
