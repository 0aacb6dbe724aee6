"""Online serving benchmark against an OpenAI-compatible /v1/completions endpoint, with vLLM's
metric definitions (benchmarks/benchmark_serving.py).

Requests have ShareGPT- or Alpaca-like lengths: input and output lengths drawn from seeded
log-normals whose means are the paper's (ShareGPT 161.31 in / 337.99 out, Alpaca 19.31 /
58.45), times --length_scale (the CPU cannot serve full-length requests in reasonable time).
Prompts are random token ids, so input lengths are exact; ignore_eos makes every request
generate exactly its drawn output length. Arrivals are Poisson at --request_rate (inf: all at
t=0).

Metrics: request throughput, output and total tokens/s; mean/median/p99 of TTFT, TPOT
(= (latency - TTFT) / (output_len - 1)), ITL (gaps between streamed chunks) and E2E latency;
the paper's normalized latency (mean of latency / output_len); goodput = requests per second
meeting every SLO given (--slo_ttft_ms, --slo_tpot_ms).

    python experiments/serve_bench.py --launch_server --model /path/to/model \
        --server_args="--max-num-seqs 16 --precompile" --num_requests 64 --request_rate 4 \
        --dataset alpaca --out /tmp/serve_bench.json
    python experiments/serve_bench.py --base_url http://127.0.0.1:8000 --request_rate inf
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import os
import pathlib
import shlex
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
from absl import app, flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from progress import progress, tracked  # noqa: E402
from results_file import describe, machine  # noqa: E402
from workload import DATASETS, lognormal_lengths  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("base_url", "http://127.0.0.1:8000", "server to benchmark")
flags.DEFINE_string("model", None, "served model name (default: the server's first model); "
                    "with --launch_server, the model path to serve")
flags.DEFINE_string("api_key", None, "bearer token, if the server wants one")
flags.DEFINE_integer("num_requests", 64, "requests to send")
flags.DEFINE_float("request_rate", float("inf"), "Poisson arrival rate, requests/s (inf: all at once)")
flags.DEFINE_integer("max_concurrency", 0, "cap on requests in flight (0: none)")
flags.DEFINE_enum("dataset", "sharegpt", list(DATASETS), "whose length distribution")
flags.DEFINE_float("length_scale", 0.25, "multiplies the dataset's mean lengths (1 = paper)")
flags.DEFINE_float("length_sigma", 0.8, "sigma of the log-normal length distributions")
flags.DEFINE_integer("min_len", 4, "shortest input and output (vLLM's ShareGPT filter: 4)")
flags.DEFINE_integer("max_input_len", 1024, "longest input (vLLM's ShareGPT filter: 1024)")
flags.DEFINE_integer("max_model_len", 0, "context limit (0: the server's, from /v1/models)")
flags.DEFINE_list("token_id_range", ["1000", "20000"], "prompt token ids are drawn from [lo, hi)")
flags.DEFINE_float("temperature", 0.0, "sampling temperature")
flags.DEFINE_integer("seed", 0, "seeds lengths, prompts and arrivals")
flags.DEFINE_integer("num_warmup", 0, "requests sent (and not measured) before the run")
flags.DEFINE_float("slo_ttft_ms", None, "goodput SLO on time to first token")
flags.DEFINE_float("slo_tpot_ms", None, "goodput SLO on time per output token")
flags.DEFINE_string("out", "", "write results as JSON here")
flags.DEFINE_bool("launch_server", False, "start `python -m paged_jax serve` for the run")
flags.DEFINE_string("server_args", "", "extra arguments for the launched server")



@dataclasses.dataclass
class Result:
    input_len: int
    output_len: int = 0
    ok: bool = False
    error: str = ""
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = dataclasses.field(default_factory=list)

    @property
    def tpot(self) -> float | None:
        return (self.latency - self.ttft) / (self.output_len - 1) if self.output_len > 1 else None


def draw_lengths(rng: np.random.Generator, n: int, max_model_len: int):
    mean_in, mean_out = (m * FLAGS.length_scale for m in DATASETS[FLAGS.dataset][:2])
    lo, sigma = FLAGS.min_len, FLAGS.length_sigma
    inputs = lognormal_lengths(rng, mean_in, sigma, n, lo,
                               min(FLAGS.max_input_len, max_model_len - lo))
    outputs = np.minimum(lognormal_lengths(rng, mean_out, sigma, n, lo, None),
                         max_model_len - inputs)
    return inputs.tolist(), outputs.tolist()


async def send(client: httpx.AsyncClient, model: str, prompt: list[int],
               max_tokens: int) -> Result:
    result = Result(len(prompt))
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
            "temperature": FLAGS.temperature, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"{response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                now = time.perf_counter()
                if chunk.get("choices"):
                    if result.ttft == 0.0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                if chunk.get("usage"):
                    result.output_len = chunk["usage"]["completion_tokens"]
        result.latency = time.perf_counter() - start
        result.ok = result.output_len > 0
    except (httpx.HTTPError, ValueError) as err:
        result.error = f"{type(err).__name__}: {err}"
    return result


async def run(base_url: str, model: str | None) -> dict:
    headers = {"Authorization": f"Bearer {FLAGS.api_key}"} if FLAGS.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits,
                                 timeout=httpx.Timeout(None)) as client:
        card = (await client.get("/v1/models")).json()["data"][0]
        model = model or card["id"]
        max_model_len = FLAGS.max_model_len or card.get("max_model_len") or 2048
        rng = np.random.default_rng(FLAGS.seed)
        n = FLAGS.num_requests
        inputs, outputs = draw_lengths(rng, n + FLAGS.num_warmup, max_model_len)
        lo, hi = (int(x) for x in FLAGS.token_id_range)
        prompts = [rng.integers(lo, hi, size=k).tolist() for k in inputs]
        for i in tracked(range(FLAGS.num_warmup), "warm-up", unit="req"):
            await send(client, model, prompts[n + i], outputs[n + i])
        gaps = (np.zeros(n) if math.isinf(FLAGS.request_rate)
                else rng.exponential(1.0 / FLAGS.request_rate, n))
        before = await scrape(client)
        gate = asyncio.Semaphore(FLAGS.max_concurrency or n)
        bar = progress(n, "requests", unit="req")

        async def one(i: int) -> Result:
            async with gate:
                result = await send(client, model, prompts[i], outputs[i])
            bar.update()  # once per finished request, after its last timestamp
            return result

        start = time.perf_counter()
        tasks = []
        for i in range(n):
            if gaps[i] > 0:
                await asyncio.sleep(gaps[i])
            tasks.append(asyncio.create_task(one(i)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        bar.close()
        after = await scrape(client)
    summary = summarize(results, duration)
    summary["server_metrics_delta"] = {k: after[k] - before.get(k, 0.0) for k in after}
    summary["config"] = {"model": model, "max_model_len": max_model_len,
                         **{k: FLAGS[k].value for k in (
                             "num_requests", "request_rate", "max_concurrency", "dataset",
                             "length_scale", "length_sigma", "seed", "slo_ttft_ms",
                             "slo_tpot_ms", "temperature")}}
    return summary


async def scrape(client: httpx.AsyncClient) -> dict[str, float]:
    """The server's counters (paged_jax:*_total), to report preemptions and tokens per run."""
    try:
        text = (await client.get("/metrics")).text
    except httpx.HTTPError:
        return {}
    out = {}
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name.startswith("paged_jax:") and name.endswith("_total"):
            label = line.split('finished_reason="', 1)[1].split('"', 1)[0] if (
                "finished_reason" in line) else ""
            out[name + (f"[{label}]" if label else "")] = float(line.rsplit(" ", 1)[1])
    return out


def stats_ms(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "median": None, "p99": None}
    v = np.asarray(values) * 1000
    return {"mean": float(v.mean()), "median": float(np.median(v)),
            "p99": float(np.percentile(v, 99))}


def summarize(results: list[Result], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_len for r in ok)
    in_tokens = sum(r.input_len for r in ok)
    tpots = [r.tpot for r in ok if r.tpot is not None]

    def meets_slo(r: Result) -> bool:
        return ((FLAGS.slo_ttft_ms is None or r.ttft * 1000 <= FLAGS.slo_ttft_ms)
                and (FLAGS.slo_tpot_ms is None or r.tpot is None
                     or r.tpot * 1000 <= FLAGS.slo_tpot_ms))

    slo_given = FLAGS.slo_ttft_ms is not None or FLAGS.slo_tpot_ms is not None
    return {
        "duration_s": duration,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
        "goodput": sum(map(meets_slo, ok)) / duration if slo_given else None,
        "ttft_ms": stats_ms([r.ttft for r in ok]),
        "tpot_ms": stats_ms(tpots),
        "itl_ms": stats_ms([x for r in ok for x in r.itl]),
        "e2el_ms": stats_ms([r.latency for r in ok]),
        "normalized_latency_s_per_token": (float(np.mean([r.latency / r.output_len for r in ok]))
                                           if ok else None),
    }


def report(s: dict) -> None:
    mean_in, mean_out = DATASETS[FLAGS.dataset][:2]
    print(f"{'=' * 18} Serving Benchmark Result {'=' * 18}")
    rows = [("Successful requests", s["completed"]), ("Failed requests", s["failed"]),
            ("Benchmark duration (s)", s["duration_s"]),
            ("Total input tokens", s["total_input_tokens"]),
            ("Total generated tokens", s["total_output_tokens"]),
            ("Request throughput (req/s)", s["request_throughput"]),
            ("Output token throughput (tok/s)", s["output_throughput"]),
            ("Total token throughput (tok/s)", s["total_token_throughput"])]
    if s["goodput"] is not None:
        rows.append(("Request goodput (req/s)", s["goodput"]))
    for key, title in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"),
                       ("e2el_ms", "E2EL")):
        for stat in ("mean", "median", "p99"):
            rows.append((f"{stat.capitalize()} {title} (ms)", s[key][stat]))
    rows.append(("Normalized latency (s/token)", s["normalized_latency_s_per_token"]))
    for name, value in rows:
        print(f"{name:<40}{value:>20.2f}" if isinstance(value, float) else
              f"{name:<40}{str(value):>20}")
    preempted = s["server_metrics_delta"].get("paged_jax:num_preemptions_total")
    if preempted is not None:
        print(f"{'Preemptions (server)':<40}{preempted:>20.0f}")
    print(f"paper workload ({FLAGS.dataset}): mean input {mean_in}, output {mean_out} tokens; "
          f"this run x{FLAGS.length_scale}")
    for e in s["errors"]:
        print("error:", e)


def launch_server() -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    repo = pathlib.Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "paged_jax", "serve", "--port", str(port), "--no-access-log"]
    if FLAGS.model:
        cmd += ["--model", FLAGS.model]
    cmd += shlex.split(FLAGS.server_args)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(repo)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    print("launching:", shlex.join(cmd), flush=True)
    process = subprocess.Popen(cmd, env=env, cwd=repo)
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode}")
        try:
            if httpx.get(base_url + "/health", timeout=2).status_code == 200:
                return process, base_url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.terminate()
    raise SystemExit("the server did not become healthy")


def main(argv):
    del argv
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one line per request
    process = None
    base_url, model = FLAGS.base_url, FLAGS.model
    if FLAGS.launch_server:
        process, base_url = launch_server()
        model = None  # the launched server names its model after the path it was given
    try:
        summary = asyncio.run(run(base_url, model))
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=30)
    summary["machine"] = machine()
    report(summary)
    print(f"machine: {describe(summary['machine'])}")
    if FLAGS.out:
        pathlib.Path(FLAGS.out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(FLAGS.out).write_text(json.dumps(summary, indent=2) + "\n")
        print("wrote", FLAGS.out)


if __name__ == "__main__":
    app.run(main)
