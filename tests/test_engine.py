"""The paged engine against a dense (unpaged, one request at a time) run of the same model."""
import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from paged_jax import LLM, SamplingParams
from paged_jax.block_pool import BlockPool
from paged_jax.models.forward import dense_greedy

GREEDY = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_dir(make_tiny_llama_dir):
    # Larger weights than HF's default init give peaked logits, so greedy choices are stable.
    return make_tiny_llama_dir(tokenizer=True, initializer_range=0.2, num_hidden_layers=2,
                               hidden_size=64, num_attention_heads=4, num_key_value_heads=2)


def make_llm(tiny_dir, **kw):
    opts = dict(num_kv_blocks=128, max_model_len=128, max_num_seqs=32,
                max_num_batched_tokens=512)
    opts.update(kw)
    return LLM(str(tiny_dir), **opts)


@pytest.fixture(scope="module")
def llm(tiny_dir):
    return make_llm(tiny_dir)


def random_prompts(n, seed, lo=1, hi=60, vocab=49152):
    rng = np.random.default_rng(seed)
    return [{"prompt_token_ids": rng.integers(3, vocab, int(rng.integers(lo, hi))).tolist()}
            for _ in range(n)]


def token_ids(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def dense(llm, prompt, n):
    m = llm.llm_engine.model
    return dense_greedy(m.graphdef, m.params, prompt["prompt_token_ids"], n)


@pytest.mark.parametrize("backend", ["auto", "xla"])
def test_paged_greedy_equals_dense_with_scattered_blocks(tiny_dir, backend):
    llm = make_llm(tiny_dir, attention_backend=backend)
    engine = llm.llm_engine
    # On the CPU "auto" is the C++ attention kernel; "xla" the pure-XLA reference path.
    assert engine.backend == {"auto": "cpu", "xla": "xla"}[backend]
    engine.kv.pool = BlockPool(engine.kv.pool.num_blocks, shuffle_seed=7)
    # Lengths around block boundaries (block size 16) and a one-token prompt.
    prompts = [{"prompt_token_ids": p["prompt_token_ids"][:n]} for p, n in
               zip(random_prompts(7, 0, 60, 61), (1, 15, 16, 17, 31, 33, 50))]
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, GREEDY)
    done, tables = {}, {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            done[out.request_id] = out
        for req in engine.scheduler.running:
            tables[req.request_id] = list(engine.kv.block_table(req.request_id))
    # The tables really are scattered: multi-block tables whose blocks are not consecutive.
    multi = [t for t in tables.values() if len(t) > 1]
    assert multi and all(any(b != a + 1 for a, b in zip(t, t[1:])) for t in multi)
    for i, prompt in enumerate(prompts):
        assert done[str(i)].finished
        assert done[str(i)].outputs[0].token_ids == dense(llm, prompt, 20)
    assert engine.kv.pool.num_free == engine.kv.pool.num_usable


@pytest.mark.parametrize("mixed, backend", [(True, "auto"), (False, "auto"), (True, "xla")])
def test_requests_arriving_while_others_decode_equal_dense(tiny_dir, mixed, backend):
    llm = make_llm(tiny_dir, max_num_batched_tokens=128, mixed_batches=mixed,
                   attention_backend=backend)
    engine = llm.llm_engine
    engine.kv.pool = BlockPool(engine.kv.pool.num_blocks, shuffle_seed=3)
    kinds, schedule = [], engine.scheduler.schedule

    def recording_schedule(drafts=None):
        batch = schedule(drafts)
        if batch is not None:
            kinds.append((batch.kind, batch.num_decodes))
        return batch

    engine.scheduler.schedule = recording_schedule
    prompts = random_prompts(9, 11, 5, 50)
    done = {}
    for i, prompt in enumerate(prompts):  # one arrival every other step
        engine.add_request(str(i), prompt, GREEDY)
        for _ in range(2):
            for out in engine.step():
                done[out.request_id] = out
    while engine.has_unfinished_requests():
        for out in engine.step():
            done[out.request_id] = out
    for i, prompt in enumerate(prompts):
        assert done[str(i)].outputs[0].token_ids == dense(llm, prompt, 20)
    mixed_steps = [k for k in kinds if k[0] == "prefill" and k[1] > 0]
    assert bool(mixed_steps) == mixed  # prompts joined decoding steps only when mixing
    assert engine.stats.prompt_tokens == sum(len(p["prompt_token_ids"]) for p in prompts)
    assert engine.kv.pool.num_free == engine.kv.pool.num_usable


def test_output_alone_equals_output_in_a_batch_of_33(llm):
    target = random_prompts(1, 1)[0]
    alone = token_ids(llm.generate([target], GREEDY, use_tqdm=False))[0]
    batch = random_prompts(32, 2) + [target]
    together = token_ids(llm.generate(batch, GREEDY, use_tqdm=False))[-1]
    assert alone == together


def test_preemption_under_a_small_cache_gives_the_same_outputs(tiny_dir, llm):
    prompts = random_prompts(10, 3, 20, 40)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    expected = token_ids(llm.generate(prompts, params, use_tqdm=False))
    small = make_llm(tiny_dir, num_kv_blocks=9)  # 8 usable blocks: 128 token slots for 10 requests
    outs = small.generate(prompts, params, use_tqdm=False)
    engine = small.llm_engine
    assert engine.scheduler.num_preemptions > 0
    assert sum(o.num_preemptions for o in outs) > 0
    assert token_ids(outs) == expected
    assert engine.kv.pool.num_free == engine.kv.pool.num_usable


def test_abort_frees_every_block(llm):
    engine = llm.llm_engine
    for i, p in enumerate(random_prompts(6, 4)):
        engine.add_request(f"abort-{i}", p, SamplingParams(max_tokens=50, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert engine.kv.pool.num_free < engine.kv.pool.num_usable
    engine.abort_request(["abort-0", "abort-3"])
    engine.abort_request("abort-5")
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.kv.pool.num_free == engine.kv.pool.num_usable
    assert engine.stats.finished["abort"] >= 3


def test_the_snapshot_shows_queues_blocks_and_totals_and_stays_frozen(tiny_dir):
    small = make_llm(tiny_dir, num_kv_blocks=9, max_num_seqs=3)  # 8 usable blocks, 3 seqs
    engine = small.llm_engine
    start = engine.snapshot()
    assert (start.num_running, start.num_waiting, start.kv.used_blocks) == (0, 0, 0)
    assert start.num_free_blocks == start.kv.total_blocks == 8
    prompts = random_prompts(5, 11, 20, 40)
    for i, p in enumerate(prompts):
        engine.add_request(f"s{i}", p, SamplingParams(temperature=0.0, max_tokens=30,
                                                      ignore_eos=True))
    engine.step()
    snap = engine.snapshot(with_requests=True)
    assert (snap.num_running, snap.num_waiting) == (3, 2)  # max_num_seqs admitted
    running = [r for r in snap.requests if r.status == "running"]
    assert [r.request_id for r in snap.requests if r.status == "waiting"] == ["s3", "s4"]
    held = {b for r in running for b in r.block_table}
    assert len(held) == snap.kv.used_blocks == 8 - snap.num_free_blocks
    for r in running:  # a block for every 16 computed tokens, none more
        assert len(r.block_table) == -(-r.num_computed_tokens // 16)
        assert r.num_computed_tokens == r.num_prompt_tokens
    assert snap.kv.token_states == sum(r.num_computed_tokens for r in running)
    assert snap.num_steps == 1 and snap.prompt_tokens == sum(r.num_prompt_tokens
                                                             for r in running)
    with pytest.raises(dataclasses.FrozenInstanceError):
        snap.num_running = 0
    while engine.has_unfinished_requests():
        engine.step()
    end = engine.snapshot(with_requests=True)
    assert end.num_preemptions > 0  # 5 x 60 tokens do not fit 8 blocks at once
    assert (end.num_unfinished, end.requests, end.kv.used_blocks) == (0, (), 0)
    assert end.generation_tokens == 5 * 30 and end.finished == {"length": 5}
    assert snap.num_running == 3  # the earlier snapshot did not move
    assert all(end.step_seconds[p] > snap.step_seconds[p] > 0
               for p in ("schedule", "build", "device", "update"))


def test_final_only_requests_get_one_output_when_they_finish(llm):
    engine = llm.llm_engine
    prompt = random_prompts(1, 21)[0]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, n=2)
    engine.add_request("every-step", prompt, params)
    engine.add_request("final", prompt, dataclasses.replace(params, output_kind="final_only"))
    seen = {"every-step": [], "final": []}
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen[out.request_id].append(out)
    assert len(seen["every-step"]) == 6 and not seen["every-step"][0].finished
    assert [o.finished for o in seen["final"]] == [True]
    assert ([c.token_ids for c in seen["final"][0].outputs]
            == [c.token_ids for c in seen["every-step"][-1].outputs])
    with pytest.raises(ValueError, match="output_kind must be one of cumulative, final_only"):
        SamplingParams(output_kind="delta")


def test_seeded_sampling_is_the_same_whatever_the_batch(llm):
    target = random_prompts(1, 5)[0]
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=16,
                            ignore_eos=True)
    alone = token_ids(llm.generate([target], params, use_tqdm=False))[0]
    others = random_prompts(9, 6)
    mixed = llm.generate(others + [target], [SamplingParams(temperature=0.8, max_tokens=8)] * 9
                         + [params], use_tqdm=False)
    assert token_ids(mixed)[-1] == alone
    other_seed = SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=16,
                                ignore_eos=True)
    assert token_ids(llm.generate([target], other_seed, use_tqdm=False))[0] != alone


def test_top_k_one_is_greedy(llm):
    prompts = random_prompts(3, 8)
    greedy = token_ids(llm.generate(prompts, GREEDY, use_tqdm=False))
    topk1 = SamplingParams(temperature=0.7, top_k=1, max_tokens=20, ignore_eos=True)
    assert token_ids(llm.generate(prompts, topk1, use_tqdm=False)) == greedy


def test_n_gives_n_distinct_samples(llm):
    out = llm.generate(random_prompts(1, 9), SamplingParams(n=3, temperature=1.0, max_tokens=12,
                                                            ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs) == 3 and [o.index for o in out.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1


def test_logprobs_match_the_dense_distribution(llm):
    prompt = random_prompts(1, 10)[0]
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=3, logprobs=5,
                                                ignore_eos=True), use_tqdm=False)[0].outputs[0]
    m = llm.llm_engine.model
    from paged_jax.models.forward import dense_logits
    ids = prompt["prompt_token_ids"] + out.token_ids
    logits = dense_logits(m.graphdef, m.params, ids).astype(np.float64)
    n = len(prompt["prompt_token_ids"])
    for i, (tok, lps) in enumerate(zip(out.token_ids, out.logprobs)):
        row = logits[n - 1 + i]
        ref = row - row.max() - np.log(np.exp(row - row.max()).sum())
        assert lps[tok].rank == 1
        assert set(lps) == set(np.argsort(-ref)[:5].tolist())
        for t, lp in lps.items():
            assert abs(lp.logprob - ref[t]) < 1e-4
    assert abs(out.cumulative_logprob - sum(lps[t].logprob for t, lps in
                                            zip(out.token_ids, out.logprobs))) < 1e-4


def test_stop_token_ids_stop_strings_and_max_tokens(llm):
    prompt = random_prompts(1, 11)[0]
    free = llm.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 20
    stop_tok = free.token_ids[5]
    first = free.token_ids.index(stop_tok)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                                                stop_token_ids=[stop_tok]),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == free.token_ids[:first + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop_tok)
    text = free.text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop.strip()
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                                                stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[:text.index(stop)]


def test_eos_stops_unless_ignored(tiny_dir):
    llm = make_llm(tiny_dir)
    engine = llm.llm_engine
    prompt = random_prompts(1, 12)[0]
    free = llm.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0]
    # Make the third greedy token the request's EOS: generation must stop right there, while
    # the ignore_eos run above went past it.
    engine_eos = (free.token_ids[2],)
    engine.add_request("eos", prompt, SamplingParams(temperature=0, max_tokens=20))
    engine._groups["eos"][0].eos_token_ids = engine_eos
    while engine.has_unfinished_requests():
        outs = engine.step()
    first = free.token_ids.index(engine_eos[0])
    assert outs[-1].outputs[0].token_ids == free.token_ids[:first + 1]
    assert outs[-1].outputs[0].finish_reason == "stop"


@pytest.mark.parametrize("params, message", [
    (dict(max_tokens=0), "max_tokens must be >= 1, got 0"),
    (dict(temperature=-0.5), "temperature must be >= 0, got -0.5"),
    (dict(top_p=0.0), "top_p must be in (0, 1], got 0.0"),
    (dict(top_p=1.5), "top_p must be in (0, 1], got 1.5"),
    (dict(top_k=-2), "top_k must be -1 (disabled) or in [1, 2147483647], got -2"),
    (dict(top_k=2**31), "top_k must be -1 (disabled) or in [1, 2147483647], got 2147483648"),
    (dict(temperature=float("inf")), "temperature must be a finite number"),
    (dict(temperature=1e308), "temperature must be a finite number of at most 3.403e+38"),
    (dict(temperature=float("nan")), "temperature must be a finite number"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty must be a finite number"),
    (dict(top_p=float("nan")), "top_p must be a finite number"),
    (dict(stop_token_ids=[2**40]), "stop_token_ids must be token ids in [0, 2147483647]"),
])
def test_bad_sampling_params_name_the_value(params, message):
    with pytest.raises(ValueError) as err:
        SamplingParams(**params)
    assert message in str(err.value)


def test_bad_requests_are_refused_and_others_go_on(llm):
    engine = llm.llm_engine
    good = random_prompts(2, 13)
    engine.add_request("good-0", good[0], GREEDY)
    with pytest.raises(ValueError, match="max_model_len is 128"):
        engine.add_request("long", {"prompt_token_ids": [5] * 200}, GREEDY)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add_request("oov", {"prompt_token_ids": [10**6]}, GREEDY)
    engine.add_request("good-1", good[1], GREEDY)
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    assert sorted(done) == ["good-0", "good-1"]
    assert engine.kv.pool.num_free == engine.kv.pool.num_usable


def test_request_that_can_never_fit_in_the_cache(tiny_dir):
    llm = make_llm(tiny_dir, num_kv_blocks=4)  # 3 usable blocks = 48 token slots
    with pytest.raises(ValueError, match=r"needs up to 60 tokens \(4 KV blocks\).*holds 3 blocks"):
        llm.generate([{"prompt_token_ids": [5] * 40}], SamplingParams(max_tokens=20),
                     use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()


def test_unknown_engine_option_is_refused(tiny_dir):
    with pytest.raises(TypeError, match="unknown engine option.*max_num_seq"):
        LLM(str(tiny_dir), max_num_seq=4)


def test_chat_uses_the_template(llm):
    out = llm.chat([{"role": "user", "content": "hello"}], SamplingParams(max_tokens=4),
                   use_tqdm=False)[0]
    tok = llm.get_tokenizer()
    assert "hello" in tok.decode(out.prompt_token_ids)
    assert len(out.outputs[0].token_ids) <= 4


def test_a_bfloat16_model_handed_in_runs_the_cpu_kernel_over_bfloat16_pages(tiny_dir, caplog):
    # The loaded model's dtype decides, not EngineConfig.dtype ("auto" here): bfloat16 pages,
    # which the CPU kernel reads (and writes in place), with the XLA path's tokens.
    from paged_jax import LLMEngine, SamplingParams
    from paged_jax.config import EngineConfig
    from paged_jax.models.loader import load_model

    model = load_model(str(tiny_dir), "bfloat16", with_tokenizer=False)
    tokens = {}
    for backend in ("auto", "xla"):
        with caplog.at_level("WARNING", logger="paged_jax.plan"):
            engine = LLMEngine(EngineConfig(num_kv_blocks=16, max_model_len=64,
                                            attention_backend=backend), model=model)
        assert engine.runner.kv_caches[0][0].dtype == jnp.bfloat16
        engine.add_request("r", list(range(3, 20)),
                           SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    tokens[engine.backend] = out.outputs[0].token_ids
    assert set(tokens) == {"cpu", "xla"} and tokens["cpu"] == tokens["xla"]
    # ... and the user is told what bfloat16 costs on the CPU.
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("bfloat16 on the CPU: float32 is the CPU's default" in w for w in warned)


def test_followers_get_one_stop_and_nothing_after_it_whatever_the_threads(llm):
    """Multi-host serving: the engine thread's per-step broadcasts and a stop sent from the
    CLI's thread never overlap, the stop goes out once, and no step publishes after it."""
    import threading
    import time

    from paged_jax import multihost

    engine = llm.llm_engine
    sent, busy = [], threading.Event()

    class SlowChannel:
        def publish(self, message):
            assert not busy.is_set(), "two broadcasts at once"
            busy.set()
            time.sleep(0.002)
            sent.append(message)
            busy.clear()

    engine._channel = SlowChannel()

    def steps():
        for _ in range(50):
            engine.step()

    threads = [threading.Thread(target=steps)] + [
        threading.Thread(target=engine.stop_followers) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sent.count(multihost.STOP) == 1 and sent[-1] == multihost.STOP
    assert engine._channel is None


def test_detokenize_false_gives_token_ids_only_and_truncation_keeps_the_end(llm):
    prompt = random_prompts(1, 21, lo=40, hi=41)[0]
    ids = prompt["prompt_token_ids"]
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=5, logprobs=1,
                                                detokenize=False, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert out.text == "" and len(out.token_ids) == 5
    assert all(lp.decoded_token is None for e in out.logprobs for lp in e.values())
    with pytest.raises(ValueError, match="detokenize must be true for stop strings"):
        SamplingParams(detokenize=False, stop=["x"])
    cut = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True,
                                                truncate_prompt_tokens=10), use_tqdm=False)[0]
    tail = llm.generate([{"prompt_token_ids": ids[-10:]}], GREEDY, use_tqdm=False)[0]
    assert cut.prompt_token_ids == ids[-10:]
    assert cut.outputs[0].token_ids == tail.outputs[0].token_ids[:5]
    with pytest.raises(ValueError, match=r"truncate_prompt_tokens must be at most max_model_len"):
        llm.generate([prompt], SamplingParams(truncate_prompt_tokens=1000))


def test_chat_takes_vllms_template_arguments(llm):
    tok = llm.get_tokenizer()
    template = ("{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
                "{% if tools %}<tools {{ tools | length }}>{% endif %}{{ suffix }}"
                "{% if add_generation_prompt %}[assistant]{% endif %}")
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "he"}]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    params = SamplingParams(temperature=0.0, max_tokens=1)
    out = llm.chat(messages, params, use_tqdm=False, chat_template=template, tools=tools,
                   chat_template_kwargs={"suffix": "!"})[0]
    assert out.prompt_token_ids == tok.encode("[user]hi[assistant]he<tools 1>![assistant]",
                                              add_special_tokens=False)
    cont = llm.chat(messages, params, use_tqdm=False, add_generation_prompt=False,
                    continue_final_message=True)[0]
    rendered = tok.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    assert rendered.endswith("he") and cont.prompt_token_ids == tok.encode(
        rendered, add_special_tokens=False)
    with pytest.raises(ValueError, match="continue_final_message and add_generation_prompt"):
        llm.chat(messages, params, continue_final_message=True)
