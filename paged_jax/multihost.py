"""Multi-host runs: jax.distributed start-up, and the command channel of multi-host serving.

Every process runs the same program (multi-controller JAX): each builds the same engine, and
each engine step is one collective program over the global mesh. Host-side decisions must
therefore be identical everywhere:

- offline (`LLM.generate`, `paged-jax generate`): every process adds the same requests in the
  same order; seeds come from EngineConfig.seed, so scheduling and sampling agree; only
  process 0 prints.
- serving (`paged-jax serve`): only process 0 takes HTTP requests. Before each step it
  publishes the adds and aborts it applied since the previous step through the coordination
  service's key-value store (CommandChannel); the other processes (LLMEngine.follow) apply the
  same commands and run the same step.
"""
from __future__ import annotations

import logging
import os
import pickle

import jax

log = logging.getLogger(__name__)

STOP = "stop"


def _cluster_in_environment() -> bool:
    """Whether JAX's own detection should find a multi-process job (Slurm, Open MPI, env)."""
    env = os.environ

    def count(name):
        try:
            return int(env.get(name, "1"))
        except ValueError:
            return 1

    return bool(env.get("JAX_COORDINATOR_ADDRESS")) or count("SLURM_NTASKS") > 1 or count(
        "OMPI_COMM_WORLD_SIZE") > 1


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
    """jax.distributed.initialize, once, before any JAX computation. Returns whether this is a
    multi-process run. With no arguments it initializes only when the environment describes a
    cluster (JAX_COORDINATOR_ADDRESS, Slurm or Open MPI with several tasks), letting JAX detect
    the rest. CPU processes exchange collectives through gloo."""
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    if coordinator_address is None and num_processes is None and process_id is None:
        if not _cluster_in_environment():
            return False
    if jax.config.jax_cpu_collectives_implementation in (None, "none", ""):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
    log.info("jax.distributed: process %d of %d, %d devices in all", jax.process_index(),
             jax.process_count(), jax.device_count())
    return jax.process_count() > 1


def is_leader() -> bool:
    """Process 0 prints results and serves HTTP; the others only compute."""
    return jax.process_index() == 0


class CommandChannel:
    """Per-step command lists from process 0 to the others, through the coordination service's
    key-value store (no device collective, so idle followers wait without timing out)."""

    PREFIX = "paged_jax/commands"
    WAIT_MS = 60_000
    TRIM_EVERY = 64

    def __init__(self):
        from jax._src.distributed import global_state

        if global_state.client is None:
            raise RuntimeError("the command channel needs jax.distributed to be initialized")
        self._client = global_state.client
        self._step = 0
        self._trimmed = 0

    def publish(self, commands: list) -> None:
        """Process 0: the commands the followers apply before their next step."""
        self._client.key_value_set_bytes(f"{self.PREFIX}/{self._step}", pickle.dumps(commands))
        self._step += 1
        if self._step % self.TRIM_EVERY == 0:
            self._trim()

    def receive(self) -> list:
        """The other processes: waits (indefinitely) for process 0's next command list."""
        key = f"{self.PREFIX}/{self._step}"
        while True:
            try:
                data = self._client.blocking_key_value_get_bytes(key, self.WAIT_MS)
                break
            except Exception as err:  # a timeout: process 0 is idle; wait again
                if "DEADLINE" not in str(err).upper() and "TIMEOUT" not in str(err).upper():
                    raise
        self._client.key_value_set(f"{self.PREFIX}/ack/{jax.process_index()}", str(self._step),
                                   allow_overwrite=True)
        self._step += 1
        return pickle.loads(data)

    def _trim(self) -> None:
        """Deletes the lists every follower has read."""
        acks = []
        for pid in range(1, jax.process_count()):
            try:
                acks.append(int(self._client.key_value_try_get(f"{self.PREFIX}/ack/{pid}")))
            except Exception:  # not found: that follower has read nothing yet
                acks.append(-1)
        upto = min(acks, default=self._step - 1)
        for step in range(self._trimmed, upto + 1):
            self._client.key_value_delete(f"{self.PREFIX}/{step}")
        self._trimmed = max(self._trimmed, upto + 1)
