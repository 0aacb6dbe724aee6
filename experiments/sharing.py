"""Sharing KV blocks between sequences (paper Fig. 15 and 16), through the prefix cache.

Three experiments (--experiments, comma-separated):

  parallel_sampling  Fig. 15: every request of a seeded trace asks for n samples (n = 2, 4,
                     6). The real Scheduler and KVCacheManager (prefix caching on) run it with
                     no model, as experiments/memory_waste.py does: each step every scheduled
                     sequence gets one fake token of its own. Each step we compare the blocks
                     in use with the blocks the same sequences would hold unshared (the sum of
                     their table lengths); the saving is 1 - used / unshared over the run, the
                     paper's "blocks saved by sharing / blocks without sharing".
  beam_search        Fig. 15: LLM.beam_search (vLLM V1's algorithm, paged_jax/beam_search.py)
                     on the real model over prompts with Alpaca's lengths, beam widths 2, 4
                     and 6; each engine step compares the blocks in use with the beams'
                     tables unshared, as for parallel sampling. A beam's tokens are a prefix
                     of its children's, so each pass finds every full block of a beam in the
                     prefix cache.
  shared_prefix      Fig. 16: the real engine and model (SmolLM2 by default) serve requests
                     that start with one shared few-shot prefix and end in a sentence of their
                     own, once with enable_prefix_caching and once without, in the same
                     process; it reports the throughput ratio and checks that the greedy
                     outputs are equal. The paper's prefixes were 80 tokens (1-shot) and 341
                     tokens (5-shot) of a translation prompt; ours are random tokens of those
                     lengths, since only the lengths matter to the cost.

Our sharing is vLLM V1's: only full blocks are shared, and each sample computes its prompt's
last partial block itself (no copy-on-write), while the paper's vLLM also shared that
partial block until a sample wrote to it. So short prompts (Alpaca's 19 tokens on average,
block 16) save less here than in the paper. Beam search's passes likewise recompute each
beam's last partial block, where the paper's beams copied it on write.

  python -m experiments.sharing --out_dir=/tmp/sharing
"""
from __future__ import annotations

import time

import numpy as np
from absl import app, flags

from experiments import paper
from experiments.progress import progress, tracked
from experiments.results_file import publish
from experiments.workload import draw_trace
from paged_jax.kv_cache_manager import KVCacheManager
from paged_jax.request import Request
from paged_jax.sampling_params import SamplingParams
from paged_jax.scheduler import Scheduler

FLAGS = flags.FLAGS

PAPER_PARALLEL, PAPER_PREFIX = paper.PARALLEL_SAVING, paper.PREFIX_SPEEDUP
PAPER_BEAM = paper.BEAM_SAVING["alpaca"]


# ---- Fig. 15: parallel sampling -------------------------------------------------------------

def parallel_sampling(dataset: str, n: int, *, num_requests: int, kv_tokens: int,
                      block_size: int, seed: int, max_model_len: int = 2048,
                      max_num_seqs: int = 256) -> dict:
    """Runs the trace with n samples a request; returns the memory saved by sharing."""
    rng = np.random.default_rng(seed)
    kv = KVCacheManager(kv_tokens // block_size + 1, block_size, enable_caching=True)
    sched = Scheduler(kv, max_num_seqs, max(2048, max_model_len), mixed=True)
    trace = draw_trace(dataset, num_requests, seed, max_model_len)
    for i, (p, o) in enumerate(trace):
        # Distinct prompts (no sharing between requests), one per request for its n samples.
        prompt = rng.integers(0, 1 << 30, p).tolist()
        for j in range(n):
            sched.add(Request(f"{j}_{i}", list(prompt),
                              SamplingParams(max_tokens=o, ignore_eos=True), p + o, seed=j))
    used = unshared = steps = 0
    while sched.has_unfinished():
        batch = sched.schedule()
        if batch is None:
            raise RuntimeError(f"the head request never fits in {kv_tokens} KV slots")
        used += kv.pool.num_used
        unshared += sum(len(kv.block_table(r.request_id)) for r in sched.running)
        steps += 1
        sched.dispatched(batch)  # as LLMEngine.step, with a token of each sample's own
        sched.update_from_output(batch, [[int(rng.integers(0, 1 << 30))]
                                         for _ in batch.requests])
    if kv.pool.num_free != kv.pool.num_usable:
        raise RuntimeError("blocks leaked")
    return {"saving": 1 - used / unshared, "steps": steps,
            "preemptions": sched.num_preemptions,
            "hit_rate": kv.cache_stats.hits / kv.cache_stats.queries}


# ---- Fig. 15: beam search -------------------------------------------------------------------

def beam_sharing(model, widths: list[int], *, dataset: str, num_prompts: int, max_tokens: int,
                 block_size: int, seed: int, max_model_len: int = 1024,
                 attention_backend: str = "auto") -> dict:
    """LLM.beam_search on the real model over prompts with the dataset's lengths; each
    engine step compares the blocks in use with the beams' tables unshared."""
    from paged_jax import LLM, BeamSearchParams  # JAX only for this experiment

    trace = draw_trace(dataset, num_prompts, seed, max_model_len - max_tokens)
    out = {}
    for width in tracked(widths, "beam search by width"):
        llm = LLM(model, block_size=block_size, max_model_len=max_model_len,
                  max_num_seqs=max(64, num_prompts * width), attention_backend=attention_backend)
        engine = llm.llm_engine
        kv, sched, schedule = engine.kv, engine.scheduler, engine.scheduler.schedule
        tally = {"used": 0, "unshared": 0, "steps": 0}

        def recording_schedule(drafts=None):
            batch = schedule(drafts)
            tally["used"] += kv.pool.num_used
            tally["unshared"] += sum(len(kv.block_table(r.request_id)) for r in sched.running)
            tally["steps"] += 1
            return batch

        sched.schedule = recording_schedule
        vocab = engine.model.config.vocab_size
        rng = np.random.default_rng(seed)
        prompts = [{"prompt_token_ids": rng.integers(3, vocab, p).tolist()} for p, _ in trace]
        start = time.perf_counter()
        llm.beam_search(prompts, BeamSearchParams(width, max_tokens, ignore_eos=True))
        out[str(width)] = {"saving": 1 - tally["used"] / tally["unshared"],
                           "steps": tally["steps"], "seconds": time.perf_counter() - start,
                           "hit_rate": kv.cache_stats.hits / kv.cache_stats.queries}
    return out


# ---- Fig. 16: shared prefix -----------------------------------------------------------------

def shared_prefix_prompts(prefix_len: int, num_prompts: int, suffix_len: int, vocab: int,
                          seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    prefix = rng.integers(3, vocab, prefix_len).tolist()
    lens = np.maximum(1, rng.poisson(suffix_len, num_prompts))
    return [{"prompt_token_ids": prefix + rng.integers(3, vocab, int(k)).tolist()}
            for k in lens]


def time_run(llm, prompts, params) -> tuple[float, list]:
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - start, outs


def shared_prefix(model, prefix_lens: list[int], *, num_prompts: int, suffix_len: int,
                  max_tokens: int, block_size: int, seed: int, max_model_len: int = 1024,
                  precompile: bool = True, attention_backend: str = "auto") -> dict:
    from paged_jax import LLM  # JAX only for this experiment

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    engines = {c: LLM(model, block_size=block_size, enable_prefix_caching=c,
                      precompile=precompile, max_model_len=max_model_len,
                      attention_backend=attention_backend)
               for c in (True, False)}
    vocab = engines[True].llm_engine.model.config.vocab_size
    out = {}
    for prefix_len in tracked(prefix_lens, "shared prefix by length"):
        prompts = shared_prefix_prompts(prefix_len, num_prompts, suffix_len, vocab,
                                        seed + prefix_len)
        # Warm-up on other prompts (touches pages and host caches, leaves no useful hits).
        warm = shared_prefix_prompts(prefix_len, 2, suffix_len, vocab, seed + prefix_len + 1)
        runs = {}
        for caching, llm in engines.items():
            time_run(llm, warm, params)
            before = llm.llm_engine.snapshot()
            seconds, outs = time_run(llm, prompts, params)
            after = llm.llm_engine.snapshot()
            runs[caching] = (seconds, [o.outputs[0].token_ids for o in outs],
                             after.prefix_cache_queries - before.prefix_cache_queries,
                             after.prefix_cache_hits - before.prefix_cache_hits)
        if runs[True][1] != runs[False][1]:
            raise RuntimeError(f"prefix {prefix_len}: outputs differ with the prefix cache")
        tokens = num_prompts * max_tokens
        out[str(prefix_len)] = {
            "prompt_tokens": runs[True][2], "cached_prompt_tokens": runs[True][3],
            "seconds_cached": runs[True][0], "seconds_uncached": runs[False][0],
            "tokens_per_s_cached": tokens / runs[True][0],
            "tokens_per_s_uncached": tokens / runs[False][0],
            "speedup": runs[False][0] / runs[True][0]}
    return out


# ---- report ---------------------------------------------------------------------------------

def report(results: dict) -> str:
    lines = []
    if "parallel_sampling" in results:
        lines.append("Parallel sampling: KV memory saved by sharing (paper Fig. 15)")
        lines.append(f"  {'dataset':9} {'n':>2} {'ours':>7} {'paper':>16} {'prefix hits':>12}")
        for dataset, by_n in results["parallel_sampling"].items():
            for n, r in by_n.items():
                paper = PAPER_PARALLEL[dataset]
                paper = f"{paper[int(n)]:.2%}" if isinstance(paper, dict) else "16.2-30.5%"
                lines.append(f"  {dataset:9} {n:>2} {r['saving']:7.2%} {paper:>16} "
                             f"{r['hit_rate']:12.1%}")
    if "beam_search" in results:
        lines.append("Beam search: KV memory saved by sharing (paper Fig. 15)")
        lines.append(f"  {'width':>5} {'ours':>7} {'paper (Alpaca)':>15} {'prefix hits':>12}")
        for width, r in results["beam_search"].items():
            paper = PAPER_BEAM.get(int(width))
            paper = f"{paper:.2%}" if paper else "-"
            lines.append(f"  {width:>5} {r['saving']:7.2%} {paper:>15} {r['hit_rate']:12.1%}")
    if "shared_prefix" in results:
        lines.append("Shared prefix: offline throughput with / without the prefix cache "
                     "(paper Fig. 16)")
        for prefix_len, r in results["shared_prefix"].items():
            lines.append(f"  prefix {prefix_len:>4} tokens: {r['tokens_per_s_cached']:7.1f} vs "
                         f"{r['tokens_per_s_uncached']:7.1f} tokens/s = {r['speedup']:.2f}x "
                         f"(paper {PAPER_PREFIX.get(prefix_len, '-')}x); "
                         f"{r['cached_prompt_tokens']} of {r['prompt_tokens']} prompt tokens "
                         "from the cache")
    return "\n".join(lines)


def define_flags() -> None:
    flags.DEFINE_list("experiments", ["parallel_sampling", "beam_search", "shared_prefix"],
                      "which to run")
    flags.DEFINE_list("datasets", ["alpaca", "sharegpt"], "parallel_sampling: length distributions")
    flags.DEFINE_list("n", ["2", "4", "6"], "parallel_sampling: samples per request")
    flags.DEFINE_integer("num_requests", 300, "parallel_sampling: requests in the trace")
    flags.DEFINE_integer("kv_tokens", 15728, "parallel_sampling: KV slots (as memory_waste)")
    flags.DEFINE_integer("block_size", 16, "KV block size (tokens)")
    flags.DEFINE_integer("seed", 0, "seed of the traces and prompts")
    flags.DEFINE_list("beam_widths", ["2", "4", "6"], "beam_search: beam widths")
    flags.DEFINE_integer("beam_prompts", 8, "beam_search: prompts (Alpaca lengths)")
    flags.DEFINE_integer("beam_max_tokens", 32, "beam_search: tokens generated per beam")
    flags.DEFINE_string("model", None,
                        "beam_search, shared_prefix: HF folder or .gguf (None: SmolLM2)")
    flags.DEFINE_list("prefix_lens", ["80", "341"], "shared_prefix: the 1-shot and 5-shot prefixes")
    flags.DEFINE_integer("num_prompts", 32, "shared_prefix: requests, all arriving at once")
    flags.DEFINE_integer("suffix_len", 30, "shared_prefix: mean tokens of each request's own part")
    flags.DEFINE_integer("max_tokens", 32, "shared_prefix: tokens generated per request")
    flags.DEFINE_enum("attention_backend", "auto", ["auto", "xla", "pallas", "cpu"],
                      "beam_search, shared_prefix: the engines' attention backend")
    flags.DEFINE_string("out_dir", "/tmp/sharing", "results.json goes here")


def main(argv):
    del argv
    results = {}
    if "parallel_sampling" in FLAGS.experiments:
        with progress(len(FLAGS.datasets) * len(FLAGS.n), "parallel sampling",
                      unit="point") as bar:  # one step per (dataset, n) simulation
            results["parallel_sampling"] = {d: {} for d in FLAGS.datasets}
            for d in FLAGS.datasets:
                for n in FLAGS.n:
                    results["parallel_sampling"][d][n] = parallel_sampling(
                        d, int(n), num_requests=FLAGS.num_requests, kv_tokens=FLAGS.kv_tokens,
                        block_size=FLAGS.block_size, seed=FLAGS.seed)
                    bar.update()
    if "beam_search" in FLAGS.experiments:
        results["beam_search"] = beam_sharing(
            FLAGS.model, [int(w) for w in FLAGS.beam_widths], dataset="alpaca",
            num_prompts=FLAGS.beam_prompts, max_tokens=FLAGS.beam_max_tokens,
            block_size=FLAGS.block_size, seed=FLAGS.seed,
            attention_backend=FLAGS.attention_backend)
    if "shared_prefix" in FLAGS.experiments:
        results["shared_prefix"] = shared_prefix(
            FLAGS.model, [int(x) for x in FLAGS.prefix_lens], num_prompts=FLAGS.num_prompts,
            suffix_len=FLAGS.suffix_len, max_tokens=FLAGS.max_tokens,
            block_size=FLAGS.block_size, seed=FLAGS.seed,
            attention_backend=FLAGS.attention_backend)
    publish(FLAGS.out_dir, results, report(results))


if __name__ == "__main__":
    define_flags()
    app.run(main)
