"""`paged-jax serve` with an engine that fails on purpose, for the failure tests:

    python tests/server/poisoned_server.py serve --model DIR ...

A step holding a request with seed 666 raises in its input building (as a value no check
caught would): only that step's requests fail. With seed 667 the failed step also loses the
KV cache, which the engine cannot survive: the server must exit non-zero.
"""
import sys

from paged_jax import engine as engine_module
from paged_jax.cli import main

STEP_FAILS, ENGINE_BREAKS = 666, 667
_build = engine_module.step_inputs.build


def build(batch, kv, buckets):
    seeds = {r.params.seed for r in batch.requests}
    if seeds & {STEP_FAILS, ENGINE_BREAKS}:
        if ENGINE_BREAKS in seeds:
            engine_module.ModelRunner.caches_alive = lambda self: False
        raise OverflowError("Python int too large to convert to C long")
    return _build(batch, kv, buckets)


engine_module.step_inputs.build = build
sys.exit(main())
