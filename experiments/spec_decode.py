"""Speculative decoding with n-gram drafts against plain decoding, on a task that copies its
prompt (where prompt lookup pays), in the same process.

Each prompt asks the chat model (SmolLM2 by default) to repeat a paragraph word for word.
Both engines generate greedily, one request at a time (--batch_sizes=1: the latency case) and
all at once; we report output tokens per second, the speedup, the share of drafted tokens the
model kept, and how many greedy outputs are identical between the two runs (the drafted
run verifies with the ragged prefill path, the plain one decodes with the decode path, so a
near-tie may round differently). The paper has no speculative decoding; vLLM's own
prompt-lookup benchmarks are on GPUs.

  python -m experiments.spec_decode --out_dir=/tmp/spec_decode
"""
from __future__ import annotations

import time

from absl import app, flags

from experiments.progress import progress
from experiments.results_file import publish

FLAGS = flags.FLAGS

# Written for this experiment: plain prose with no rare words, so that a 135M model can copy it.
PARAGRAPHS = [
    "The river runs past the old mill and under the stone bridge. In the spring the water is "
    "high and fast, and the children stay away from the bank. In the summer it is low and "
    "slow, and they wade across to the island to look for frogs.",
    "To make bread, mix flour, water, salt and yeast in a large bowl. Knead the dough for ten "
    "minutes, then cover it and let it rise for an hour. Shape it into a loaf, let it rise "
    "again, and bake it in a hot oven until the crust is brown.",
    "The library opens at nine in the morning and closes at six in the evening. Books can be "
    "borrowed for three weeks and renewed twice. Late books cost ten cents a day, and lost "
    "books must be paid for in full.",
    "Our team meets every Monday to plan the week. Each person says what they finished last "
    "week, what they will work on next, and what is blocking them. The meeting should take no "
    "more than thirty minutes.",
]


def copy_prompts(tokenizer, n: int) -> list[dict]:
    from paged_jax.tokenizer import apply_chat_template

    return [{"prompt_token_ids": apply_chat_template(tokenizer, [{
        "role": "user", "content": "Repeat the following text exactly, word for word:\n\n"
        + PARAGRAPHS[i % len(PARAGRAPHS)]}])} for i in range(n)]


def run(model, *, num_prompts: int, max_tokens: int, k: int, batch_sizes: list[int],
        attention_backend: str = "auto", max_model_len: int = 1024,
        precompile: bool = True) -> dict:
    from paged_jax import LLM, SamplingParams

    common = dict(max_model_len=max_model_len, precompile=precompile,
                  attention_backend=attention_backend)
    engines = {"plain": LLM(model, **common),
               "ngram": LLM(model, speculative_method="ngram", num_speculative_tokens=k,
                            **common)}
    prompts = copy_prompts(engines["plain"].get_tokenizer(), num_prompts)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    out = {}
    # Every request of every (batch size, engine) run; updated once per generate call.
    bar = progress(len(batch_sizes) * len(engines) * len(prompts), "spec decode", unit="req")
    for batch in batch_sizes:
        runs = {}
        for name, llm in engines.items():
            bar.set_postfix_str(f"batch {batch} {name}")
            llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=8),
                         use_tqdm=False)  # warm-up
            before = llm.llm_engine.snapshot()
            start = time.perf_counter()
            outs = []
            for i in range(0, len(prompts), batch):
                chunk = prompts[i:i + batch]
                outs += llm.generate(chunk, params, use_tqdm=False)
                bar.update(len(chunk))
            seconds = time.perf_counter() - start
            after = llm.llm_engine.snapshot()
            tokens = [o.outputs[0].token_ids for o in outs]
            runs[name] = {"seconds": seconds, "tokens": tokens,
                          "tokens_per_s": sum(map(len, tokens)) / seconds,
                          "drafted": after.spec_draft_tokens - before.spec_draft_tokens,
                          "kept": after.spec_accepted_tokens - before.spec_accepted_tokens}
        same = sum(a == b for a, b in zip(runs["plain"].pop("tokens"),
                                          runs["ngram"].pop("tokens")))
        ngram = runs["ngram"]
        out[str(batch)] = {**runs, "speedup": runs["plain"]["seconds"] / ngram["seconds"],
                           "acceptance": ngram["kept"] / max(1, ngram["drafted"]),
                           "identical_outputs": same, "num_prompts": len(prompts)}
    bar.close()
    return out


def report(results: dict, k: int) -> str:
    lines = [f"n-gram speculative decoding (k = {k}) against plain decoding, copying task:",
             f"  {'batch':>5} {'plain tok/s':>11} {'ngram tok/s':>11} {'speedup':>7} "
             f"{'kept':>6} {'identical':>9}"]
    for batch, r in results.items():
        lines.append(f"  {batch:>5} {r['plain']['tokens_per_s']:11.1f} "
                     f"{r['ngram']['tokens_per_s']:11.1f} {r['speedup']:6.2f}x "
                     f"{r['acceptance']:6.1%} {r['identical_outputs']:>4} of {r['num_prompts']}")
    lines.append("  (the paper has no speculative decoding)")
    return "\n".join(lines)


def define_flags() -> None:
    flags.DEFINE_string("model", None, "HF folder or .gguf (None: the embedded SmolLM2)")
    flags.DEFINE_integer("num_prompts", 8, "prompts (the paragraphs in turn)")
    flags.DEFINE_integer("max_tokens", 96, "tokens generated per prompt")
    flags.DEFINE_integer("num_speculative_tokens", 4, "drafts per step at most")
    flags.DEFINE_list("batch_sizes", ["1", "8"], "requests generated together")
    flags.DEFINE_enum("attention_backend", "auto", ["auto", "xla", "pallas", "cpu"],
                      "the engines' attention backend")
    flags.DEFINE_string("out_dir", "/tmp/spec_decode", "results.json goes here")


def main(argv):
    del argv
    results = run(FLAGS.model, num_prompts=FLAGS.num_prompts, max_tokens=FLAGS.max_tokens,
                  k=FLAGS.num_speculative_tokens,
                  batch_sizes=[int(b) for b in FLAGS.batch_sizes],
                  attention_backend=FLAGS.attention_backend)
    publish(FLAGS.out_dir, results, report(results, FLAGS.num_speculative_tokens))


if __name__ == "__main__":
    define_flags()
    app.run(main)
