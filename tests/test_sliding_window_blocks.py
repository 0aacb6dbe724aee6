"""Sliding-window memory: blocks that every layer's window has passed go back to the pool
(kv_cache_manager.release_outside_window), so a long generation holds at most window + one
block of KV per request; swap, prefix caching and freeing see released entries; the tokens
equal a dense run's."""
import numpy as np
import pytest

from paged_jax import LLMEngine, SamplingParams
from paged_jax.config import EngineConfig
from paged_jax.kv_cache_manager import KVCacheManager
from paged_jax.models.config import ModelConfig
from paged_jax.models.forward import dense_greedy
from paged_jax.models.loader import load_model
from paged_jax.prefix_cache import block_hashes
from paged_jax.server.metrics import ServerMetrics
from test_model_families import make_hf_dir

B, W = 4, 8  # block size, window (the bookkeeping)
EB, EW = 8, 16  # the engine's (its smallest block size)


def test_blocks_wholly_before_the_window_are_released_and_counted():
    kv = KVCacheManager(32, B, sliding_window=W)
    assert kv.allocate("a", 20)  # 5 blocks
    table = list(kv.block_table("a"))
    # The next query at position 10 reads keys 3..10: block 0 (0..3) is still read.
    assert kv.release_outside_window("a", 10) == 0
    # At 11 it reads 4..11: block 0 is dead.
    assert kv.release_outside_window("a", 11) == 1
    assert kv.block_table("a") == [0] + table[1:]
    assert kv.pool.ref_count(table[0]) == 0 and kv.pool.num_used == 4
    assert kv.release_outside_window("a", 11) == 0  # nothing twice
    assert kv.release_outside_window("a", 20) == 2  # keys 13..20: blocks 1 and 2 dead
    assert kv.num_released("a") == 3 and kv.num_released_blocks == 3
    assert kv.tokens_held("a", 20) == 20 - 3 * B
    kv.free("a")  # only the blocks still held go back (a double free would raise)
    assert kv.pool.num_used == 0


def test_no_window_releases_nothing():
    kv = KVCacheManager(32, B)
    assert kv.allocate("a", 40)
    assert kv.release_outside_window("a", 40) == 0 and 0 not in kv.block_table("a")
    with pytest.raises(ValueError, match="sliding_window must be >= 1, got 0"):
        KVCacheManager(32, B, sliding_window=0)


def test_released_blocks_keep_their_prefix_cache_hash():
    kv = KVCacheManager(32, B, enable_caching=True, sliding_window=W)
    tokens = list(np.random.default_rng(0).integers(0, 100, 17))
    assert kv.allocate("a", 17)
    kv.cache_blocks("a", tokens)
    first = kv.block_table("a")[0]
    assert kv.release_outside_window("a", 16) == 2
    # The released block is free but cached: a new request with the same prompt hits it.
    hit = kv.find_cached(tokens)
    assert hit.blocks[0] == first and len(hit.blocks) == 4
    assert kv.allocate("b", 17, hit) and kv.pool.ref_count(first) == 1
    assert block_hashes(tokens, B, limit=4) == list(hit.hashes)


def test_swap_keeps_released_entries_released():
    kv = KVCacheManager(32, B, num_cpu_blocks=8, sliding_window=W)
    assert kv.allocate("a", 24)  # 6 blocks
    assert kv.release_outside_window("a", 21) == 3  # keys 14..21 read: blocks 0-2 dead
    held = kv.block_table("a")[3:]
    copies = kv.swap_out("a", 21)
    assert [d for d, _ in copies] == held  # only the held blocks travel
    assert kv.host_blocks("a")[:3] == [0, 0, 0] and kv.num_swapped_blocks() == 3
    back = kv.swap_in("a", 22)
    assert [h for h, _ in back] == [h for _, h in copies]
    table = kv.block_table("a")
    assert table[:3] == [0, 0, 0] and [d for _, d in back] == table[3:]
    assert kv.num_released("a") == 3 and kv.pool.num_used == 3
    assert kv.num_swapped_blocks() == 0
    kv.free("a")
    assert kv.pool.num_used == 0


def test_only_models_whose_every_layer_has_a_window_release_blocks():
    base = dict(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=2, num_heads=1,
                num_kv_heads=1, head_dim=8, sliding_window=W)
    assert ModelConfig(**base).kv_window == W  # Mistral, Phi-3: every layer
    mixed = ("sliding_attention", "full_attention")
    assert ModelConfig(**base, layer_types=mixed).kv_window is None  # Gemma: global layers
    assert ModelConfig(**base, layer_types=("sliding_attention",) * 2).kv_window == W
    assert ModelConfig(**{**base, "sliding_window": None}).kv_window is None


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    folder = make_hf_dir(tmp_path_factory.mktemp("mistral"), "Mistral", sliding_window=EW,
                         head_dim=16)
    return load_model(str(folder), with_tokenizer=False)


@pytest.mark.parametrize("chunked", [pytest.param(False, marks=pytest.mark.full), True])
def test_a_generation_ten_windows_long_holds_a_window_of_kv(mistral, chunked):
    """Two requests generate 10 windows each: each holds at most window + one block at every
    step, nothing is preempted, and the tokens equal the dense run's. With chunked prefill
    the pool is smaller than one request's length (what lets it in: blocks come back as it
    goes); without, a prompt must fit whole, so the pool holds the full length."""
    assert mistral.config.kv_window == EW
    max_tokens = 10 * EW
    engine = LLMEngine(EngineConfig(
        num_kv_blocks=1 + 2 * (EW // EB + 1) + 2 if chunked else 1 + 24, block_size=EB, max_model_len=192,
        max_num_seqs=2, enable_chunked_prefill=chunked, max_num_batched_tokens=192,
        enable_prefix_caching=True), model=mistral)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 256, n).tolist() for n in (6, EW)]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    done, most = {}, 0
    metrics = ServerMetrics("m")
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step() if o.finished})
        snap = engine.snapshot(with_requests=True)
        metrics.update(snap)
        assert snap.kv.used_blocks <= snap.num_running * (EW // EB + 1)
        for r in snap.requests:
            held = sum(1 for b in r.block_table if b)
            most = max(most, held)
            assert held <= EW // EB + 1, (r.request_id, r.num_computed_tokens, r.block_table)
        assert snap.kv.token_states <= snap.kv.token_slots
    snap = engine.snapshot()
    assert snap.num_preemptions == 0 and most == EW // EB + 1
    assert snap.window_released_blocks >= 2 * (max_tokens // EB - EW // EB - 1)
    assert snap.kv.used_blocks == 0
    assert metrics.registry.get_sample_value("paged_jax:kv_blocks_released_by_window_total",
                                             {"model_name": "m"}) == snap.window_released_blocks
    if not chunked:
        with pytest.raises(ValueError, match="needs up to 176 tokens"):
            LLMEngine(EngineConfig(num_kv_blocks=9, block_size=EB, max_model_len=192,
                                   max_num_batched_tokens=192), model=mistral).add_request(
                "x", prompts[1], params)
    for i, p in enumerate(prompts):
        assert done[str(i)].outputs[0].token_ids == dense(mistral, tuple(p), max_tokens)


_DENSE: dict = {}  # (prompt, max_tokens) -> tokens: both variants check the same runs


def dense(m, prompt, max_tokens):
    if (prompt, max_tokens) not in _DENSE:
        _DENSE[prompt, max_tokens] = dense_greedy(m.graphdef, m.params, list(prompt), max_tokens)
    return _DENSE[prompt, max_tokens]
