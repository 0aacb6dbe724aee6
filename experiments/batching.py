"""Batch size and latency under Poisson load: paged allocation vs. Orca's reservations, on the
real engine (paper Fig. 12 and Fig. 13).

One LLMEngine (SmolLM2 by default) serves the same seeded trace under four KV policies that
share one memory budget (num_kv_blocks):

  paged        vLLM: blocks allocated on demand, preemption by recompute
  orca_max     every request reserves max_model_len slots at admission
  orca_pow2    prompt + the next power of two of the true output
  orca_oracle  exactly prompt + true output

Under an Orca policy the Scheduler gets the policy as its `reservation`, and its KV view is
OrcaReservedKV: a request is admitted only if its reservation fits one contiguous buddy range
(reservation.ContiguousKV over the same slots, as the paper's baselines do), and the engine's
paged blocks back that range, so the model runs the same kernels under every policy and only
the admission rule differs. The true output length is the request's max_tokens (ignore_eos),
so req.max_total_tokens = prompt + true output, which is what orca_oracle / orca_pow2 read.

Lengths are the paper's ShareGPT (or Alpaca) log-normals (experiments/workload.draw_trace)
multiplied by --length_scale; max_model_len and the KV budget scale with them, so that the
budget holds as many max-length requests as the paper's (OPT-13B on an A100-40GB: 15728 KV
slots for 2048-token sequences, 7.7 of them). Mean batch sizes are then comparable with the
paper's Fig. 13 numbers; latencies are this CPU's.

Arrivals are Poisson at each --rates value (the same unit-rate gaps scaled by 1/rate, the same
requests for every rate and policy). Time is the engine's own (StepClock): every step advances
the clock by the median of the measured durations of all steps of its compiled shape so far
(compilation excluded), so that other processes on a shared CPU do not leak into the results
as noise; idle gaps jump to the next arrival. Per rate and policy:

  mean_batched_requests    mean number of requests in a decode step, over the decode steps
                           before the drain (while requests are still to arrive or wait in
                           the queue); the drain, where the batch empties, is left out, as it
                           is negligible in the paper's long traces
  mean_batched_requests_all_steps   the same over every decode step
  normalized_latency       mean over requests of (finish - arrival) / output length, s/token

    python -m experiments.batching --out_dir=results/batching          # a few minutes

writes results.json and batching.png (latency against rate, and the batch sizes beside the
paper's Fig. 13).
"""
from __future__ import annotations

import logging as pylogging
import pathlib
import time

import numpy as np
from absl import app, flags, logging

from experiments import paper
from experiments.paper import POLICIES
from experiments.progress import progress, say
from experiments.results_file import write_results
from experiments.workload import DATASETS, draw_trace
from paged_jax.kv_cache_manager import KVCacheManager
from paged_jax.baselines import (ContiguousKV, NoPrefixCache, next_pow2, orca_max, orca_oracle,
                                 orca_pow2)
from paged_jax.sampling_params import SamplingParams
from paged_jax.scheduler import paged_reservation

FLAGS = flags.FLAGS
PAPER_KV_TOKENS, PAPER_MAX_MODEL_LEN = 15728, 2048
PAPER_BATCH, PAPER_RATE, PAPER_RATE_RATIO = paper.BATCH, paper.BATCH_RATE, paper.RATE_RATIO


# ---- Orca on the real engine ----------------------------------------------------------------

class OrcaReservedKV(NoPrefixCache):
    """The Scheduler's allocate/free under an Orca policy: admission needs a contiguous buddy
    range for the whole reservation (ContiguousKV over the engine's usable slots, ranges of at
    least one block), and the engine's KVCacheManager backs it with blocks, which the model
    reads through the block table as usual. A range is a power of two of at least one block,
    so its blocks always fit in the pool when the range fits in the buddy space."""

    def __init__(self, kv: KVCacheManager, max_model_len: int):
        self.kv = kv
        self.contiguous = ContiguousKV(kv.pool.num_usable * kv.block_size,
                                       max_block=next_pow2(max_model_len),
                                       min_block=kv.block_size)

    def holds(self, request_id: str, num_tokens: int) -> bool:
        return (self.contiguous.holds(request_id, num_tokens)
                and self.kv.holds(request_id, num_tokens))

    def allocate(self, request_id: str, num_tokens: int, hit=None) -> bool:
        if not self.contiguous.allocate(request_id, num_tokens):
            return False
        if not self.kv.allocate(request_id, num_tokens):
            raise RuntimeError(f"{request_id}: a buddy range fit but its blocks did not")
        return True

    def free(self, request_id: str) -> None:
        self.contiguous.free(request_id)
        self.kv.free(request_id)


def install_policy(engine, policy: str) -> None:
    """Point the engine's Scheduler at a policy (the engine must have no requests)."""
    sched = engine.scheduler
    if sched.has_unfinished() or engine.kv.pool.num_used:
        raise RuntimeError("switch policies only between runs")
    if sched.chunked and policy != "paged":
        raise ValueError(f"policy {policy!r} reserves whole requests at admission; chunked "
                         "prefill takes blocks chunk by chunk")
    if policy == "paged":
        sched.kv, sched.reservation = engine.kv, paged_reservation
    else:
        mml = engine.max_model_len
        sched.reservation = {"orca_max": orca_max(mml), "orca_pow2": orca_pow2(mml),
                             "orca_oracle": orca_oracle()}[policy]
        sched.kv = OrcaReservedKV(engine.kv, mml)
    sched.num_preemptions = 0


# ---- workload -------------------------------------------------------------------------------

def scaled_trace(dataset: str, n: int, seed: int, scale: float,
                 max_model_len: int) -> list[tuple[int, int]]:
    """The paper-sized trace with every length multiplied by scale (at least 1 token), the
    output clipped so that prompt + output <= max_model_len."""
    out = []
    for p, o in draw_trace(dataset, n, seed):
        p = min(max(1, round(p * scale)), max_model_len - 1)
        out.append((p, min(max(1, round(o * scale)), max_model_len - p)))
    return out


def unit_gaps(n: int, seed: int) -> np.ndarray:
    """Arrival times of a Poisson process at 1 request/s; divide by the rate."""
    return np.cumsum(np.random.default_rng(seed + 1).exponential(1.0, n))


# ---- one run --------------------------------------------------------------------------------

class StepClock:
    """The engine's time: a step costs the median measured duration of its compiled shape
    (mode, tokens, sequences, block-table width), over every step of that shape seen so far."""

    def __init__(self):
        self.durations: dict[tuple, list[float]] = {}

    def cost(self, shape: tuple, measured: float) -> float:
        seen = self.durations.setdefault(shape, [])
        seen.append(measured)
        return float(np.median(seen))


def serve(engine, trace, arrivals, vocab: int, seed: int, step_clock: StepClock) -> dict:
    """Feed the requests in at their arrival times (engine clock) until all finish."""
    sched, runner = engine.scheduler, engine.runner
    steps: list[tuple[bool, str, int]] = []  # (before the drain?, kind, requests in the step)
    schedule = sched.schedule

    def recording_schedule(drafts=None):
        batch = schedule(drafts)
        if batch is not None and batch.requests:
            loaded = nxt < len(trace) or bool(sched.waiting)
            steps.append((loaded, batch.kind, len(batch.requests)))
        return batch

    shapes: list[tuple] = []
    dispatch = runner.dispatch

    def recording_dispatch(inputs, *args):
        shapes.append(inputs.shape_key)
        return dispatch(inputs, *args)

    rng = np.random.default_rng(seed + 2)
    prompts = [rng.integers(100, vocab, p).tolist() for p, _ in trace]
    finish: dict[int, float] = {}
    clock, nxt, seen, idle = 0.0, 0, 0, 0
    sched.schedule, runner.dispatch = recording_schedule, recording_dispatch
    try:
        while nxt < len(trace) or engine.has_unfinished_requests():
            if not engine.has_unfinished_requests() and arrivals[nxt] > clock:
                clock = float(arrivals[nxt])  # idle: jump to the next arrival
            while nxt < len(trace) and arrivals[nxt] <= clock:
                engine.add_request(f"q{nxt}", {"prompt_token_ids": prompts[nxt]},
                                   SamplingParams(temperature=0.0, max_tokens=trace[nxt][1],
                                                  ignore_eos=True), arrival_time=arrivals[nxt])
                nxt += 1
            before, compiled, ran = time.perf_counter(), runner.compile_seconds, len(shapes)
            outs = engine.step()
            took = (time.perf_counter() - before) - (runner.compile_seconds - compiled)
            if len(shapes) > ran:
                clock += step_clock.cost(shapes[-1], took)
            idle = 0 if len(steps) > seen else idle + 1
            seen = len(steps)
            if idle > 100:
                raise RuntimeError("the engine makes no progress: a request can never be admitted")
            for out in outs:
                if out.finished:
                    i = int(out.request_id[1:])
                    assert len(out.outputs[0].token_ids) == trace[i][1]
                    finish[i] = clock
    finally:
        sched.schedule, runner.dispatch = schedule, dispatch
    assert len(finish) == len(trace)
    decode = [n for _, kind, n in steps if kind == "decode"]
    window = [n for loaded, kind, n in steps if kind == "decode" and loaded] or decode
    lat = np.array([finish[i] - arrivals[i] for i in range(len(trace))])
    out_lens = np.array([o for _, o in trace])
    return dict(
        mean_batched_requests=float(np.mean(window)),
        mean_batched_requests_all_steps=float(np.mean(decode)),
        max_batched_requests=int(max(decode)),
        normalized_latency=float(np.mean(lat / out_lens)),
        mean_latency=float(lat.mean()),
        duration=clock, output_tokens_per_s=float(out_lens.sum() / clock),
        steps=len(steps), decode_steps=len(decode), window_decode_steps=len(window),
        preemptions=sched.num_preemptions)


# ---- the sweep ------------------------------------------------------------------------------

def sustainable_rate(rates: list[float], latencies: list[float], slo: float) -> float | None:
    """Highest rate with normalized latency <= slo, interpolated linearly between measured
    rates (None if even the lowest rate misses it; the highest rate if none does)."""
    if latencies[0] > slo:
        return None
    for (r0, l0), (r1, l1) in zip(zip(rates, latencies), zip(rates[1:], latencies[1:])):
        if l1 > slo:
            return r0 + (r1 - r0) * (slo - l0) / (l1 - l0)
    return rates[-1]


def run(*, model: str | None, dataset: str, length_scale: float, num_requests: int,
        rates: list[float], policies: list[str], block_size: int, kv_tokens: int,
        max_model_len: int, max_num_seqs: int, seed: int, out_dir: str,
        latency_slo: float = 0.0, kv_cache_dtype: str = "auto",
        kv_memory_dtype: str | None = None) -> dict:
    """kv_memory_dtype: kv_tokens are slots of this kv_cache_dtype's pages, and the pool is
    that much memory in kv_cache_dtype's pages (None: kv_cache_dtype itself)."""
    from paged_jax import LLM

    unknown = sorted(set(policies) - set(POLICIES))
    if unknown:
        raise ValueError(f"unknown policies {unknown}; known: {POLICIES}")
    rates = sorted(rates)
    max_model_len = max_model_len or round(PAPER_MAX_MODEL_LEN * length_scale)
    kv_tokens = kv_tokens or round(PAPER_KV_TOKENS * length_scale)
    num_kv_blocks = kv_tokens // block_size + 1  # + block 0, which no request gets
    if kv_memory_dtype not in (None, kv_cache_dtype):
        num_kv_blocks = same_memory_blocks(model, num_kv_blocks - 1, block_size,
                                           kv_memory_dtype, kv_cache_dtype) + 1
    engine = LLM(model, block_size=block_size, num_kv_blocks=num_kv_blocks,
                 kv_cache_dtype=kv_cache_dtype,
                 max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                 max_num_batched_tokens=max(max_model_len, 256),
                 # The paper's vLLM had no prefix cache, nor have the Orca baselines.
                 enable_prefix_caching=False).llm_engine
    trace = scaled_trace(dataset, num_requests, seed, length_scale, max_model_len)
    gaps = unit_gaps(num_requests, seed)
    vocab = engine.model.config.vocab_size
    results = {"dataset": dataset, "rates": rates, "policies": {}, "config": {
        "model": engine.model.path and str(engine.model.path), "length_scale": length_scale,
        "num_requests": num_requests, "block_size": block_size, "kv_tokens": kv_tokens,
        "num_kv_blocks": num_kv_blocks, "max_model_len": max_model_len,
        "kv_cache_dtype": kv_cache_dtype, "kv_memory_dtype": kv_memory_dtype or kv_cache_dtype,
        "kv_pool_bytes": (num_kv_blocks - 1) * block_bytes(engine, block_size, kv_cache_dtype),
        "max_num_seqs": max_num_seqs, "seed": seed,
        "mean_prompt": float(np.mean([p for p, _ in trace])),
        "mean_output": float(np.mean([o for _, o in trace])),
        "clock": "engine time: per step, the median measured duration of its compiled shape "
                 "(compilation excluded); idle gaps skipped"}}
    step_clock = StepClock()
    compile_before, wall = engine.runner.compile_seconds, time.perf_counter()
    # One step per (policy, rate) point, between serve() runs: no step's timing sees it.
    bar = progress(len(policies) * len(rates), "batching sweep", unit="point")
    for policy in policies:
        results["policies"][policy] = []
        for rate in rates:
            bar.set_postfix_str(f"{policy} rate {rate:g}")
            install_policy(engine, policy)
            r = serve(engine, trace, gaps / rate, vocab, seed, step_clock)
            results["policies"][policy].append({"rate": rate, **r})
            say(f"  {policy:<12} rate {rate:6.2f}: batch {r['mean_batched_requests']:5.1f}, "
                f"normalized latency {r['normalized_latency']:.3f} s/token, "
                f"{r['preemptions']} preemptions")
            bar.update()
    bar.close()
    install_policy(engine, "paged")
    results["wall_seconds"] = time.perf_counter() - wall
    results["compile_seconds"] = engine.runner.compile_seconds - compile_before
    results["step_seconds"] = {  # the clock's cost of each compiled shape, and how often it ran
        " ".join(map(str, shape)): {"median": float(np.median(d)), "steps": len(d)}
        for shape, d in sorted(step_clock.durations.items())}
    results["summary"] = summarize(results, latency_slo)
    results["paper"] = {"fig13_mean_batched_requests": PAPER_BATCH[dataset],
                        "fig13_rate": PAPER_RATE[dataset],
                        "fig12_rate_ratio_at_equal_latency": PAPER_RATE_RATIO}
    out = write_results(out_dir, results)
    plot(results, out / "batching.png")
    print(table(results))
    return results


def block_bytes(engine, block_size: int, kv_cache_dtype: str) -> int:
    from paged_jax import kv_cache

    return kv_cache.block_bytes(engine.model.config, block_size, kv_cache_dtype)


def same_memory_blocks(model, blocks: int, block_size: int, memory_dtype: str,
                       kv_cache_dtype: str) -> int:
    """How many kv_cache_dtype blocks fit the memory of `blocks` memory_dtype blocks."""
    from paged_jax import kv_cache, weights
    from paged_jax.models.config import ModelConfig

    cfg = ModelConfig.from_hf(weights.load_hf_config(weights.resolve_model(model)))
    ref = kv_cache.block_bytes(cfg, block_size, memory_dtype)
    return blocks * ref // kv_cache.block_bytes(cfg, block_size, kv_cache_dtype)


def capacity(model, dtypes: list[str], out_dir: str, **kwargs) -> dict:
    """One run per KV dtype at the memory of kv_tokens slots of the first dtype's pages: the
    blocks each holds and the batch each serves (paged policy)."""
    rows = {}
    for dtype in dtypes:
        results = run(model=model, kv_cache_dtype=dtype, kv_memory_dtype=dtypes[0],
                      out_dir=str(pathlib.Path(out_dir) / dtype), **kwargs)
        cfg = results["config"]
        rows[dtype] = {"num_kv_blocks": cfg["num_kv_blocks"] - 1,
                       "kv_pool_bytes": cfg["kv_pool_bytes"],
                       "mean_batched_requests": {
                           str(r["rate"]): r["mean_batched_requests"]
                           for r in results["policies"]["paged"]},
                       "normalized_latency": {
                           str(r["rate"]): r["normalized_latency"]
                           for r in results["policies"]["paged"]}}
    base = rows[dtypes[0]]["num_kv_blocks"]
    for row in rows.values():
        row["blocks_vs_first"] = row["num_kv_blocks"] / base
    summary = {"memory_of": dtypes[0], "dtypes": rows}
    write_results(out_dir, summary)
    lines = [f"KV memory of {dtypes[0]} pages; paged policy"]
    for dtype, row in rows.items():
        batches = ", ".join(f"rate {k}: {v:.1f}" for k, v in row["mean_batched_requests"].items())
        lines.append(f"  {dtype:<10} {row['num_kv_blocks']:6d} blocks "
                     f"({row['blocks_vs_first']:.2f}x)  mean batched requests {batches}")
    print("\n".join(lines))
    return summary


def summarize(results: dict, latency_slo: float) -> dict:
    pol, rates = results["policies"], results["rates"]
    s: dict = {"batch_at_highest_rate": {p: runs[-1]["mean_batched_requests"]
                                         for p, runs in pol.items()}}
    if "paged" in pol:
        paged = [r["mean_batched_requests"] for r in pol["paged"]]
        s["batch_ratio_paged_over"] = {
            p: [a / r["mean_batched_requests"] for a, r in zip(paged, runs)]
            for p, runs in pol.items() if p != "paged"}
        slo = latency_slo or 2 * pol["paged"][0]["normalized_latency"]
        s["latency_slo"] = slo
        s["sustainable_rate"] = {p: sustainable_rate(rates, [r["normalized_latency"]
                                                             for r in runs], slo)
                                 for p, runs in pol.items()}
    return s


def table(results: dict) -> str:
    cfg, pol, s = results["config"], results["policies"], results["summary"]
    paper = results["paper"]["fig13_mean_batched_requests"]
    lines = [f"{results['dataset']} x {cfg['length_scale']:g} (mean prompt "
             f"{cfg['mean_prompt']:.1f}, output {cfg['mean_output']:.1f}), KV {cfg['kv_tokens']} "
             f"slots in blocks of {cfg['block_size']}, max_model_len {cfg['max_model_len']}",
             f"{'policy':<12}{'rate':>7}{'batch':>8}{'all steps':>11}{'norm. lat':>11}"
             f"{'tok/s':>8}{'preempt':>9}"]
    for p, runs in pol.items():
        for r in runs:
            lines.append(f"{p:<12}{r['rate']:7.2f}{r['mean_batched_requests']:8.2f}"
                         f"{r['mean_batched_requests_all_steps']:11.2f}"
                         f"{r['normalized_latency']:11.3f}{r['output_tokens_per_s']:8.1f}"
                         f"{r['preemptions']:9d}")
    lines.append(f"Fig. 13, mean batched requests at rate {results['rates'][-1]:g}: ours (paper, "
                 f"OPT-13B at {results['paper']['fig13_rate']:g} req/s)")
    for p, b in s["batch_at_highest_rate"].items():
        lines.append(f"  {p:<12}{b:7.2f} ({paper[p]:6.2f})")
    if "batch_ratio_paged_over" in s:
        for p, ratios in s["batch_ratio_paged_over"].items():
            lines.append(f"  paged / {p:<12} {ratios[-1]:5.2f}x (paper "
                         f"{paper['paged'] / paper[p]:.2f}x)")
        lines.append(f"Fig. 12, highest rate with normalized latency <= "
                     f"{s['latency_slo']:.3f} s/token:")
        paged_rate = s["sustainable_rate"].get("paged")
        for p, rate in s["sustainable_rate"].items():
            cell = "below the lowest rate" if rate is None else f"{rate:6.2f} req/s"
            if rate and paged_rate and p != "paged":
                cell += f"  paged sustains {paged_rate / rate:.2f}x"
                if p in PAPER_RATE_RATIO:
                    lo, hi = PAPER_RATE_RATIO[p]
                    cell += f" (paper {lo:g}-{hi:g}x)"
            if p == "paged" and rate == results["rates"][-1]:
                cell += " (the highest rate measured: a lower bound)"
            lines.append(f"  {p:<12}{cell}")
    return "\n".join(lines)


def plot(results: dict, path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"orca_max": "#8d99ae", "orca_pow2": "#f2c14e", "orca_oracle": "#e07a5f",
              "paged": "#3d5a80"}
    pol, paper = results["policies"], results["paper"]["fig13_mean_batched_requests"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    for p, runs in pol.items():
        ax.plot([r["rate"] for r in runs], [r["normalized_latency"] for r in runs], "o-",
                color=colors[p], label=p)
    ax.set_xlabel("request rate (req/s, engine clock)")
    ax.set_ylabel("normalized latency (s/token)")
    ax.set_title(f"Latency vs. rate, {results['dataset']} (paper Fig. 12)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    names = list(pol)
    x = np.arange(len(names))
    ours = [pol[p][-1]["mean_batched_requests"] for p in names]
    ref = [paper[p] for p in names]
    bx.bar(x - 0.2, ours, 0.4, color=[colors[p] for p in names], edgecolor="black",
           label=f"ours, {results['rates'][-1]:g} req/s")
    bx.bar(x + 0.2, ref, 0.4, color=[colors[p] for p in names], edgecolor="black", hatch="//",
           alpha=0.6, label=f"paper, OPT-13B, {results['paper']['fig13_rate']:g} req/s")
    for xi, v in zip(x, ours):
        bx.text(xi - 0.2, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
    for xi, v in zip(x, ref):
        bx.text(xi + 0.2, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
    bx.set_xticks(x, names, fontsize=8)
    bx.set_ylabel("mean batched requests")
    bx.set_title("Batch size at the same KV memory (paper Fig. 13)")
    bx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def define_flags() -> None:
    """The command line (defined only when run as a script, so that importing this module
    next to the other experiments, whose flags share names, defines nothing)."""
    flags.DEFINE_string("model", None, "HF folder or .gguf; default: the embedded SmolLM2")
    flags.DEFINE_enum("dataset", "sharegpt", list(DATASETS), "length distribution")
    flags.DEFINE_float("length_scale", 1 / 16, "multiplies prompt/output lengths, max_model_len "
                       "and the KV budget (1 = the paper's sizes)")
    flags.DEFINE_integer("num_requests", 80, "requests per rate (the same for every policy)")
    flags.DEFINE_list("rates", ["3", "8", "24"], "Poisson arrival rates (requests per second "
                      "of engine time)")
    flags.DEFINE_list("policies", list(POLICIES), "KV policies")
    flags.DEFINE_integer("block_size", 8, "paged KV block size (tokens)")
    flags.DEFINE_integer("kv_tokens", 0, "KV budget in token slots (0: 15728 x length_scale, the "
                         "paper's OPT-13B on an A100-40GB, scaled)")
    flags.DEFINE_integer("max_model_len", 0, "context limit (0: 2048 x length_scale); Orca (Max) "
                         "reserves this")
    flags.DEFINE_integer("max_num_seqs", 64, "scheduler: most running requests; keep it above "
                         "what memory allows, so that memory is the limit")
    flags.DEFINE_float("latency_slo", 0.0, "normalized latency (s/token) for the sustainable-rate "
                       "comparison (0: 2x paged's normalized latency at the lowest rate)")
    flags.DEFINE_integer("seed", 0, "trace and arrival seed")
    flags.DEFINE_string("out_dir", "results/batching", "results.json and batching.png go here")
    flags.DEFINE_list("kv_cache_dtypes", ["auto"], "KV page dtypes: with more than one, a "
                      "capacity comparison, each dtype at the memory of kv_tokens slots of the "
                      "first one's pages, a run (and a subfolder) each")


def main(argv):
    del argv
    common = dict(dataset=FLAGS.dataset, length_scale=FLAGS.length_scale,
                  num_requests=FLAGS.num_requests, rates=[float(r) for r in FLAGS.rates],
                  policies=FLAGS.policies, block_size=FLAGS.block_size,
                  kv_tokens=FLAGS.kv_tokens, max_model_len=FLAGS.max_model_len,
                  max_num_seqs=FLAGS.max_num_seqs, seed=FLAGS.seed,
                  latency_slo=FLAGS.latency_slo)
    if len(FLAGS.kv_cache_dtypes) > 1:
        capacity(FLAGS.model, FLAGS.kv_cache_dtypes, FLAGS.out_dir, **common)
    else:
        run(model=FLAGS.model, out_dir=FLAGS.out_dir, kv_cache_dtype=FLAGS.kv_cache_dtypes[0],
            **common)


if __name__ == "__main__":
    define_flags()
    logging.set_verbosity(logging.WARNING)
    pylogging.getLogger("paged_jax").setLevel(pylogging.WARNING)
    app.run(main)
