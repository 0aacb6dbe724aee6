"""`paged-jax serve` with an engine that fails on purpose, for the failure tests:

    python tests/server/poisoned_server.py [--step-delay S] serve --model DIR ...

A step holding a request with seed 666 raises in its input building (as a value no check
caught would): only that step's requests fail. With seed 667 the failed step also loses the
KV cache, which the engine cannot survive: the server must exit non-zero. --step-delay makes
every step take S seconds more, so that a test can count on requests still running.
"""
import sys
import time

from paged_jax import engine as engine_module
from paged_jax.cli import main

STEP_FAILS, ENGINE_BREAKS = 666, 667
_build = engine_module.step_inputs.build


STEP_DELAY = 0.0
if sys.argv[1:2] == ["--step-delay"]:
    STEP_DELAY = float(sys.argv[2])
    del sys.argv[1:3]


def build(batch, *args, **kwargs):
    time.sleep(STEP_DELAY)
    seeds = {r.params.seed for r in batch.requests}
    if seeds & {STEP_FAILS, ENGINE_BREAKS}:
        if ENGINE_BREAKS in seeds:
            engine_module.ModelRunner.caches_alive = lambda self: False
        raise OverflowError("Python int too large to convert to C long")
    return _build(batch, *args, **kwargs)


engine_module.step_inputs.build = build
sys.exit(main())
