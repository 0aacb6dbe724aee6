"""lm-eval through the server against lm-eval's own hf backend on the same checkpoint: the
loglikelihood path (completions with echo and logprobs) checked as an evaluation harness
uses it.

Starts `python -m paged_jax serve` on the model (default: the embedded SmolLM2, converted
to a Hugging Face folder so that transformers reads the same weights), runs the local
multiple-choice task of tests/server/lm_eval_task (no dataset download) with lm-eval's
local-completions backend against it and with its hf backend in float32, and reports the
largest per-choice loglikelihood difference and both accuracies.

  python -m experiments.lm_eval_parity --out_dir=/tmp/lm_eval_parity
"""
from __future__ import annotations

import os
import pathlib
import time

from absl import app, flags

from experiments.live_server import KEY, serve
from experiments.results_file import publish

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "a Hugging Face folder (default: the embedded SmolLM2)")
flags.DEFINE_integer("port", 8431, "the server's loopback port")
flags.DEFINE_string("out_dir", "results/lm_eval_parity", "where results.json goes")

REPO = pathlib.Path(__file__).resolve().parents[1]
TASKS = REPO / "tests" / "server" / "lm_eval_task"
TASK = "paged_jax_tiny_mc"


def main(argv):
    del argv
    import lm_eval
    from lm_eval.tasks import TaskManager

    from paged_jax.weights import resolve_model

    model = str(resolve_model(FLAGS.model))
    proc = serve(model, FLAGS.port)
    os.chdir(REPO)  # the task's data_files are relative to the repository root
    os.environ["OPENAI_API_KEY"] = KEY
    manager = TaskManager(include_path=str(TASKS), include_defaults=False)
    args = {"local-completions": (f"model=m,base_url=http://127.0.0.1:{FLAGS.port}/v1/"
                                  f"completions,tokenizer={model},"
                                  "tokenizer_backend=huggingface,num_concurrent=1"),
            "hf": f"pretrained={model},dtype=float32,device=cpu"}
    runs, seconds = {}, {}
    try:
        for backend, model_args in args.items():
            start = time.perf_counter()
            runs[backend] = lm_eval.simple_evaluate(
                model=backend, model_args=model_args, tasks=[TASK], task_manager=manager,
                log_samples=True, bootstrap_iters=0)
            seconds[backend] = time.perf_counter() - start
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    api, hf = ([sorted(runs[b]["samples"][TASK], key=lambda s: s["doc_id"])
                for b in ("local-completions", "hf")])
    diffs = [abs(a_ll - h_ll) for a, h in zip(api, hf)
             for (a_ll, _), (h_ll, _) in zip(a["filtered_resps"], h["filtered_resps"])]
    greedy_same = all(ag == hg for a, h in zip(api, hf)
                      for (_, ag), (_, hg) in zip(a["filtered_resps"], h["filtered_resps"]))
    results = {
        "model": model, "task": TASK, "docs": len(api), "choices": len(diffs),
        "max_abs_loglikelihood_diff": max(diffs), "is_greedy_identical": greedy_same,
        "acc": {b: runs[b]["results"][TASK]["acc,none"] for b in runs},
        "acc_norm": {b: runs[b]["results"][TASK]["acc_norm,none"] for b in runs},
        "seconds": seconds,
    }
    report = (f"{TASK} on {pathlib.Path(model).name}: {len(api)} docs, {len(diffs)} choices; "
              f"max |loglikelihood(server) - loglikelihood(hf)| = {max(diffs):.2e}; "
              f"is_greedy identical: {greedy_same}; acc server {results['acc']['local-completions']}"
              f" / hf {results['acc']['hf']}; acc_norm server "
              f"{results['acc_norm']['local-completions']} / hf {results['acc_norm']['hf']}")
    publish(FLAGS.out_dir, results, report)


if __name__ == "__main__":
    app.run(main)
