"""One call from a model name to (config, graphdef, params, tokenizer); a loaded model onto a
tensor-parallel mesh (shard_model)."""
from __future__ import annotations

import dataclasses
import logging
import time

import jax
import numpy as np

from paged_jax import sharding, weights
from paged_jax.models.config import ModelConfig
from paged_jax.models.llama import abstract_model
from paged_jax.models.params import load_params
from paged_jax.tokenizer import load_tokenizer

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    config: ModelConfig
    graphdef: object
    params: object
    tokenizer: object
    hf_config: object
    path: str

    def with_config(self, cfg: ModelConfig) -> "LoadedModel":
        """The same parameters under a config of the same shapes (e.g. LongRoPE's factors)."""
        from flax import nnx

        graphdef, _ = nnx.split(abstract_model(cfg))
        return dataclasses.replace(self, config=cfg, graphdef=graphdef)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        ids = set()
        for source in (self.hf_config, self.tokenizer):
            eos = getattr(source, "eos_token_id", None)
            ids.update(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        return tuple(sorted(ids))


def load_model(model: str | None = None, dtype: str = "float32", cache_dir: str | None = None,
               with_tokenizer: bool = True, mesh=None, revision: str | None = None,
               tokenizer: str | None = None,
               tokenizer_revision: str | None = None) -> LoadedModel:
    """mesh: a tensor-parallel mesh (paged_jax/sharding.py): every parameter goes straight to
    its shards. A folder written by checkpoint.sharded.save_checkpoint is restored with Orbax,
    shard by shard; any other folder is read from its safetensors. tokenizer: a folder, GGUF
    file or hub name to take the tokenizer (and its chat template) from instead of the
    model's, at tokenizer_revision if a hub name."""
    from paged_jax.checkpoint import sharded

    start = time.perf_counter()
    folder = weights.resolve_model(model, cache_dir=cache_dir, revision=revision)
    hf_config = weights.load_hf_config(folder)
    cfg = ModelConfig.from_hf(hf_config, dtype=dtype)
    kv_repeat = 1
    if mesh is not None:
        cfg, kv_repeat = sharding.tp_model_config(cfg, sharding.tp_size(mesh))
    if sharded.is_checkpoint(folder):
        graphdef, params = sharded.restore_params(folder, cfg, mesh, kv_repeat)
    else:
        graphdef, params = load_params(cfg, weights.read_safetensors(folder), mesh, kv_repeat)
    if tokenizer is None and tokenizer_revision is not None:
        raise ValueError(f"tokenizer_revision {tokenizer_revision!r} needs a tokenizer (a hub "
                         "name); the model's own tokenizer comes with its revision")
    if with_tokenizer:
        source = folder if tokenizer is None else weights.resolve_model(
            tokenizer, cache_dir=cache_dir, revision=tokenizer_revision)
        tokenizer = load_tokenizer(source)
        if len(tokenizer) > cfg.vocab_size:  # ids past the embedding would fail every step
            raise ValueError(f"the tokenizer from {source} has {len(tokenizer)} tokens; the "
                             f"model's vocab_size is {cfg.vocab_size}")
    else:
        tokenizer = None
    log.info("loaded %s from %s in %.1fs (%s)", model or "SmolLM2-135M-Instruct", folder,
             time.perf_counter() - start, dtype)
    return LoadedModel(cfg, graphdef, params, tokenizer, hf_config, str(folder))


def shard_model(model: LoadedModel, mesh) -> LoadedModel:
    """A LoadedModel whose parameters sit on the mesh. A model loaded for this mesh is returned
    as is; an unsharded one (e.g. loaded with mesh=None) is placed parameter by parameter."""
    from flax import nnx

    tp = sharding.tp_size(mesh)
    if all(isinstance(x, jax.Array) and isinstance(x.sharding, jax.sharding.NamedSharding)
           and x.sharding.mesh == mesh for x in jax.tree.leaves(model.params)):
        return model
    cfg, repeat = sharding.tp_model_config(model.config, tp)
    rules = sharding.rules_for(cfg, tp)
    graphdef, state = nnx.split(abstract_model(cfg))
    names = sharding.logical_names(state)
    old = {tuple(p): v for p, v in nnx.to_flat_state(model.params)}
    pure = nnx.to_pure_dict(state)

    def fill(tree, prefix):
        for key, node in tree.items():
            path = prefix + (key,)
            if isinstance(node, dict):
                fill(node, path)
                continue
            value = np.asarray(old[path][...])
            if sharding.is_kv_projection(path):
                value = sharding.repeat_kv_heads(value, repeat, cfg.head_dim)
            where = jax.sharding.NamedSharding(mesh, sharding.spec(names[path], rules))
            tree[key] = sharding.put(value, where, cfg.dtype)

    fill(pure, ())
    nnx.replace_by_pure_dict(state, pure)
    return dataclasses.replace(model, config=cfg, graphdef=graphdef, params=state)
