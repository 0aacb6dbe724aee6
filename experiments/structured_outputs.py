"""What structured outputs cost: throughput with 0%, 50% and 100% of the requests held to a
JSON schema, and the host milliseconds per step spent on their bitmasks.

SmolLM2 (the embedded model) by default; --num_requests requests of --prompt_len random
prompt tokens run together (max_num_seqs = num_requests). Constrained requests follow a
small JSON schema (compact, as --disable-any-whitespace writes it) and end when their JSON
closes (CONSTRAINED_MAX_TOKENS leaves room for the longest); unconstrained ones generate
--max_tokens tokens. Throughput is output tokens per second of the whole run; the bitmask cost is the engine's "build" phase per step (the
step's arrays; a constrained row's bitmask is computed there) less that of the run with no
constrained request.

  python -m experiments.structured_outputs --out_dir=/tmp/structured_outputs
"""
from __future__ import annotations

import json
import time

import numpy as np
from absl import app, flags

from experiments.progress import tracked
from experiments.results_file import publish

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "model (default: the embedded SmolLM2)")
flags.DEFINE_integer("num_requests", 64, "requests, all running at once")
flags.DEFINE_integer("prompt_len", 32, "random prompt tokens per request")
flags.DEFINE_integer("max_tokens", 48, "output tokens of an unconstrained request")
flags.DEFINE_list("fractions", ["0", "0.5", "1"], "shares of constrained requests")
flags.DEFINE_string("out_dir", "results/structured_outputs", "where results.json goes")

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3}},
    "required": ["name", "age", "tags"], "additionalProperties": False}
# Room for the longest JSON the schema allows (about 40 tokens), so none is cut short
CONSTRAINED_MAX_TOKENS = 96


def run_mix(llm, fraction: float) -> dict:
    from paged_jax import SamplingParams, StructuredOutputsParams

    engine = llm.llm_engine
    rng = np.random.default_rng(0)
    vocab = engine.model.config.vocab_size
    n = FLAGS.num_requests
    constrained = int(round(fraction * n))
    so = StructuredOutputsParams(json=SCHEMA)
    prompts = [{"prompt_token_ids": rng.integers(100, vocab, FLAGS.prompt_len).tolist()}
               for _ in range(n)]
    params = [SamplingParams(temperature=0.8, seed=i,
                             max_tokens=CONSTRAINED_MAX_TOKENS if i < constrained
                             else FLAGS.max_tokens,
                             ignore_eos=i >= constrained,
                             structured_outputs=so if i < constrained else None)
              for i in range(n)]
    before = engine.snapshot()
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    after = engine.snapshot()
    steps = after.num_steps - before.num_steps
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    valid = 0
    for o in outs[:constrained]:
        try:
            json.loads(o.outputs[0].text)
            valid += 1
        except json.JSONDecodeError:
            pass
    build = (after.step_seconds["build"] - before.step_seconds["build"]) / steps * 1e3
    return dict(fraction=fraction, constrained=constrained, seconds=seconds, steps=steps,
                output_tokens=tokens, tokens_per_s=tokens / seconds, build_ms_per_step=build,
                valid_json=valid,
                finished_by_length=sum(o.outputs[0].finish_reason == "length"
                                       for o in outs[:constrained]))


def main(argv):
    del argv
    from paged_jax import LLM

    llm = LLM(FLAGS.model, max_num_seqs=FLAGS.num_requests,
              max_model_len=FLAGS.prompt_len + max(FLAGS.max_tokens,
                                                   CONSTRAINED_MAX_TOKENS) + 16,
              disable_any_whitespace=True)
    # Compile the step shapes and the schema before anything is timed.
    run_mix(llm, 0.5)
    results = {"num_requests": FLAGS.num_requests, "mixes": []}
    for fraction in tracked([float(f) for f in FLAGS.fractions], "mixes"):
        results["mixes"].append(run_mix(llm, fraction))
    base = next((m for m in results["mixes"] if m["constrained"] == 0), None)
    lines = []
    for m in results["mixes"]:
        extra = ""
        if base is not None:
            m["throughput_vs_unconstrained"] = m["tokens_per_s"] / base["tokens_per_s"]
            m["bitmask_ms_per_step"] = m["build_ms_per_step"] - base["build_ms_per_step"]
            extra = (f"; {m['throughput_vs_unconstrained']:.2f}x the unconstrained "
                     f"throughput; bitmasks ~{m['bitmask_ms_per_step']:.2f} ms/step")
        lines.append(f"{m['fraction']:4.0%} constrained ({m['constrained']} of "
                     f"{FLAGS.num_requests}; {m['valid_json']} valid JSON, "
                     f"{m['finished_by_length']} cut by max_tokens): "
                     f"{m['tokens_per_s']:6.1f} tokens/s, {m['steps']} steps, build "
                     f"{m['build_ms_per_step']:.2f} ms/step{extra}")
    lines.append("issue 15's target: 100% constrained costs under 15% of the unconstrained "
                 "throughput")
    publish(FLAGS.out_dir, results, "\n".join(lines))


if __name__ == "__main__":
    app.run(main)
