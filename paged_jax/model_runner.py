"""Runs one engine step on the device: forward + sampling, one compiled executable per shape.

Executables are compiled ahead of time (jit(...).lower(...).compile()) and kept in a dict keyed
by the step's shape, so the number of variants is explicit, logged, and bounded by the bucket
ladders. The KV caches are donated: pages are updated in place, never copied.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from paged_jax.attention import AttentionMetadata
from paged_jax.models.forward import forward
from paged_jax.sampler import SamplingInputs, sample
from paged_jax.sampling_params import MAX_LOGIT_BIAS, MAX_LOGPROBS
from paged_jax.step_inputs import Buckets, StepInputs
from paged_jax.swap import SwapSpace

log = logging.getLogger(__name__)

_STEP_FIELDS = ("input_ids", "prev_rows", "positions", "slot_mapping", "query_start_loc",
                "seq_lens", "block_tables", "logits_indices", "num_decodes")


def _step(graphdef, mode, backend, num_top, params, kv_caches, arrays, sampling):
    # Pending tokens (asynchronous scheduling): the host did not know them when it built the
    # step; the previous step's sampled tokens, still on the device, fill them in.
    prev = arrays["prev_rows"]
    input_ids = jnp.where(prev >= 0, arrays["prev_tokens"][jnp.maximum(prev, 0)],
                          arrays["input_ids"])
    md = AttentionMetadata(arrays["slot_mapping"], arrays["query_start_loc"], arrays["seq_lens"],
                           arrays["block_tables"], arrays["logits_indices"],
                           arrays["num_decodes"] if mode == "prefill" else None, mode, backend)
    logits, kv_caches = forward(graphdef, params, input_ids, arrays["positions"],
                                kv_caches, md)
    result = sample(logits, sampling, num_top)
    # The next step's prev_tokens: one length for every step shape, so the next step's
    # executable does not depend on this one's.
    width = arrays["prev_tokens"].shape[0]
    # (Rows past the width score prompt tokens: no step reads them.)
    tokens = result.tokens[:width]
    next_tokens = jnp.zeros((width,), jnp.int32).at[:tokens.shape[0]].set(tokens)
    return (result, next_tokens), kv_caches


class ModelRunner:
    def __init__(self, graphdef, params, kv_caches, backend: str, history_len: int,
                 max_rows: int, vocab_size: int, mesh=None,
                 swap_space: SwapSpace | None = None, max_logprobs: int = MAX_LOGPROBS):
        """max_rows: the most sampled rows of any step (Buckets.max_rows); vocab_size: the
        logits' width (structured outputs' bitmasks hold a bit per entry). mesh: a
        tensor-parallel mesh (paged_jax/sharding.py). The step then pins its shardings:
        parameters and caches as they lie, step and sampling inputs and the sampled results
        replicated; attention runs under shard_map (traced under jax.set_mesh). swap_space:
        host blocks for preemption by swap. max_logprobs: the top-N logprobs' width."""
        self.params = params
        self.max_rows = max_rows
        self.mask_width = (vocab_size + 31) // 32
        self._constants: dict[tuple, jax.Array] = {}  # (what, rows) -> its array (_kept)
        self.kv_caches = kv_caches
        self.swap_space = swap_space
        self.backend = backend
        self.history_len = history_len
        self.mesh = mesh
        shardings = {}
        if mesh is not None:
            replicated = NamedSharding(mesh, PartitionSpec())
            kv = jax.tree.map(lambda x: x.sharding, kv_caches)
            shardings = dict(in_shardings=(jax.tree.map(lambda x: x.sharding, params), kv,
                                           replicated, replicated),
                             out_shardings=(replicated, kv))
        self._jits = {mode: jax.jit(functools.partial(_step, graphdef, mode, backend,
                                                      max_logprobs),
                                    donate_argnums=(1,), **shardings)
                      for mode in ("prefill", "decode", "mixed")}
        self._compiled: dict[tuple, object] = {}
        self.compile_seconds = 0.0
        # prev_tokens of a step that follows none in flight (its prev_rows are all -1)
        zeros = np.zeros((max_rows,), np.int32)
        self._no_prev = jax.device_put(
            zeros, NamedSharding(mesh, PartitionSpec()) if mesh is not None else None)

    @property
    def num_compiled(self) -> int:
        return len(self._compiled)

    def _executable(self, key: tuple):
        if key[0] == "mixed" and self.backend in ("cpu", "pallas"):
            # Their prefill attention is ragged over the pages already: one executable serves.
            key = ("prefill",) + key[1:]
        if key not in self._compiled:
            mode, t, s, mb, r = key
            start = time.perf_counter()
            with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
                self._compiled[key] = self._jits[mode].lower(
                    self.params, self.kv_caches, _array_specs(t, s, mb, r, self.max_rows),
                    _sampling_specs(r, self.history_len, self.mask_width)).compile()
            took = time.perf_counter() - start
            self.compile_seconds += took
            log.info("compiled step %s in %.2fs (%d variants)", key, took, len(self._compiled))
        return self._compiled[key]

    def precompile(self, buckets: Buckets) -> None:
        shapes = list(buckets.all_shapes())
        # A progress bar in a terminal or a notebook (tqdm leaves it out elsewhere).
        for key in tqdm(shapes, desc="Compiling step shapes", unit="shape", disable=None):
            self._executable(key)
        if self.swap_space is not None:
            self.swap_space.precompile(self.kv_caches)

    def caches_alive(self) -> bool:
        """False once the KV caches were donated to a step or a swap that raised instead of
        returning them, or are the outputs of a computation that failed on the device (the
        failure shows when they are waited on): their pages are gone and no request can go
        on."""
        leaves = jax.tree.leaves(self.kv_caches)
        if any(x.is_deleted() for x in leaves):
            return False
        try:
            jax.block_until_ready(leaves)
        except Exception:
            return False
        return True

    def swap(self, swap_out, swap_in) -> None:
        """Copy a step's swapped blocks between device pages and host blocks (swap.py)."""
        self.kv_caches = self.swap_space.apply(self.kv_caches, swap_out, swap_in)

    def dispatch(self, inputs: StepInputs, sampling: dict[str, np.ndarray], prev=None):
        """Starts the step on the device and returns its results there, without waiting.
        prev: the results of the step before, when inputs has pending tokens from it."""
        exe = self._executable(inputs.shape_key)
        arrays = {f: getattr(inputs, f) for f in _STEP_FIELDS}
        arrays["prev_tokens"] = prev[1] if prev is not None else self._no_prev
        rows = len(inputs.logits_indices)
        if sampling["bitmask"] is None:  # no structured outputs: nothing to send each step
            sampling = {**sampling, "bitmask": self._kept(("mask", rows))}
        if sampling["history"] is None:  # no penalties: the same
            sampling = {**sampling, "history": self._kept(("history", rows))}
        if sampling["score"] is None:  # no prompt logprobs: the same
            sampling = {**sampling, "score": self._kept(("score", rows))}
        if sampling["bias_ids"] is None:  # no logit_bias: the same
            sampling = {**sampling, "bias_ids": self._kept(("bias_ids", rows)),
                        "bias_values": self._kept(("bias_values", rows))}
        out, self.kv_caches = exe(self.params, self.kv_caches, arrays,
                                  SamplingInputs(**sampling))
        result = out[0]
        for x in (result.tokens, result.logprob, result.rank):
            x.copy_to_host_async()  # the host will want them as soon as they are ready
        return out

    def _kept(self, key: tuple[str, int]) -> jax.Array:
        """A constant sampling input kept on the device: an all-ones bitmask, an empty
        logit bias, no scored prompt tokens, or an empty penalty history, of this many
        rows."""
        if key not in self._constants:
            kind, rows = key
            value = {"mask": lambda: np.full((rows, self.mask_width), -1, np.int32),
                     "bias_ids": lambda: np.full((rows, MAX_LOGIT_BIAS), -1, np.int32),
                     "bias_values": lambda: np.zeros((rows, MAX_LOGIT_BIAS), np.float32),
                     "score": lambda: np.full((rows,), -1, np.int32),
                     "history": lambda: np.full((rows, self.history_len), -1, np.int32)}[kind]()
            # (device_put, not jnp.asarray: that compiles a copy, a compile after precompile)
            self._constants[key] = jax.device_put(
                value, NamedSharding(self.mesh, PartitionSpec()) if self.mesh is not None
                else None)
        return self._constants[key]

    def fetch(self, out, num_rows: int, top: bool) -> dict[str, np.ndarray]:
        """Waits for a dispatched step's sampled rows and brings the real ones (sampled,
        then scored) to the host (the top-N logprob arrays only when asked for)."""
        result = out[0]
        fields = ("tokens", "logprob", "rank") + (("top_ids", "top_logprobs") if top else ())
        return {k: np.asarray(getattr(result, k))[:num_rows] for k in fields}

def _array_specs(t: int, s: int, mb: int, r: int, max_rows: int) -> dict:
    i32 = jnp.int32
    shapes = dict(input_ids=(t,), prev_rows=(t,), positions=(t,), slot_mapping=(t,),
                  query_start_loc=(s + 1,), seq_lens=(s,), block_tables=(s, mb),
                  logits_indices=(r,), num_decodes=(), prev_tokens=(max_rows,))
    return {k: jax.ShapeDtypeStruct(v, i32) for k, v in shapes.items()}


def _sampling_specs(s: int, history_len: int, mask_width: int) -> SamplingInputs:
    f32, i32 = jnp.float32, jnp.int32
    spec = jax.ShapeDtypeStruct
    return SamplingInputs(
        temperature=spec((s,), f32), top_k=spec((s,), i32), top_p=spec((s,), f32),
        min_p=spec((s,), f32), repetition_penalty=spec((s,), f32),
        presence_penalty=spec((s,), f32), frequency_penalty=spec((s,), f32),
        seed=spec((s, 2), jnp.uint32), step=spec((s,), i32), prompt_lens=spec((s,), i32),
        history=spec((s, history_len), i32), draft=spec((s,), i32),
        bitmask=spec((s, mask_width), i32), bias_ids=spec((s, MAX_LOGIT_BIAS), i32),
        bias_values=spec((s, MAX_LOGIT_BIAS), f32), flags=spec((7,), jnp.bool_),
        score=spec((s,), i32))
