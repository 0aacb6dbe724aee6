"""Host work per engine step: where a decode step's wall time goes when the device work is small.

On a GPU a small model's decode step takes a few milliseconds, so the host's share (scheduling,
building the step's arrays, applying the sampled tokens: stop checks, detokenizing, outputs)
decides how long the device waits between steps. This measures it on two models:

  tiny     one layer, hidden 64, SmolLM2's tokenizer, 256 running requests (device work small)
  smollm2  the embedded SmolLM2-135M, 64 running requests

For each, after every request is admitted, --steps decode steps are timed; the engine's own
phase timers (LLMEngine.snapshot().step_seconds) split each step into schedule, build, device
(dispatch, run, and the wait for the sampled tokens) and update. `--stream_text` makes every
step detokenize, as the server does; `--output_kind=final_only` builds outputs only for
finished requests, as LLM.generate asks.

Each model runs with synchronous steps and with asynchronous scheduling (--modes). With
synchronous steps all host work sits between device steps. Asynchronously, the next step is
scheduled and dispatched while one runs, and the tokens applied while the next runs.

On this CPU the "device" is the same two cores, so overlapped host work competes with XLA's
threads and the real runs cannot show what a GPU would leave idle. --device_ms adds runs on a
simulated device (SimulatedDevice): the engine, scheduler and outputs are the real ones, the
model step is a device clock on which each step takes exactly that many milliseconds, queued
behind the one before as on a GPU stream. Whatever wall time a step takes beyond it is host
work the device waited for (the host time left exposed), and its share of the wall time is the
device's idle fraction. No model runs, so these take seconds. (Asynchronously the first timed
step's device work began in the call before the window, so the mean can fall short of the
device step by up to 1/--steps of it: an exposed time a little below zero.)

  python -m experiments.host_overhead --out_dir=/tmp/host_overhead
"""
from __future__ import annotations

import gc
import pathlib
import tempfile
import time

import numpy as np
from absl import app, flags

from experiments.progress import tracked
from experiments.results_file import publish

FLAGS = flags.FLAGS

PHASES = ("schedule", "build", "device", "update")


def tiny_model_dir(root: pathlib.Path) -> pathlib.Path:
    """One Llama layer of hidden size 64 with SmolLM2's tokenizer, random weights (numpy and
    safetensors; no torch)."""
    import transformers
    from safetensors.numpy import save_file

    from paged_jax.weights import resolve_model

    smollm2 = resolve_model(None)
    folder = root / "tiny"
    folder.mkdir()
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=49152, max_position_embeddings=2048,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(folder)
    rng = np.random.default_rng(0)

    def w(*shape):
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    tensors = {"model.embed_tokens.weight": w(49152, 64), "lm_head.weight": w(49152, 64),
               "model.norm.weight": np.ones(64, np.float32)}
    layer = "model.layers.0."
    tensors.update({
        layer + "input_layernorm.weight": np.ones(64, np.float32),
        layer + "post_attention_layernorm.weight": np.ones(64, np.float32),
        layer + "self_attn.q_proj.weight": w(64, 64), layer + "self_attn.k_proj.weight": w(32, 64),
        layer + "self_attn.v_proj.weight": w(32, 64), layer + "self_attn.o_proj.weight": w(64, 64),
        layer + "mlp.gate_proj.weight": w(128, 64), layer + "mlp.up_proj.weight": w(128, 64),
        layer + "mlp.down_proj.weight": w(64, 128)})
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (smollm2 / name).is_file():
            (folder / name).write_bytes((smollm2 / name).read_bytes())
    return folder


class SimulatedDevice:
    """Stands in for the engine's ModelRunner: a device on which every step takes step_ms.
    dispatch queues the step behind the one running and returns at once, as a GPU stream
    does; fetch sleeps until the step's end and returns random tokens. Everything else is
    the real runner's."""

    def __init__(self, runner, step_ms: float, vocab: int):
        self._runner = runner
        self._step_s = step_ms / 1e3
        self._vocab = vocab
        self._free_at = 0.0  # when the last queued step ends
        self._rng = np.random.default_rng(0)

    def __getattr__(self, name):
        return getattr(self._runner, name)

    def dispatch(self, inputs, sampling, prev=None):
        self._free_at = max(time.perf_counter(), self._free_at) + self._step_s
        return self._free_at

    def fetch(self, done_at: float, num_rows: int, top: bool) -> dict:
        wait = done_at - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        return {"tokens": self._rng.integers(100, self._vocab, num_rows).astype(np.int32),
                "logprob": np.zeros(num_rows, np.float32),
                "rank": np.ones(num_rows, np.int32)}


def measure(model: str | None, num_requests: int, async_scheduling: bool,
            device_ms: float | None = None, steps: int = 40, prompt_len: int = 16,
            stream_text: bool = False, output_kind: str = "cumulative",
            attention_backend: str = "auto", gc_freeze: bool = True) -> dict:
    """device_ms: None for the real model, else a SimulatedDevice's step time. gc_freeze:
    move everything alive before the timed steps out of the cyclic collector's reach, as
    `paged-jax serve` does once its engine is built (gc.freeze)."""
    from paged_jax import LLM, SamplingParams

    warmup = 5
    max_len = prompt_len + steps + warmup + 8
    llm = LLM(model, max_num_seqs=num_requests, max_model_len=max_len,
              max_num_batched_tokens=max(max_len, num_requests * prompt_len),
              num_kv_blocks=num_requests * -(-max_len // 16) + 1,
              attention_backend=attention_backend,
              async_scheduling=async_scheduling)  # compiles the shapes it meets
    engine = llm.llm_engine
    engine.stream_text = stream_text
    rng = np.random.default_rng(0)
    vocab = engine.model.config.vocab_size
    if device_ms is not None:
        engine.runner = SimulatedDevice(engine.runner, device_ms, vocab)
    for i in range(num_requests):
        engine.add_request(f"r{i}", {"prompt_token_ids": rng.integers(
            100, vocab, prompt_len).tolist()}, SamplingParams(
            temperature=0.8, seed=i, max_tokens=steps + warmup + 4, ignore_eos=True,
            output_kind=output_kind))
    while engine.snapshot().num_waiting:  # admit every request (prefill steps)
        engine.step()
    for _ in range(warmup):
        engine.step()
    if gc_freeze:
        gc.collect()
        gc.freeze()
    before, compiled = engine.snapshot(), engine.runner.num_compiled
    assert before.num_running == num_requests, before
    walls = []
    for _ in tracked(range(steps), f"{num_requests} requests", unit="step"):
        start = time.perf_counter()
        engine.step()
        walls.append(time.perf_counter() - start)
    after = engine.snapshot()
    # every one ran a decode (asynchronously, each applied the one before)
    assert after.num_steps - before.num_steps == steps
    assert engine.runner.num_compiled == compiled  # no compile inside the timed steps
    per_step = {p: (after.step_seconds[p] - before.step_seconds[p]) / steps * 1e3
                for p in PHASES}
    host = per_step["schedule"] + per_step["build"] + per_step["update"]
    engine.abort_request([f"r{i}" for i in range(num_requests)])
    while engine.has_unfinished_requests():  # the step still in flight
        engine.step()
    gc.unfreeze()  # (this engine may go)
    wall = float(np.mean(walls) * 1e3)
    simulated = {} if device_ms is None else dict(
        device_ms=device_ms, exposed_host_ms=wall - device_ms,
        device_idle_fraction=max(0.0, 1 - device_ms / wall))
    return dict(num_requests=num_requests, steps=steps, backend=engine.backend,
                async_scheduling=async_scheduling, **simulated,
                ms_per_step=per_step, host_ms_per_step=host,
                wall_ms_per_step=float(np.mean(walls) * 1e3),
                wall_ms_per_step_median=float(np.median(walls) * 1e3),
                host_share_of_wall=host / (np.mean(walls) * 1e3))


def main(argv):
    del argv
    results = {"stream_text": FLAGS.stream_text, "output_kind": FLAGS.output_kind,
               "gc_freeze": FLAGS.gc_freeze}
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in FLAGS.models:
            if name == "tiny":
                model, n = str(tiny_model_dir(pathlib.Path(tmp))), FLAGS.tiny_requests
            elif name == "smollm2":
                model, n = None, FLAGS.smollm2_requests
            else:
                raise app.UsageError(f"unknown model {name!r}; known: tiny, smollm2")
            results[name] = {}
            for device in FLAGS.device_ms:
                device_ms = None if device == "real" else float(device)
                label = "real" if device_ms is None else f"sim {device_ms:g} ms"
                runs = results[name][device] = {}
                for mode in FLAGS.modes:
                    if mode not in ("sync", "async"):
                        raise app.UsageError(f"unknown mode {mode!r}; known: sync, async")
                    r = runs[mode] = measure(
                        model, n, mode == "async", device_ms, FLAGS.steps, FLAGS.prompt_len,
                        FLAGS.stream_text, FLAGS.output_kind, FLAGS.attention_backend,
                        FLAGS.gc_freeze)
                    ms = r["ms_per_step"]
                    lines.append(
                        f"{name:8s} {label:10s} {mode:5s} {r['num_requests']:4d} requests: "
                        f"wall {r['wall_ms_per_step']:7.2f} ms/step; host "
                        f"{r['host_ms_per_step']:6.2f} ms (schedule {ms['schedule']:.2f}, "
                        f"build {ms['build']:.2f}, update {ms['update']:.2f}); device "
                        f"(dispatch and wait) {ms['device']:.2f}"
                        + ("" if device_ms is None else
                           f"; exposed host {r['exposed_host_ms']:.2f} ms, device idle "
                           f"{r['device_idle_fraction']:.0%}"))
                if "sync" in runs and "async" in runs:
                    runs["async_wall_vs_sync"] = (runs["async"]["wall_ms_per_step"]
                                                  / runs["sync"]["wall_ms_per_step"])
                    lines.append(f"{name:8s} {label:10s} async/sync wall "
                                 f"{runs['async_wall_vs_sync']:.2f}")
    lines.append("issue 18's target: host < 1 ms/step at 256 requests outside the overlapped "
                 "part (exposed host on a simulated device); asynchronous wall time no worse "
                 "than synchronous")
    publish(FLAGS.out_dir, results, "\n".join(lines))


def define_flags() -> None:
    flags.DEFINE_list("models", ["tiny", "smollm2"], "which of tiny, smollm2")
    flags.DEFINE_integer("tiny_requests", 256, "running requests on the tiny model")
    flags.DEFINE_integer("smollm2_requests", 64, "running requests on SmolLM2")
    flags.DEFINE_integer("prompt_len", 16, "tokens per prompt")
    flags.DEFINE_integer("steps", 40, "decode steps timed (after a warm-up of 5)")
    flags.DEFINE_bool("stream_text", False, "detokenize every step, as the server does")
    flags.DEFINE_enum("output_kind", "cumulative", ["cumulative", "final_only"],
                      "cumulative: an output per request per step (the server); final_only: "
                      "one when it finishes (LLM.generate)")
    flags.DEFINE_string("attention_backend", "auto", "attention backend")
    flags.DEFINE_list("modes", ["sync", "async"], "sync: synchronous steps; async: "
                      "asynchronous scheduling")
    flags.DEFINE_list("device_ms", ["real", "1", "2", "4"], "real: the model on JAX's device; a "
                      "number: a simulated device whose every step takes that many ms")
    flags.DEFINE_bool("gc_freeze", True, "gc.freeze() before the timed steps, as serve does "
                      "(the cyclic collector then leaves the engine's heap alone)")
    flags.DEFINE_string("out_dir", "results/host_overhead", "where results.json goes")


if __name__ == "__main__":
    define_flags()
    app.run(main)
