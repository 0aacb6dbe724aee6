"""Offline throughput: paged-jax against transformers' static batching, same weights, same run.

    python experiments/throughput.py                 # SmolLM2, 64 requests, ~100 in / ~100 out

Prints a few chat answers first (--chat), then runs a seeded workload (ignore_eos, so both
engines produce exactly the requested lengths) through paged-jax and through transformers'
`generate` on left-padded static batches, and writes results.json.
"""
from __future__ import annotations

import json
import os
import pathlib
import sys
import time

from absl import app, flags, logging

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from progress import progress, shown  # noqa: E402
from results_file import describe, machine  # noqa: E402
from workload import synthetic  # noqa: E402

from paged_jax import LLM, SamplingParams  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "HF folder or .gguf; default: the embedded SmolLM2")
flags.DEFINE_integer("num_requests", 64, "requests in the workload")
flags.DEFINE_float("mean_input_len", 100, "mean prompt length (log-normal)")
flags.DEFINE_float("mean_output_len", 100, "mean output length (log-normal)")
flags.DEFINE_integer("seed", 0, "workload seed")
flags.DEFINE_integer("max_num_seqs", 64, "paged-jax: max sequences per step")
flags.DEFINE_integer("max_model_len", 512, "paged-jax: context limit (bounds step shapes)")
flags.DEFINE_integer("num_kv_blocks", None, "paged-jax: KV blocks (default: from memory budget)")
flags.DEFINE_bool("precompile", True, "paged-jax: compile every step shape before the timed "
                  "run (reported apart, as vLLM captures its graphs at start-up)")
flags.DEFINE_bool("mixed_batches", True, "paged-jax: decodes and new prompts in one step")
flags.DEFINE_bool("async_scheduling", False, "paged-jax: schedule and dispatch each step "
                  "while the one before runs")
flags.DEFINE_enum("attention_backend", "auto", ["auto", "xla", "cpu", "pallas"],
                  "paged-jax: attention backend (auto: the C++ kernel on the CPU)")
flags.DEFINE_enum("kv_cache_dtype", "auto", ["auto", "float32", "bfloat16", "float16", "fp8",
                                             "fp8_e4m3", "fp8_e5m2", "int8"],
                  "paged-jax: how KV pages are stored")
flags.DEFINE_enum("quantization", None, ["int8", "fp8"], "paged-jax: the linear layers' "
                  "weights (default: as the checkpoint stores them)")
flags.DEFINE_integer("passes", 1, "paged-jax: run the workload this many times in one process; "
                     "the first pass is the one compared")
flags.DEFINE_integer("hf_batch_size", 16, "transformers: static batch size")
flags.DEFINE_bool("hf", True, "run the transformers baseline (needs torch)")
flags.DEFINE_bool("chat", True, "first print answers to a few chat prompts")
flags.DEFINE_bool("hf_cb", True, "run transformers' continuous batching (transformers >= 5)")
flags.DEFINE_integer("hf_cb_max_batch_tokens", 256, "transformers CB: tokens per step")
flags.DEFINE_integer("hf_cb_num_blocks", 0, "transformers CB: KV pages (0: enough for the "
                     "workload's longest request times 64)")
flags.DEFINE_bool("llama_cpp", True, "run llama.cpp (llama-cpp-python) on the GGUF file")
flags.DEFINE_integer("llama_cpp_seqs", 16, "llama.cpp: sequences decoded together (n_seq_max)")
flags.DEFINE_string("out", "results/throughput/results.json", "where to write results")

CHAT_PROMPTS = ("What is the capital of France?", "Give me three tips for staying focused.",
                "Write a haiku about autumn.")


def run_chat(llm: LLM) -> None:
    outs = llm.chat([[{"role": "user", "content": q}] for q in CHAT_PROMPTS],
                    SamplingParams(temperature=0.0, max_tokens=96), use_tqdm=shown())
    for q, o in zip(CHAT_PROMPTS, outs):
        print(f"\nUser: {q}\nSmolLM2: {o.outputs[0].text.strip()}")
    print()


def run_paged(llm: LLM, work) -> dict:
    engine = llm.llm_engine
    compile_before = engine.runner.compile_seconds
    start = time.perf_counter()
    for i, w in enumerate(work):
        engine.add_request(f"w{i}", {"prompt_token_ids": w.prompt_token_ids},
                           SamplingParams(temperature=0.0, max_tokens=w.output_len,
                                          ignore_eos=True))
    usage, shares, done, tokens = [], [], 0, 0
    # Seconds per compiled step shape (mode, tokens, sequences, table width, rows), from
    # dispatch to the sampled tokens on the host: where time goes.
    shapes, runner = {}, engine.runner
    dispatch, fetch, started = runner.dispatch, runner.fetch, []

    def timed_dispatch(inputs, *args):
        started.append((inputs.shape_key, time.perf_counter()))
        return dispatch(inputs, *args)

    def timed_fetch(*args):
        result = fetch(*args)
        key, t = started.pop(0)  # steps are fetched in the order they were dispatched
        count, total = shapes.get(key, (0, 0.0))
        shapes[key] = (count + 1, total + time.perf_counter() - t)
        return result

    runner.dispatch, runner.fetch = timed_dispatch, timed_fetch
    with progress(len(work), "paged-jax", unit="req") as bar:  # one update per finished request
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done += 1
                    tokens += len(out.outputs[0].token_ids)
                    bar.update()
            u = engine.snapshot().kv
            usage.append(u.usage)
            shares.append(u.token_state_share)
    wall = time.perf_counter() - start
    del runner.dispatch, runner.fetch  # the instance attributes; the class's methods again
    compile_s = engine.runner.compile_seconds - compile_before
    seconds = wall - compile_s
    assert done == len(work) and tokens == sum(w.output_len for w in work)
    return dict(seconds=seconds, wall_seconds_with_compile=wall, compile_seconds=compile_s,
                output_tokens=tokens, output_tokens_per_s=tokens / seconds,
                requests_per_s=len(work) / seconds, steps=len(usage),
                kv_usage_mean=sum(usage) / len(usage), kv_usage_peak=max(usage),
                kv_token_state_share_mean=sum(shares) / len(shares),
                preemptions=engine.snapshot().num_preemptions,
                kv_blocks=engine.snapshot().kv.total_blocks,
                compiled_variants=engine.runner.num_compiled,
                step_shapes={" ".join(map(str, k)): dict(steps=n, seconds=s)
                             for k, (n, s) in sorted(shapes.items())})


def run_hf(folder: str, work, batch_size: int) -> dict:
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 2)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    bar = progress(len(work), "transformers static", unit="req")  # one update per batch
    start = time.perf_counter()
    tokens = 0
    for b in range(0, len(work), batch_size):
        batch = work[b:b + batch_size]
        width = max(len(w.prompt_token_ids) for w in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, w in enumerate(batch):  # left padding, as generate expects for decoder-only
            ids[i, width - len(w.prompt_token_ids):] = torch.tensor(w.prompt_token_ids)
            mask[i, width - len(w.prompt_token_ids):] = 1
        longest = max(w.output_len for w in batch)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=longest,
                                 min_new_tokens=longest, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)
        assert out.shape[1] == width + longest
        tokens += sum(w.output_len for w in batch)  # useful tokens: each request's own length
        bar.update(len(batch))
    seconds = time.perf_counter() - start
    bar.close()
    return dict(seconds=seconds, output_tokens=tokens, output_tokens_per_s=tokens / seconds,
                requests_per_s=len(work) / seconds, batch_size=batch_size)


def run_hf_continuous(folder: str, work, max_batch_tokens: int = 256,
                      num_blocks: int = 0) -> dict:
    """transformers' own continuous batching (ContinuousBatchingManager, transformers >= 5),
    one add_request per item with its own max_new_tokens, EOS disabled, greedy. CPU settings
    from PEERS.md: the KV size set by hand, no CUDA graphs, sdpa attention."""
    import torch
    import transformers
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    torch.set_num_threads(os.cpu_count() or 2)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="sdpa").eval()
    page = 256  # tokens per KV page (transformers' default; 16-64 were no faster here)
    longest = max(len(w.prompt_token_ids) + w.output_len for w in work)
    num_blocks = num_blocks or 64 * -(-longest // page)
    gen = transformers.GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=0,
                                        max_new_tokens=max(w.output_len for w in work))
    cb = ContinuousBatchingConfig(page_size=page, num_blocks=num_blocks,
                                  max_batch_tokens=max_batch_tokens, use_cuda_graph=False)
    results = {}
    with torch.inference_mode(), model.continuous_batching_context_manager(
            generation_config=gen, continuous_batching_config=cb, block=True, timeout=30,
            warmup=False) as manager, progress(len(work), "transformers CB", unit="req") as bar:
        start = time.perf_counter()
        for i, w in enumerate(work):
            manager.add_request(list(w.prompt_token_ids), request_id=f"w{i}",
                                max_new_tokens=w.output_len)
        while len(results) < len(work):
            result = manager.get_result(timeout=1)
            if result is not None and result.is_finished():
                if result.error is not None:
                    raise RuntimeError(f"transformers CB: {result.request_id}: {result.error}")
                results[result.request_id] = result
                bar.update()
            elif result is None and not manager.is_running():
                raise RuntimeError("transformers CB: the generation thread stopped")
        seconds = time.perf_counter() - start
    tokens = sum(len(r.generated_tokens) for r in results.values())
    assert tokens == sum(w.output_len for w in work), tokens
    return dict(seconds=seconds, output_tokens=tokens, output_tokens_per_s=tokens / seconds,
                requests_per_s=len(work) / seconds, max_batch_tokens=max_batch_tokens,
                num_blocks=num_blocks, page_size=page)


def run_llama_cpp(gguf: str, work, n_seq_max: int = 16) -> dict:
    """llama.cpp through llama-cpp-python's low-level API, continuous batching by hand: up to
    n_seq_max sequences share one unified KV buffer; every llama_decode call carries one token
    for each running sequence plus the prompts of newly admitted ones; greedy on the logits.
    use_extra_bufts=False: the AMX weight repacking segfaults on this Q4_1 file (PEERS.md).
    Measure on idle cores: ggml's spinning thread pool slows down many times over when other
    processes share them (one 8-sequence decode step took 0.1 to 3 s here under load)."""
    import ctypes

    import llama_cpp as lc
    import numpy as np

    quiet = lc.llama_log_callback(lambda level, text, user_data: None)
    run_llama_cpp.log_callback = quiet  # llama.cpp keeps calling it: keep it alive
    lc.llama_log_set(quiet, ctypes.c_void_p())
    lc.llama_backend_init()
    mparams = lc.llama_model_default_params()
    mparams.use_extra_bufts = False
    model = lc.llama_model_load_from_file(str(gguf).encode(), mparams)
    if not model:
        raise RuntimeError(f"llama.cpp could not load {gguf}")
    longest = max(len(w.prompt_token_ids) + w.output_len for w in work)
    n_batch = max(512, n_seq_max + max(len(w.prompt_token_ids) for w in work))
    cparams = lc.llama_context_default_params()
    cparams.n_ctx = n_seq_max * longest
    cparams.n_batch = cparams.n_ubatch = n_batch
    cparams.n_seq_max = n_seq_max
    cparams.kv_unified = True
    cparams.n_threads = cparams.n_threads_batch = os.cpu_count() or 2
    ctx = lc.llama_init_from_model(model, cparams)
    if not ctx:
        raise RuntimeError("llama.cpp could not create a context")
    n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model))
    memory = lc.llama_get_memory(ctx)
    batch = lc.llama_batch_init(n_batch, 0, 1)
    queue = list(enumerate(work))[::-1]
    free_seqs = list(range(n_seq_max))[::-1]
    running: dict[int, list] = {}  # seq id -> [work index, next position, last token, generated]
    tokens = 0
    bar = progress(len(work), "llama.cpp", unit="req")  # one update per finished request
    try:
        start = time.perf_counter()
        while queue or running:
            n, rows = 0, []  # rows: (batch index, seq id) whose logits are read

            def put(token, pos, seq, want_logits):
                nonlocal n
                batch.token[n], batch.pos[n], batch.n_seq_id[n] = token, pos, 1
                batch.seq_id[n][0], batch.logits[n] = seq, int(want_logits)
                if want_logits:
                    rows.append((n, seq))
                n += 1

            for seq, (_, pos, last, _) in running.items():
                put(last, pos, seq, True)
            while queue and free_seqs and n + len(queue[-1][1].prompt_token_ids) <= n_batch:
                i, w = queue.pop()
                seq = free_seqs.pop()
                ids = w.prompt_token_ids
                for p, t in enumerate(ids):
                    put(t, p, seq, p == len(ids) - 1)
                running[seq] = [i, len(ids) - 1, None, 0]
            batch.n_tokens = n
            if lc.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed (KV cache full?)")
            for row, seq in rows:
                logits = np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, row), (n_vocab,))
                state = running[seq]
                state[1] += 1
                state[2] = int(logits.argmax())
                state[3] += 1
                tokens += 1
                if state[3] == work[state[0]].output_len:
                    lc.llama_memory_seq_rm(memory, seq, -1, -1)
                    del running[seq]
                    free_seqs.append(seq)
                    bar.update()
        seconds = time.perf_counter() - start
    finally:
        bar.close()
        lc.llama_batch_free(batch)
        lc.llama_free(ctx)
        lc.llama_model_free(model)
    assert tokens == sum(w.output_len for w in work), tokens
    return dict(seconds=seconds, output_tokens=tokens, output_tokens_per_s=tokens / seconds,
                requests_per_s=len(work) / seconds, n_seq_max=n_seq_max, gguf=str(gguf))


def run_peers(results: dict, llm: LLM, work) -> None:
    """The optional peers, each skipped with a message when it cannot run here."""
    paged = results["paged_jax"]["output_tokens_per_s"]
    if FLAGS.hf_cb:
        try:
            from transformers.generation.configuration_utils import (  # noqa: F401
                ContinuousBatchingConfig)
        except ImportError as e:
            print(f"transformers continuous batching: skipped ({e}; needs transformers >= 5 "
                  f"and torch)")
        else:
            cb = run_hf_continuous(llm.llm_engine.model.path, work,
                                   FLAGS.hf_cb_max_batch_tokens, FLAGS.hf_cb_num_blocks)
            results["transformers_continuous"] = cb
            results["ratio_vs_transformers_continuous"] = paged / cb["output_tokens_per_s"]
            print(f"transformers CB: {cb['output_tokens_per_s']:7.1f} output tokens/s  "
                  f"{cb['requests_per_s']:.3f} req/s  (ContinuousBatchingManager, "
                  f"max_batch_tokens {cb['max_batch_tokens']})")
            print(f"ratio paged-jax / transformers continuous batching: "
                  f"{results['ratio_vs_transformers_continuous']:.2f}x")
    if FLAGS.llama_cpp:
        gguf = llama_cpp_model(FLAGS.model)
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            print("llama.cpp: skipped (llama-cpp-python is not installed; `pip install "
                  "llama-cpp-python` compiles llama.cpp, about 4 minutes on 2 cores)")
        else:
            if gguf is None:
                print(f"llama.cpp: skipped (needs a .gguf model, got {FLAGS.model})")
                return
            lcpp = run_llama_cpp(gguf, work, FLAGS.llama_cpp_seqs)
            results["llama_cpp"] = lcpp
            results["ratio_vs_llama_cpp"] = paged / lcpp["output_tokens_per_s"]
            print(f"llama.cpp:       {lcpp['output_tokens_per_s']:7.1f} output tokens/s  "
                  f"{lcpp['requests_per_s']:.3f} req/s  ({pathlib.Path(gguf).name}, "
                  f"{lcpp['n_seq_max']} sequences per batch)")
            print(f"ratio paged-jax / llama.cpp: {results['ratio_vs_llama_cpp']:.2f}x "
                  f"(llama.cpp runs the quantized file; paged-jax float32)")


def llama_cpp_model(model: str | None) -> str | None:
    """The GGUF file llama.cpp runs: the given one, or the embedded SmolLM2's."""
    if model is None:
        from paged_jax.weights import default_gguf_path
        return str(default_gguf_path())
    return model if str(model).endswith(".gguf") else None


def main(argv):
    del argv
    start = time.perf_counter()
    llm = LLM(FLAGS.model, max_num_seqs=FLAGS.max_num_seqs, max_model_len=FLAGS.max_model_len,
              num_kv_blocks=FLAGS.num_kv_blocks, precompile=FLAGS.precompile,
              mixed_batches=FLAGS.mixed_batches, attention_backend=FLAGS.attention_backend,
              async_scheduling=FLAGS.async_scheduling, kv_cache_dtype=FLAGS.kv_cache_dtype,
              quantization=FLAGS.quantization)
    startup = time.perf_counter() - start
    if FLAGS.chat:
        run_chat(llm)
    vocab = llm.llm_engine.model.config.vocab_size
    work = synthetic(FLAGS.num_requests, FLAGS.mean_input_len, FLAGS.mean_output_len,
                     FLAGS.seed, vocab, max_len=FLAGS.max_model_len)
    print(f"workload: {len(work)} requests, {sum(len(w.prompt_token_ids) for w in work)} prompt "
          f"tokens, {sum(w.output_len for w in work)} output tokens (seed {FLAGS.seed})")
    results = dict(workload=dict(num_requests=len(work), mean_input_len=FLAGS.mean_input_len,
                                 mean_output_len=FLAGS.mean_output_len, seed=FLAGS.seed),
                   paged_jax_options=dict(kv_cache_dtype=FLAGS.kv_cache_dtype,
                                          quantization=FLAGS.quantization,
                                          attention_backend=FLAGS.attention_backend),
                   machine=dict(cpus=os.cpu_count()))
    results["paged_jax"] = paged = run_paged(llm, work)
    paged["startup_seconds"] = startup  # loading, and compiling every shape if --precompile
    paged["precompiled_variants"] = llm.llm_engine.runner.num_compiled if FLAGS.precompile else 0
    print(f"paged-jax:    {paged['output_tokens_per_s']:7.1f} output tokens/s  "
          f"{paged['requests_per_s']:.3f} req/s  ({paged['seconds']:.1f} s; start-up "
          f"{startup:.1f} s, {paged['compiled_variants']} step variants compiled, "
          f"{paged['compile_seconds']:.1f} s of it during the run)")
    print(f"  KV cache: mean usage {paged['kv_usage_mean']:.1%}, peak {paged['kv_usage_peak']:.1%} "
          f"of {paged['kv_blocks']} blocks; token states {paged['kv_token_state_share_mean']:.1%}"
          f" of allocated slots; {paged['preemptions']} preemptions")
    print(f"  attention backend {llm.llm_engine.backend}; seconds per step by shape "
          f"(mode tokens seqs table): " + ", ".join(
              f"{k}: {v['steps']} x {v['seconds'] / v['steps']:.3f}"
              for k, v in paged["step_shapes"].items()))
    for i in range(1, FLAGS.passes):  # later passes: the same process, warm
        again = run_paged(llm, work)
        results.setdefault("paged_jax_later_passes", []).append(again)
        print(f"  pass {i + 1}: {again['output_tokens_per_s']:.1f} output tokens/s "
              f"({again['seconds']:.1f} s)")
    if FLAGS.hf:
        results["transformers_static"] = hf = run_hf(llm.llm_engine.model.path, work,
                                                      FLAGS.hf_batch_size)
        ratio = paged["output_tokens_per_s"] / hf["output_tokens_per_s"]
        results["ratio_output_tokens_per_s"] = ratio
        print(f"transformers: {hf['output_tokens_per_s']:7.1f} output tokens/s  "
              f"{hf['requests_per_s']:.3f} req/s  (static batches of {FLAGS.hf_batch_size})")
        print(f"ratio paged-jax / transformers static: {ratio:.2f}x  (target >= 3x on this CPU; "
              f"vLLM launch post: 14-24x HF on GPUs)")
    run_peers(results, llm, work)
    results["machine"] = {**machine(), **results["machine"]}
    print(f"machine: {describe(results['machine'])}")
    out = pathlib.Path(FLAGS.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    logging.set_verbosity(logging.WARNING)
    app.run(main)
