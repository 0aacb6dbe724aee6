"""Converted parameters saved once with Orbax and restored shard by shard.

    model = load_model(path, dtype="bfloat16", mesh=sharding.make_mesh(8))  # or any LoadedModel
    save_checkpoint(model, "/ckpt/llama")         # each process writes its own shards
    LLM("/ckpt/llama", tensor_parallel_size=8)     # load_model restores it, shard by shard

The folder is a model folder: the Hugging Face config and tokenizer files next to
`paged_jax_params/` (Orbax, one array per parameter, stored with the checkpoint's own KV head
count) and `paged_jax_params.json`. Restoring asks Orbax for each parameter with its target
NamedSharding, so every process reads only the slices its devices hold and no host
materializes the whole model. KV heads repeated for tp > num_kv_heads are repeated on device.
"""
from __future__ import annotations

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
from flax import nnx

PARAMS_DIR = "paged_jax_params"
META_FILE = "paged_jax_params.json"
FORMAT = 1
_SKIP_SUFFIXES = (".safetensors", ".gguf")
_SKIP_NAMES = ("model.safetensors.index.json", PARAMS_DIR, META_FILE)


def is_checkpoint(folder) -> bool:
    folder = pathlib.Path(folder)
    return (folder / META_FILE).is_file() and (folder / PARAMS_DIR).is_dir()


def _key(path) -> str:
    return ".".join(str(p) for p in path)


def _checkpoint_config(model):
    from paged_jax.models.config import ModelConfig

    return ModelConfig.from_hf(model.hf_config, dtype=model.config.dtype)


def save_checkpoint(model, directory) -> pathlib.Path:
    """Writes `model` (a LoadedModel, sharded or not) as an Orbax checkpoint folder. In a
    multi-process run every process calls it; each writes the shards it holds."""
    import orbax.checkpoint as ocp

    from paged_jax import sharding

    if model.config.weight_quant is not None:
        raise ValueError(f"a model with {model.config.weight_quant.kind} weights cannot be "
                         "saved as an Orbax checkpoint; save the full-precision model and pass "
                         "quantization when serving it")
    directory = pathlib.Path(directory).absolute()
    base = _checkpoint_config(model)
    repeat = model.config.num_kv_heads // base.num_kv_heads
    arrays = {}
    for path, var in nnx.to_flat_state(model.params):
        value = var[...]
        if repeat > 1 and sharding.is_kv_projection(path):
            value = _unrepeat(value, repeat, base.head_dim)
        arrays[_key(path)] = value
    if jax.process_index() == 0:
        directory.mkdir(parents=True, exist_ok=True)
        source = pathlib.Path(model.path)
        for item in source.iterdir():
            if item.is_file() and item.name not in _SKIP_NAMES and not item.name.endswith(
                    _SKIP_SUFFIXES):
                shutil.copy2(item, directory / item.name)
    checkpointer = ocp.StandardCheckpointer()
    target = directory / PARAMS_DIR
    checkpointer.save(target, arrays, force=True)
    checkpointer.wait_until_finished()
    if jax.process_index() == 0:
        (directory / META_FILE).write_text(json.dumps(
            {"format": FORMAT, "dtype": model.config.dtype,
             "num_kv_heads": base.num_kv_heads}, indent=2) + "\n")
    return directory


def _unrepeat(value: jax.Array, repeat: int, head_dim: int) -> jax.Array:
    """Inverse of sharding.repeat_kv_heads: every `repeat`-th head, on device (small arrays)."""
    lead = value.shape[:-1]
    out_sharding = None
    if hasattr(value.sharding, "mesh"):
        out_sharding = jax.sharding.NamedSharding(value.sharding.mesh, jax.sharding.PartitionSpec())
    take = jax.jit(lambda x: x.reshape(*lead, -1, repeat, head_dim)[..., 0, :].reshape(*lead, -1),
                   out_shardings=out_sharding)
    return take(value)


def restore_params(folder, cfg, mesh=None, kv_repeat: int = 1):
    """(graphdef, params) for `cfg` (the tensor-parallel config when mesh is given), each
    parameter restored straight into its NamedSharding and cast to cfg.dtype."""
    import orbax.checkpoint as ocp

    from paged_jax import sharding
    from paged_jax.models.llama import abstract_model

    folder = pathlib.Path(folder).absolute()
    meta = json.loads((folder / META_FILE).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{folder / META_FILE}: unknown checkpoint format {meta.get('format')}")
    graphdef, state = nnx.split(abstract_model(cfg))
    names = sharding.logical_names(state)
    dtype = jnp.dtype(cfg.dtype)
    if mesh is not None:
        rules = sharding.rules_for(cfg, sharding.tp_size(mesh))
        repl = sharding.replicated(mesh)
    else:
        single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    targets, final = {}, {}
    for path, var in nnx.to_flat_state(state):
        shape = tuple(var.shape)
        expand = kv_repeat > 1 and sharding.is_kv_projection(path)
        if mesh is None:
            sh = single
        else:
            sh = jax.sharding.NamedSharding(mesh, sharding.spec(names[path], rules))
        final[_key(path)] = sh
        if expand:  # stored with the checkpoint's KV heads: restore whole, repeat on device
            shape = shape[:-1] + (shape[-1] // kv_repeat,)
            sh = repl
        targets[_key(path)] = jax.ShapeDtypeStruct(shape, dtype, sharding=sh)
    restored = ocp.StandardCheckpointer().restore(folder / PARAMS_DIR, targets)
    pure = nnx.to_pure_dict(state)
    for path, _ in nnx.to_flat_state(state):
        value = restored[_key(path)]
        if value.dtype != dtype:
            value = value.astype(dtype)
        if kv_repeat > 1 and sharding.is_kv_projection(path):
            value = _repeat_on_device(value, kv_repeat, cfg.head_dim, final[_key(path)])
        node = pure
        for p in path[:-1]:
            node = node[p]
        node[path[-1]] = value
    nnx.replace_by_pure_dict(state, pure)
    return graphdef, state


def _repeat_on_device(value, repeat, head_dim, out_sharding):
    lead = value.shape[:-1]
    f = jax.jit(lambda x: jnp.repeat(x.reshape(*lead, -1, head_dim), repeat, axis=-2)
                .reshape(*lead, -1), out_shardings=out_sharding)
    return f(value)

