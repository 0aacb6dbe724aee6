"""The functional forward: plain arrays in, plain arrays out, so jit, donation and sharding wrap
it from outside."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from paged_jax.attention import AttentionMetadata


def forward(graphdef, params, input_ids, positions, kv_caches, md: AttentionMetadata):
    """Returns (logits [len(md.logits_indices), V] float32, new kv_caches)."""
    return nnx.merge(graphdef, params)(input_ids, positions, kv_caches, md)


@functools.partial(jax.jit, static_argnums=0)
def _dense_logits(graphdef, params, token_ids):
    t = token_ids.shape[0]
    md = AttentionMetadata(
        slot_mapping=jnp.zeros((t,), jnp.int32),
        query_start_loc=jnp.array([0, t], jnp.int32),
        seq_lens=jnp.array([t], jnp.int32),
        block_tables=jnp.zeros((1, 1), jnp.int32),
        logits_indices=jnp.arange(t, dtype=jnp.int32),
        mode="prefill", backend="xla")
    logits, _ = forward(graphdef, params, token_ids, jnp.arange(t, dtype=jnp.int32), None, md)
    return logits


def dense_logits(graphdef, params, token_ids, pad_to: int = 1) -> np.ndarray:
    """Logits [T, V] of one sequence by plain causal attention: no KV cache, no paging.

    pad_to: pad the sequence to a multiple of this (causal, so padding after the real tokens
    changes nothing) to bound the number of compiled lengths.
    """
    t = len(token_ids)
    padded = np.zeros((-(-t // pad_to) * pad_to,), np.int32)
    padded[:t] = token_ids
    return np.asarray(_dense_logits(graphdef, params, jnp.asarray(padded)))[:t]


def dense_greedy(graphdef, params, prompt_ids, max_new_tokens: int, eos_ids=()) -> list[int]:
    """Greedy decoding that recomputes the whole sequence every token: the engine's reference."""
    ids = list(prompt_ids)
    out: list[int] = []
    for _ in range(max_new_tokens):
        nxt = int(np.argmax(dense_logits(graphdef, params, ids, pad_to=64)[-1]))
        out.append(nxt)
        ids.append(nxt)
        if nxt in eos_ids:
            break
    return out
