"""Where KV memory goes: Orca's up-front reservations vs. paged allocation (paper Fig. 2).

A seeded trace (log-normal prompt and output lengths with the paper's means, filtered like
vLLM's ShareGPT sampler) is pushed through the real Scheduler with no model: every step the
scheduled requests get one fake token, and a request finishes at its true length. Four runs:

  paged        KVCacheManager, blocks allocated on demand (vLLM)
  orca_max     contiguous buddy range of max_model_len slots per request
  orca_pow2    prompt + next power of two of the true output, rounded up by the buddy allocator
  orca_oracle  exactly prompt + true output, rounded up by the buddy allocator

Every step the KV memory in use is split into (slots):
  token_states            slots holding a token's K/V during this step
  reservation             reserved slots for tokens the request will still produce
  internal_fragmentation  reserved slots past the true length (never used); for paged, the
                          empty tail of each request's last block
  external_fragmentation  buddy rounding (block size - reservation) plus, while the head of
                          the queue cannot get a range, every free slot (unusable holes)
and the run's totals are reported as shares of the memory in use (they sum to 1).

  python -m experiments.memory_waste --dataset=sharegpt --num_requests=2000 \
      --out_dir=/tmp/memory_waste

The default capacity, 15728 slots, is OPT-13B's KV on a 40 GB A100 as in paper Fig. 1
(about 12 GiB of KV at 800 KB per token).
"""
from __future__ import annotations

import dataclasses
import pathlib

import numpy as np
from absl import app, flags

from experiments import paper
from experiments.paper import POLICIES
from experiments.progress import tracked
from experiments.results_file import write_results
from experiments.workload import DATASETS, draw_trace  # noqa: F401 (draw_trace: re-exported)
from paged_jax.kv_cache_manager import KVCacheManager
from paged_jax.request import Request
from paged_jax.baselines import ContiguousKV, next_pow2, orca_max, orca_oracle, orca_pow2
from paged_jax.sampling_params import SamplingParams
from paged_jax.scheduler import Scheduler

FLAGS = flags.FLAGS
flags.DEFINE_enum("dataset", "sharegpt", ["sharegpt", "alpaca"], "which length distribution")
flags.DEFINE_integer("num_requests", 2000, "requests in the trace (all arrive at t=0)")
flags.DEFINE_integer("block_size", 16, "paged KV block size (tokens)")
flags.DEFINE_integer("kv_tokens", 15728, "KV capacity in token slots (OPT-13B on A100-40GB)")
flags.DEFINE_integer("max_model_len", 2048, "longest sequence; Orca (Max) reserves this")
flags.DEFINE_integer("max_num_seqs", 256, "scheduler: most running requests")
flags.DEFINE_integer("max_num_batched_tokens", 0,
                     "scheduler token budget (0: max(2048, max_model_len))")
flags.DEFINE_integer("seed", 0, "trace seed")
flags.DEFINE_string("out_dir", "/tmp/memory_waste", "results.json and memory_waste.png go here")

CATEGORIES = ("token_states", "reservation", "internal_fragmentation", "external_fragmentation")
PAPER, PAPER_BATCH = paper.FIG2, paper.BATCH


def make_requests(trace: list[tuple[int, int]]) -> list[Request]:
    return [Request(f"r{i}", [0] * p, SamplingParams(max_tokens=o, ignore_eos=True), p + o, 0)
            for i, (p, o) in enumerate(trace)]


# ---- simulation -----------------------------------------------------------------------------

@dataclasses.dataclass
class Tally:
    slots: dict = dataclasses.field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0))
    steps: int = 0
    running: int = 0  # summed over steps

    def shares(self) -> dict[str, float]:
        total = sum(self.slots.values())
        return {k: v / total for k, v in self.slots.items()}


def _held(req: Request, in_batch: set[str]) -> int:
    """Tokens whose K/V sit in the cache while this step runs."""
    return req.num_tokens if req.request_id in in_batch else req.num_computed_tokens


def _sample_paged(sched: Scheduler, kv: KVCacheManager, in_batch: set[str], t: Tally) -> None:
    held = sum(_held(r, in_batch) for r in sched.running)
    t.slots["token_states"] += held
    t.slots["internal_fragmentation"] += kv.pool.num_used * kv.block_size - held


def _sample_orca(sched: Scheduler, kv: ContiguousKV, in_batch: set[str], t: Tally) -> None:
    for req in sched.running:
        r, held, true_len = kv.ranges[req.request_id], _held(req, in_batch), req.max_total_tokens
        t.slots["token_states"] += held
        t.slots["reservation"] += min(r.reserved, true_len) - held
        t.slots["internal_fragmentation"] += max(0, r.reserved - true_len)
        t.slots["external_fragmentation"] += r.size - r.reserved
    if sched.waiting:
        head = sched.waiting[0]
        if not kv.can_admit(max(head.num_tokens, sched.reservation(head))):
            t.slots["external_fragmentation"] += kv.buddy.num_slots - kv.buddy.allocated_slots


def simulate(policy: str, trace: list[tuple[int, int]], *, kv_tokens: int, block_size: int,
             max_model_len: int, max_num_seqs: int,
             max_num_batched_tokens: int) -> tuple[Tally, int]:
    """Run the trace to completion under one policy; returns the tally and the preemptions."""
    if policy == "paged":
        kv = KVCacheManager(kv_tokens // block_size + 1, block_size)  # + the reserved block 0
        sched, sample = Scheduler(kv, max_num_seqs, max_num_batched_tokens), _sample_paged
    else:
        reserve = {"orca_max": orca_max(max_model_len), "orca_pow2": orca_pow2(max_model_len),
                   "orca_oracle": orca_oracle()}[policy]
        kv = ContiguousKV(kv_tokens, max_block=next_pow2(max_model_len))
        sched = Scheduler(kv, max_num_seqs, max_num_batched_tokens, reservation=reserve)
        sample = _sample_orca
    for req in make_requests(trace):
        sched.add(req)
    tally = Tally()
    while sched.has_unfinished():
        batch = sched.schedule()
        if batch is None:
            raise RuntimeError(f"{policy}: the head request can never be admitted "
                               f"({kv_tokens} KV slots, max_model_len {max_model_len})")
        sample(sched, kv, {r.request_id for r in batch.requests}, tally)
        tally.steps += 1
        tally.running += len(sched.running)
        sched.dispatched(batch)  # as LLMEngine.step
        sched.update_from_output(batch, [[0]] * len(batch.requests))
    return tally, sched.num_preemptions


# ---- report ---------------------------------------------------------------------------------

def run(dataset: str, num_requests: int, block_size: int, kv_tokens: int, max_model_len: int,
        seed: int, out_dir: str, max_num_seqs: int = 256, max_num_batched_tokens: int = 0) -> dict:
    budget = max_num_batched_tokens or max(2048, max_model_len)
    trace = draw_trace(dataset, num_requests, seed, max_model_len)
    results = {"dataset": dataset, "policies": {}, "stats": {}, "config": {
        "num_requests": num_requests, "block_size": block_size, "kv_tokens": kv_tokens,
        "max_model_len": max_model_len, "max_num_seqs": max_num_seqs,
        "max_num_batched_tokens": budget, "seed": seed, "sigma": DATASETS[dataset][2],
        "mean_prompt": float(np.mean([p for p, _ in trace])),
        "mean_output": float(np.mean([o for _, o in trace]))}}
    for policy in tracked(POLICIES, "memory waste by policy"):  # one step per simulated run
        tally, preemptions = simulate(policy, trace, kv_tokens=kv_tokens, block_size=block_size,
                                      max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                                      max_num_batched_tokens=budget)
        results["policies"][policy] = tally.shares()
        results["stats"][policy] = {"steps": tally.steps, "preemptions": preemptions,
                                    "mean_running": tally.running / tally.steps}
    results["paper"] = {"fig13_mean_batched_requests": PAPER_BATCH[dataset]}
    if dataset == "sharegpt":
        results["paper"]["fig2"] = PAPER
    out = write_results(out_dir, results)
    plot(results, out / "memory_waste.png")
    print(table(results))
    return results


def table(results: dict) -> str:
    paper = results["paper"].get("fig2", {})
    paper_batch = results["paper"]["fig13_mean_batched_requests"]
    lines = [f"KV memory in use, {results['dataset']} "
             f"(mean prompt {results['config']['mean_prompt']:.1f}, "
             f"output {results['config']['mean_output']:.1f}): ours % (paper %)",
             f"{'policy':<12}" + "".join(f"{c[:13]:>18}" for c in CATEGORIES) + f"{'batch':>15}"]
    for policy, shares in results["policies"].items():
        cells = []
        for c in CATEGORIES:
            ref = paper.get(policy, {}).get(c)
            paper_cell = f" ({100 * ref:5.1f})" if ref is not None else ""
            cells.append(f"{100 * shares[c]:6.1f}" + paper_cell)
        batch = f"{results['stats'][policy]['mean_running']:5.1f}"
        batch += f" ({paper_batch[policy]:6.2f})"
        lines.append(f"{policy:<12}" + "".join(f"{c:>18}" for c in cells) + f"{batch:>15}")
    return "\n".join(lines)


def plot(results: dict, path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = ("#4c9a5a", "#f2c14e", "#e07a5f", "#8d99ae")
    labels = ("Token states", "Reservation", "Internal frag.", "External frag. & others")
    paper = results["paper"].get("fig2", {})
    bars = []  # (label, shares)
    for policy, shares in results["policies"].items():
        bars.append((f"{policy}\nours", shares))
        if policy in paper:
            bars.append((f"{policy}\npaper", paper[policy]))
    fig, ax = plt.subplots(figsize=(1.2 * len(bars) + 1, 4.5))
    for i, (_, shares) in enumerate(bars):
        bottom = 0.0
        for c, color, label in zip(CATEGORIES, colors, labels):
            v = 100 * shares[c]
            ax.bar(i, v, bottom=bottom, color=color, edgecolor="black", linewidth=0.5,
                   hatch="//" if "paper" in bars[i][0] else None, label=label if i == 0 else None)
            if v >= 4:
                ax.text(i, bottom + v / 2, f"{v:.1f}", ha="center", va="center", fontsize=8,
                        bbox={"facecolor": "white", "alpha": 0.8, "linewidth": 0, "pad": 1})
            bottom += v
    ax.set_xticks(range(len(bars)), [b for b, _ in bars], fontsize=8)
    ax.set_ylabel("KV cache usage (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"KV memory breakdown, {results['dataset']} (hatched: paper Fig. 2)")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv):
    del argv
    run(FLAGS.dataset, FLAGS.num_requests, FLAGS.block_size, FLAGS.kv_tokens,
        FLAGS.max_model_len, FLAGS.seed, FLAGS.out_dir, FLAGS.max_num_seqs,
        FLAGS.max_num_batched_tokens)


if __name__ == "__main__":
    app.run(main)
