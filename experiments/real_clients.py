"""The clients vLLM users run, unchanged, against `paged-jax serve` on a real model (default:
the embedded SmolLM2-135M-Instruct): how often each gets a valid parsed object.

Each case runs --trials times at temperature 0.7 with a different seed: the openai client's
`chat.completions.parse` with a pydantic response_format, instructor in JSON_SCHEMA and
TOOLS modes, langchain-openai's `with_structured_output` (json_schema and function calling)
and `bind_tools` with a named tool. Retries are off in every client, so a reply that does
not parse counts as a failure. (CI runs the same clients against a tiny random model:
tests/server/test_server_clients.py.)

  python -m experiments.real_clients --out_dir=/tmp/real_clients
"""
from __future__ import annotations

import time
from typing import Literal

from absl import app, flags
from pydantic import BaseModel, ConfigDict, Field

from experiments.live_server import KEY, serve
from experiments.results_file import publish

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "a model folder (default: the embedded SmolLM2)")
flags.DEFINE_integer("port", 8432, "the server's loopback port")
flags.DEFINE_integer("trials", 10, "runs of each case, seeds 0..trials-1")
flags.DEFINE_string("out_dir", "results/real_clients", "where results.json goes")

PROMPT = "What will the weather be in Paris over the next three days? Use the tool."


class Forecast(BaseModel):
    """The weather forecast for a city."""
    model_config = ConfigDict(extra="forbid")
    city: Literal["Paris", "Rome", "Oslo"]
    days: int = Field(ge=1, le=7)


def cases(base_url: str):
    """name -> fn(seed) returning the parsed Forecast (or raising)."""
    import instructor
    import openai
    from langchain_openai import ChatOpenAI

    client = openai.OpenAI(base_url=base_url, api_key=KEY, max_retries=0, timeout=300)
    messages = [{"role": "user", "content": PROMPT}]
    common = dict(model="m", max_tokens=100, temperature=0.7)

    def openai_parse(seed):
        out = client.chat.completions.parse(response_format=Forecast, messages=messages,
                                            seed=seed, **common)
        return out.choices[0].message.parsed

    def with_instructor(mode):
        patched = instructor.from_openai(client, mode=mode)
        return lambda seed: patched.chat.completions.create(
            response_model=Forecast, max_retries=0, messages=messages, seed=seed, **common)

    def langchain(kind):
        def run(seed):
            llm = ChatOpenAI(base_url=base_url, api_key=KEY, max_retries=0, seed=seed,
                             **common)
            if kind == "bind_tools":
                message = llm.bind_tools([Forecast], tool_choice="Forecast").invoke(PROMPT)
                return Forecast(**message.tool_calls[0]["args"])
            return llm.with_structured_output(Forecast, method=kind).invoke(PROMPT)
        return run

    return {"openai parse (response_format)": openai_parse,
            "instructor JSON_SCHEMA": with_instructor(instructor.Mode.JSON_SCHEMA),
            "instructor TOOLS": with_instructor(instructor.Mode.TOOLS),
            "langchain with_structured_output json_schema": langchain("json_schema"),
            "langchain with_structured_output function_calling": langchain("function_calling"),
            "langchain bind_tools (named)": langchain("bind_tools")}


def main(argv):
    del argv
    from paged_jax.weights import resolve_model

    model = str(resolve_model(FLAGS.model))
    proc = serve(model, FLAGS.port)
    results, lines = {"model": model, "trials": FLAGS.trials, "cases": {}}, []
    try:
        for name, fn in cases(f"http://127.0.0.1:{FLAGS.port}/v1").items():
            valid, errors, start = 0, [], time.perf_counter()
            for seed in range(FLAGS.trials):
                try:
                    valid += isinstance(Forecast.model_validate(dict(fn(seed))), Forecast)
                except Exception as err:  # a client's parse failure is what is counted
                    errors.append(f"{type(err).__name__}: {str(err)[:200]}")
            results["cases"][name] = {"valid": valid, "errors": errors,
                                      "seconds": time.perf_counter() - start}
            lines.append(f"{name}: {valid}/{FLAGS.trials} valid")
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    publish(FLAGS.out_dir, results, "\n".join(lines))


if __name__ == "__main__":
    app.run(main)
