"""Host cost of scheduling: milliseconds of Scheduler.schedule() per decode step.

The scheduler and the block bookkeeping are plain Python, run before every device step; on
a GPU a decode step of a small model takes a few milliseconds, so the host's share matters.
This drives the scheduler without a model (each scheduled request gets one fake token, as
LLMEngine.step would append a sampled one): --num_requests requests of --prompt_len distinct
prompt tokens are admitted in one prefill step, then --steps decode steps are timed, with
prefix caching on and off.

  python -m experiments.schedule_cost --out_dir=/tmp/schedule_cost
"""
from __future__ import annotations

import time

from absl import app, flags

from experiments.progress import tracked
from experiments.results_file import publish
from paged_jax.kv_cache_manager import KVCacheManager
from paged_jax.request import Request
from paged_jax.sampling_params import SamplingParams
from paged_jax.scheduler import Scheduler

FLAGS = flags.FLAGS


def decode_schedule_ms(num_requests: int, prompt_len: int, block_size: int, steps: int,
                       prefix_caching: bool) -> float:
    """Mean milliseconds of one decode step's schedule() with num_requests running."""
    blocks_each = -(-(prompt_len + steps + 1) // block_size)
    kv = KVCacheManager(num_requests * blocks_each + 1, block_size,
                        enable_caching=prefix_caching)
    sched = Scheduler(kv, num_requests, num_requests * prompt_len, mixed=True)
    for i in range(num_requests):
        prompt = [(i * 7919 + j) % 49152 for j in range(prompt_len)]  # no two share a block
        sched.add(Request(f"r{i}", prompt, SamplingParams(max_tokens=steps + 1),
                          prompt_len + steps + 1, seed=0))

    def step() -> int:
        batch = sched.schedule()
        sched.dispatched(batch)
        sched.update_from_output(batch, [[5]] * len(batch.requests))
        return len(batch.requests)

    if step() != num_requests:
        raise RuntimeError("not every request was admitted in the first step")
    start = time.perf_counter()
    rows = [step() for _ in range(steps)]
    seconds = time.perf_counter() - start
    if rows != [num_requests] * steps:  # every step decodes every request, none preempted
        raise RuntimeError(f"decode steps scheduled {sorted(set(rows))} rows, not {num_requests}")
    return seconds / steps * 1e3


def report(results: dict) -> str:
    lines = [f"Host cost of a decode step's schedule(): {results['num_requests']} running "
             f"requests of {results['prompt_len']} prompt tokens, block {results['block_size']}"]
    for mode in ("prefix_caching", "no_prefix_caching"):
        lines.append(f"  {mode:18s} {results[mode]:.2f} ms per step")
    return "\n".join(lines)


def define_flags() -> None:
    """Only when run as a script: tests import several experiments into one process."""
    flags.DEFINE_integer("num_requests", 256, "running requests (max_num_seqs)")
    flags.DEFINE_integer("prompt_len", 2000, "prompt tokens per request")
    flags.DEFINE_integer("block_size", 16, "KV block size")
    flags.DEFINE_integer("steps", 50, "decode steps timed")
    flags.DEFINE_string("out_dir", "/tmp/schedule_cost", "where results.json goes")


def main(argv):
    del argv
    results = dict(num_requests=FLAGS.num_requests, prompt_len=FLAGS.prompt_len,
                   block_size=FLAGS.block_size, steps=FLAGS.steps)
    # One step per mode, outside the timed decode steps.
    for mode, caching in tracked((("prefix_caching", True), ("no_prefix_caching", False)),
                                 "schedule cost by mode"):
        results[mode] = decode_schedule_ms(FLAGS.num_requests, FLAGS.prompt_len,
                                           FLAGS.block_size, FLAGS.steps, caching)
    publish(FLAGS.out_dir, results, report(results))


if __name__ == "__main__":
    define_flags()
    app.run(main)
