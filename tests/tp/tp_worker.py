"""Runs one tensor-parallel scenario in a fresh process and writes its results as JSON.

    python tests/tp/tp_worker.py TASK '{"model": ...}' OUT.json

The tests start it with XLA_FLAGS=--xla_force_host_platform_device_count=N (or as one of
several jax.distributed processes), which must be set before JAX initializes: hence a
separate process rather than the pytest one.
"""
from __future__ import annotations

import json
import sys
import time

import numpy as np

ENGINE = dict(num_kv_blocks=64, max_model_len=64, max_num_seqs=4, max_num_batched_tokens=64)
# Parameters whose shards the tests check, by path.
WATCHED = ("embed_tokens", "lm_head", "norm.weight", "layers.0.input_layernorm.weight",
           "layers.0.self_attn.q_proj.kernel", "layers.0.self_attn.k_proj.kernel",
           "layers.0.self_attn.v_proj.kernel", "layers.0.self_attn.o_proj.kernel",
           "layers.0.mlp.gate_proj.kernel", "layers.0.mlp.up_proj.kernel",
           "layers.0.mlp.down_proj.kernel", "layers.0.block_sparse_moe.w1",
           "layers.0.block_sparse_moe.w3", "layers.0.block_sparse_moe.w2",
           "layers.0.block_sparse_moe.gate.kernel")


def params(a):
    from paged_jax import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=a["max_tokens"], ignore_eos=True)


def prompts(a):
    return [p if isinstance(p, str) else {"prompt_token_ids": p} for p in a["prompts"]]


def tokens(llm, a):
    return [o.outputs[0].token_ids for o in llm.generate(prompts(a), params(a), use_tqdm=False)]


def shard_shapes(x):
    return {"shape": list(x.shape), "shards": [list(s.data.shape) for s in x.addressable_shards],
            "devices": sorted(d.id for d in x.sharding.device_set)}


def flat_params(state):
    from flax import nnx

    return {".".join(str(p) for p in path): v[...] for path, v in nnx.to_flat_state(state)}


def single(a):
    """Greedy tokens per (tp, backend), shard shapes, and an Orbax save/restore round trip."""
    from paged_jax import LLM, sharding
    from paged_jax.checkpoint.sharded import save_checkpoint
    from paged_jax.models.loader import load_model

    out = {"tokens": {}, "shards": {}, "seconds": {}, "swapped": {}}
    for tp, backend, *more in a["runs"]:  # more: engine options, named by
        # their preemption_mode and kv_cache_dtype
        start = time.perf_counter()
        opts = dict(ENGINE, **(more[0] if more else {}))
        llm = LLM(a["model"], tensor_parallel_size=tp, attention_backend=backend, **opts)
        named = [opts[k] for k in ("preemption_mode", "kv_cache_dtype") if more and k in more[0]]
        key = "-".join([str(tp), backend, *named])
        out["tokens"][key] = tokens(llm, a)
        engine = llm.llm_engine
        out["swapped"][key] = engine.scheduler.num_swapped_out
        flat = flat_params(engine.model.params)
        out["shards"][key] = {name: shard_shapes(flat[name]) for name in WATCHED if name in flat}
        for layer, (k, v) in enumerate(engine.runner.kv_caches):
            out["shards"][key][f"k_cache.{layer}"] = shard_shapes(k)
            out["shards"][key][f"v_cache.{layer}"] = shard_shapes(v)
        out["seconds"][key] = time.perf_counter() - start
        del llm, engine

    if a.get("checkpoint"):
        start = time.perf_counter()
        saved_tp, ckpt = a["checkpoint_tp"], a["checkpoint"]
        save_checkpoint(load_model(a["model"], mesh=sharding.make_mesh(saved_tp)), ckpt)
        out["restored"] = {}
        for tp in a["restore_tps"]:
            mesh = sharding.make_mesh(tp) if tp > 1 else None
            got = flat_params(load_model(ckpt, mesh=mesh).params)
            want = flat_params(load_model(a["model"], mesh=mesh).params)
            out["restored"][str(tp)] = {
                "same_names": sorted(got) == sorted(want),
                "equal": [n for n in want if n in got
                          and np.array_equal(np.asarray(got[n]), np.asarray(want[n]))],
                "same_sharding": [n for n in want if n in got
                                  and got[n].sharding.is_equivalent_to(want[n].sharding,
                                                                       got[n].ndim)],
                "num": len(want)}
        llm = LLM(ckpt, tensor_parallel_size=a["restore_generate_tp"], **ENGINE)
        out["restored_tokens"] = tokens(llm, a)
        out["seconds"]["checkpoint"] = time.perf_counter() - start
    return out


def refuse(a):
    """The error message of each refused tensor_parallel_size."""
    from paged_jax import LLM

    out = {}
    for tp in a["tps"]:
        try:
            LLM(a["model"], tensor_parallel_size=tp, **ENGINE)
            out[str(tp)] = None
        except ValueError as err:
            out[str(tp)] = str(err)
    return out


def smollm2(a):
    from paged_jax import LLM

    out = {"tokens": {}, "seconds": {}}
    for tp in a["tps"]:
        start = time.perf_counter()
        llm = LLM(a["model"], tensor_parallel_size=tp, **dict(ENGINE, num_kv_blocks=16,
                                                              max_num_seqs=2))
        out["tokens"][str(tp)] = tokens(llm, a)
        out["seconds"][str(tp)] = time.perf_counter() - start
        del llm
    out["refused"] = refuse(dict(a, tps=a["refuse_tps"]))
    return out


def process(a):
    """One of a["num_processes"] jax.distributed processes with one CPU device each: generates
    like a single process (every process adds the same requests), then serves: process 0
    leads (adds, an abort, steps), the others follow its published commands."""
    import jax

    from paged_jax import LLM

    pid = a["process_id"]
    llm = LLM(a["model"], tensor_parallel_size=a["tp"], coordinator_address=a["coordinator"],
              num_processes=a["num_processes"], process_id=pid, **ENGINE)
    engine = llm.llm_engine
    k = engine.runner.kv_caches[0][0]
    out = {"process_count": jax.process_count(), "local_devices": len(jax.local_devices()),
           "mesh_devices": len(k.sharding.device_set), "k_cache": shard_shapes(k)}
    out["tokens"] = tokens(llm, a)
    if pid == 0:
        engine.lead()
        for i, p in enumerate(prompts(a)):
            engine.add_request(f"s{i}", p, params(a))
        engine.abort_request(f"s{len(a['prompts']) - 1}")
        done = {}
        while engine.has_unfinished_requests():
            done.update({o.request_id: o.outputs[0].token_ids for o in engine.step()
                         if o.finished})
        engine.step()  # an idle step: nothing scheduled, followers mirror it too
        engine.stop_followers()
        out["served"] = [done.get(f"s{i}") for i in range(len(a["prompts"]))]
    else:
        engine.follow()
    out["kv_free_after"] = engine.kv.pool.num_free == engine.kv.pool.num_usable
    return out


def logits(a):
    """For each model folder: dense logits at tp 1 and under a tp mesh, and how many of its
    parameters the mesh splits."""
    import jax

    from paged_jax import sharding
    from paged_jax.models.forward import dense_logits
    from paged_jax.models.loader import load_model

    mesh = sharding.make_mesh(a["tp"])
    out = {}
    for folder in a["models"]:
        quant = a.get("quantization")
        one = load_model(folder, with_tokenizer=False, quantization=quant)
        split = load_model(folder, with_tokenizer=False, mesh=mesh, quantization=quant)
        want = dense_logits(one.graphdef, one.params, a["ids"])
        with jax.set_mesh(mesh):
            got = dense_logits(split.graphdef, split.params, a["ids"])
        flat = flat_params(split.params).values()
        out[folder] = {"max_rel_diff": float(np.abs(got - want).max() / np.abs(want).max()),
                       "split": sum(len({tuple(s.data.shape) for s in x.addressable_shards}
                                        ) == 1 and x.addressable_shards[0].data.shape != x.shape
                                    for x in flat),
                       "num": len(list(flat))}
    return out


if __name__ == "__main__":
    task, args, result = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    data = {"single": single, "smollm2": smollm2, "refuse": refuse, "process": process,
            "logits": logits}[task](args)
    with open(result, "w") as f:
        json.dump(data, f)
