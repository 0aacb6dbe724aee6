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
flags.DEFINE_integer("hf_batch_size", 16, "transformers: static batch size")
flags.DEFINE_bool("hf", True, "run the transformers baseline (needs torch)")
flags.DEFINE_bool("chat", True, "first print answers to a few chat prompts")
flags.DEFINE_string("out", "results/throughput/results.json", "where to write results")

CHAT_PROMPTS = ("What is the capital of France?", "Give me three tips for staying focused.",
                "Write a haiku about autumn.")


def run_chat(llm: LLM) -> None:
    outs = llm.chat([[{"role": "user", "content": q}] for q in CHAT_PROMPTS],
                    SamplingParams(temperature=0.0, max_tokens=96), use_tqdm=False)
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
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done += 1
                tokens += len(out.outputs[0].token_ids)
        u = engine.kv_usage()
        usage.append(u.usage)
        shares.append(u.token_state_share)
    wall = time.perf_counter() - start
    compile_s = engine.runner.compile_seconds - compile_before
    seconds = wall - compile_s
    assert done == len(work) and tokens == sum(w.output_len for w in work)
    return dict(seconds=seconds, wall_seconds_with_compile=wall, compile_seconds=compile_s,
                output_tokens=tokens, output_tokens_per_s=tokens / seconds,
                requests_per_s=len(work) / seconds, steps=len(usage),
                kv_usage_mean=sum(usage) / len(usage), kv_usage_peak=max(usage),
                kv_token_state_share_mean=sum(shares) / len(shares),
                preemptions=engine.scheduler.num_preemptions,
                kv_blocks=engine.kv.pool.num_usable, compiled_variants=engine.runner.num_compiled)


def run_hf(folder: str, work, batch_size: int) -> dict:
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 2)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
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
    seconds = time.perf_counter() - start
    return dict(seconds=seconds, output_tokens=tokens, output_tokens_per_s=tokens / seconds,
                requests_per_s=len(work) / seconds, batch_size=batch_size)


def main(argv):
    del argv
    llm = LLM(FLAGS.model, max_num_seqs=FLAGS.max_num_seqs, max_model_len=FLAGS.max_model_len,
              num_kv_blocks=FLAGS.num_kv_blocks)
    if FLAGS.chat:
        run_chat(llm)
    vocab = llm.llm_engine.model.config.vocab_size
    work = synthetic(FLAGS.num_requests, FLAGS.mean_input_len, FLAGS.mean_output_len,
                     FLAGS.seed, vocab, max_len=FLAGS.max_model_len)
    print(f"workload: {len(work)} requests, {sum(len(w.prompt_token_ids) for w in work)} prompt "
          f"tokens, {sum(w.output_len for w in work)} output tokens (seed {FLAGS.seed})")
    results = dict(workload=dict(num_requests=len(work), mean_input_len=FLAGS.mean_input_len,
                                 mean_output_len=FLAGS.mean_output_len, seed=FLAGS.seed),
                   machine=dict(cpus=os.cpu_count()))
    results["paged_jax"] = paged = run_paged(llm, work)
    print(f"paged-jax:    {paged['output_tokens_per_s']:7.1f} output tokens/s  "
          f"{paged['requests_per_s']:.3f} req/s  ({paged['seconds']:.1f} s + "
          f"{paged['compile_seconds']:.1f} s compiling {paged['compiled_variants']} variants)")
    print(f"  KV cache: mean usage {paged['kv_usage_mean']:.1%}, peak {paged['kv_usage_peak']:.1%} "
          f"of {paged['kv_blocks']} blocks; token states {paged['kv_token_state_share_mean']:.1%}"
          f" of allocated slots; {paged['preemptions']} preemptions")
    if FLAGS.hf:
        results["transformers_static"] = hf = run_hf(llm.llm_engine.model.path, work,
                                                      FLAGS.hf_batch_size)
        ratio = paged["output_tokens_per_s"] / hf["output_tokens_per_s"]
        results["ratio_output_tokens_per_s"] = ratio
        print(f"transformers: {hf['output_tokens_per_s']:7.1f} output tokens/s  "
              f"{hf['requests_per_s']:.3f} req/s  (static batches of {FLAGS.hf_batch_size})")
        print(f"ratio paged-jax / transformers static: {ratio:.2f}x  (target >= 3x on this CPU; "
              f"vLLM launch post: 14-24x HF on GPUs)")
    out = pathlib.Path(FLAGS.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    logging.set_verbosity(logging.WARNING)
    app.run(main)
