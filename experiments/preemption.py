"""Preemption by recompute or by swap, by block size (paper Fig. 19).

Two experiments (--experiments, comma-separated), on the real model (SmolLM2 by default):

  microbenchmark  Fig. 19a: what it costs to get one preempted request of --tokens tokens
                  back, for each block size: swapping its blocks out and in as the engine
                  does (one gather and one transfer per direction for all the blocks), the
                  same blocks copied one at a time (the paper's vLLM issued one copy per
                  block: what made its small blocks slow), and recomputing the tokens (a
                  prefill of the request through the engine, prefix cache off).
  end_to_end      Fig. 19b: a ShareGPT-shaped trace (lengths scaled by --length_scale) served
                  offline (all requests at t=0) by an engine whose KV pool holds a fraction
                  of what the batch wants, once per preemption mode and block size, in the
                  same process. Reports the wall time, normalized latency (mean over requests
                  of latency / output tokens), preemptions and the tokens recomputed or
                  blocks swapped; greedy outputs must be equal in both modes.

On this CPU the "device" and the host share one memory, so a swap is a memory copy and no
PCIe link is crossed: swap is far cheaper here than on a GPU, and the comparison with the
paper is of shapes (how each cost moves with block size), not of values.

  python -m experiments.preemption --out_dir=/tmp/preemption
"""
from __future__ import annotations

import statistics
import time

import numpy as np
from absl import app, flags

from experiments import paper
from experiments.batching import scaled_trace
from experiments.progress import progress, tracked
from experiments.results_file import publish

FLAGS = flags.FLAGS


def _median_seconds(fns: dict, reps: int) -> dict:
    """Median seconds of each function, the functions taking turns within every repetition
    (this machine's memory bandwidth drifts between runs: turns expose all to the same)."""
    for fn in fns.values():
        fn()  # warm-up: compiles, touches pages
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


# ---- Fig. 19a -------------------------------------------------------------------------------

def microbenchmark(model, block_sizes: list[int], *, tokens: int, reps: int,
                   attention_backend: str = "auto") -> dict:
    """Seconds to swap out + in, block by block, and to recompute `tokens` tokens' KV."""
    return {str(bs): _microbenchmark_one(model, bs, tokens, reps, attention_backend)
            for bs in tracked(block_sizes, "swap/recompute by block size")}


def _microbenchmark_one(model, bs: int, tokens: int, reps: int, attention_backend: str) -> dict:
    from paged_jax import LLM, SamplingParams

    n = -(-tokens // bs)
    llm = LLM(model, block_size=bs, num_kv_blocks=2 * n + 2, max_model_len=tokens + 1,
              preemption_mode="swap", num_cpu_blocks=n, enable_prefix_caching=False,
              attention_backend=attention_backend)
    runner = llm.llm_engine.runner
    dev, host = list(range(1, n + 1)), list(range(1, n + 1))

    def batched():
        runner.swap(list(zip(dev, host)), [])
        runner.swap([], list(zip(host, dev)))
        _block(runner.kv_caches)

    def per_block():
        for d, h in zip(dev, host):
            runner.swap([(d, h)], [])
        for d, h in zip(dev, host):
            runner.swap([], [(h, d)])
        _block(runner.kv_caches)

    vocab = llm.llm_engine.model.config.vocab_size
    prompt = {"prompt_token_ids": np.random.default_rng(bs).integers(3, vocab, tokens).tolist()}
    params = SamplingParams(temperature=0.0, max_tokens=1)

    def recompute():
        llm.generate([prompt], params, use_tqdm=False)

    return {"blocks": n, "bytes": runner.swap_space.host[:, :, :, :n].nbytes,
            **_median_seconds({"swap_s": batched, "swap_per_block_s": per_block,
                               "recompute_s": recompute}, reps)}


def _block(caches) -> None:
    for k, v in caches:
        k.block_until_ready()
        v.block_until_ready()


# ---- Fig. 19b -------------------------------------------------------------------------------

def end_to_end(model, block_sizes: list[int], *, num_requests: int, length_scale: float,
               kv_share: float, max_model_len: int, seed: int,
               attention_backend: str = "auto") -> dict:
    """Both preemption modes over one trace, per block size. kv_share: the KV pool as a share
    of the tokens all requests hold at their longest (so the batch must preempt)."""
    from paged_jax import LLM, SamplingParams

    trace = scaled_trace("sharegpt", num_requests, seed, length_scale, max_model_len)
    out = {}
    # One step per (block size, mode) run, taken after the run's clock has stopped.
    bar = progress(2 * len(block_sizes), "preemption end to end", unit="run")
    for bs in block_sizes:
        demand = sum(-(-(p + o) // bs) for p, o in trace)
        num_blocks = max(int(demand * kv_share), -(-max_model_len // bs)) + 1
        runs = {}
        for mode in ("recompute", "swap"):
            bar.set_postfix_str(f"block {bs} {mode}")
            llm = LLM(model, block_size=bs, num_kv_blocks=num_blocks,
                      max_model_len=max_model_len, max_num_seqs=num_requests,
                      preemption_mode=mode, num_cpu_blocks=demand, precompile=True,
                      enable_prefix_caching=False, attention_backend=attention_backend)
            vocab = llm.llm_engine.model.config.vocab_size
            prompts = [{"prompt_token_ids": np.random.default_rng(seed + i).integers(
                3, vocab, p).tolist()} for i, (p, _) in enumerate(trace)]
            params = [SamplingParams(temperature=0.0, max_tokens=o, ignore_eos=True)
                      for _, o in trace]
            engine = llm.llm_engine
            start = time.perf_counter()
            for i, (prompt, prm) in enumerate(zip(prompts, params)):
                engine.add_request(str(i), prompt, prm)
            finish, tokens = {}, {}
            while engine.has_unfinished_requests():
                for o in engine.step():
                    if o.finished:
                        finish[o.request_id] = time.perf_counter() - start
                        tokens[o.request_id] = o.outputs[0].token_ids
            seconds = time.perf_counter() - start
            ids = [str(i) for i in range(len(trace))]
            lat = np.array([finish[i] for i in ids])
            out_lens = np.array([len(tokens[i]) for i in ids])
            space, snap = engine.runner.swap_space, engine.snapshot()
            runs[mode] = {
                "tokens": [tokens[i] for i in ids],
                "seconds": seconds,
                "normalized_latency": float(np.mean(lat / out_lens)),
                "preemptions": snap.num_preemptions,
                "swapped_out": snap.num_swapped_out,
                # Prompt tokens admitted beyond the trace's own: what recompute did again.
                "recomputed_tokens": snap.prompt_tokens - sum(p for p, _ in trace),
                "blocks_swapped": space.num_blocks_out if space is not None else 0,
                "kv_blocks": num_blocks - 1}
            bar.update()
        if runs["recompute"].pop("tokens") != runs["swap"].pop("tokens"):
            raise RuntimeError(f"block {bs}: greedy outputs differ between the modes")
        out[str(bs)] = runs
    bar.close()
    return out


# ---- report ---------------------------------------------------------------------------------

def report(results: dict) -> str:
    lines = [f"Paper (Fig. 19, OPT-13B on an A100): {paper.PREEMPTION}"]
    if "microbenchmark" in results:
        lines.append("Getting a preempted request back (ms; median), by block size:")
        lines.append(f"  {'block':>5} {'blocks':>6} {'MiB':>7} {'swap out+in':>12} "
                     f"{'per-block copies':>17} {'recompute':>10}")
        for bs, r in results["microbenchmark"].items():
            lines.append(f"  {bs:>5} {r['blocks']:>6} {r['bytes'] / 2**20:7.1f} "
                         f"{r['swap_s'] * 1e3:12.2f} {r['swap_per_block_s'] * 1e3:17.2f} "
                         f"{r['recompute_s'] * 1e3:10.2f}")
    if "end_to_end" in results:
        lines.append("Offline ShareGPT-shaped trace under a small KV pool, by block size:")
        lines.append(f"  {'block':>5} {'mode':>9} {'seconds':>8} {'norm. lat.':>10} "
                     f"{'preempt':>7} {'recomputed tok':>14} {'swapped blk':>11}")
        for bs, runs in results["end_to_end"].items():
            for mode, r in runs.items():
                lines.append(f"  {bs:>5} {mode:>9} {r['seconds']:8.2f} "
                             f"{r['normalized_latency']:10.4f} {r['preemptions']:>7} "
                             f"{r['recomputed_tokens']:>14} {r['blocks_swapped']:>11}")
    return "\n".join(lines)


def define_flags() -> None:
    flags.DEFINE_list("experiments", ["microbenchmark", "end_to_end"], "which to run")
    flags.DEFINE_string("model", None, "HF folder or .gguf (None: the embedded SmolLM2)")
    flags.DEFINE_list("block_sizes", ["8", "16", "32", "64", "128"],
                      "microbenchmark: block sizes")
    flags.DEFINE_integer("tokens", 512, "microbenchmark: tokens of the preempted request")
    flags.DEFINE_integer("reps", 9, "microbenchmark: repetitions (median reported)")
    flags.DEFINE_list("e2e_block_sizes", ["16", "64"], "end_to_end: block sizes")
    flags.DEFINE_integer("num_requests", 32, "end_to_end: requests, all at t=0")
    flags.DEFINE_float("length_scale", 0.25, "end_to_end: ShareGPT lengths times this")
    flags.DEFINE_float("kv_share", 0.3, "end_to_end: KV pool / the trace's peak demand")
    flags.DEFINE_integer("max_model_len", 512, "end_to_end: context limit")
    flags.DEFINE_integer("seed", 0, "seed of the trace and prompts")
    flags.DEFINE_enum("attention_backend", "auto", ["auto", "xla", "pallas", "cpu"],
                      "the engines' attention backend")
    flags.DEFINE_string("out_dir", "/tmp/preemption", "results.json goes here")


def main(argv):
    del argv
    results = {}
    if "microbenchmark" in FLAGS.experiments:
        results["microbenchmark"] = microbenchmark(
            FLAGS.model, [int(b) for b in FLAGS.block_sizes], tokens=FLAGS.tokens,
            reps=FLAGS.reps, attention_backend=FLAGS.attention_backend)
    if "end_to_end" in FLAGS.experiments:
        results["end_to_end"] = end_to_end(
            FLAGS.model, [int(b) for b in FLAGS.e2e_block_sizes],
            num_requests=FLAGS.num_requests, length_scale=FLAGS.length_scale,
            kv_share=FLAGS.kv_share, max_model_len=FLAGS.max_model_len, seed=FLAGS.seed,
            attention_backend=FLAGS.attention_backend)
    publish(FLAGS.out_dir, results, report(results))


if __name__ == "__main__":
    define_flags()
    app.run(main)
