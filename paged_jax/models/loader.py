"""One call from a model name to (config, graphdef, params, tokenizer); a loaded model onto a
tensor-parallel mesh (shard_model)."""
from __future__ import annotations

import dataclasses
import logging
import time

import jax
import numpy as np

from paged_jax import sharding, weights
from paged_jax.models.config import Q8_0_GROUP, ModelConfig, WeightQuant
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
               tokenizer_revision: str | None = None,
               quantization: str | None = None) -> LoadedModel:
    """mesh: a tensor-parallel mesh (paged_jax/sharding.py): every parameter goes straight to
    its shards. A folder written by checkpoint.sharded.save_checkpoint is restored with Orbax,
    shard by shard; any other folder is read from its safetensors. tokenizer: a folder, GGUF
    file or hub name to take the tokenizer (and its chat template) from instead of the
    model's, at tokenizer_revision if a hub name. quantization: the linear layers stored as
    int8 or fp8 (models/quant.py); None: as the checkpoint has them (a GGUF file's Q8_0
    weights stay int8 with their block scales, the rest in dtype)."""
    from paged_jax.checkpoint import sharded

    start = time.perf_counter()
    folder = weights.resolve_model(model, cache_dir=cache_dir, revision=revision)
    hf_config = weights.load_hf_config(folder)
    cfg = ModelConfig.from_hf(hf_config, dtype=dtype)
    kv_repeat = 1
    if mesh is not None:
        cfg, kv_repeat = sharding.tp_model_config(cfg, sharding.tp_size(mesh))
    if sharded.is_checkpoint(folder):
        if quantization is not None:
            raise ValueError(f"quantization {quantization!r} is applied to safetensors and GGUF "
                             f"checkpoints; {folder} is an Orbax checkpoint (convert it from "
                             "its source instead)")
        graphdef, params = sharded.restore_params(folder, cfg, mesh, kv_repeat)
    else:
        tensors = weights.read_safetensors(folder)
        cfg = dataclasses.replace(cfg, weight_quant=weight_quant(quantization, tensors))
        graphdef, params = load_params(cfg, tensors, mesh, kv_repeat)
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
    log.info("loaded %s from %s in %.1fs (%s%s)", model or "SmolLM2-135M-Instruct", folder,
             time.perf_counter() - start, dtype,
             "" if cfg.weight_quant is None else f", {cfg.weight_quant.kind} weights")
    return LoadedModel(cfg, graphdef, params, tokenizer, hf_config, str(folder))


def weight_quant(quantization: str | None, tensors) -> WeightQuant | None:
    """How the linear layers are stored, from the option and the checkpoint: a checkpoint of
    Q8_0 weights (scales stored beside them) keeps its blocks as int8 unless fp8 is asked
    for; full-precision weights are quantized per output channel when asked."""
    stored = any(name.endswith(".weight_scale") for name in tensors)
    if quantization == "fp8":
        return WeightQuant("fp8")
    if stored:
        return WeightQuant("int8", Q8_0_GROUP)
    return None if quantization is None else WeightQuant(quantization)


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
            tree[key] = sharding.put(value, where, value.dtype)  # (quantized weights stay so)

    fill(pure, ())
    nnx.replace_by_pure_dict(state, pure)
    return dataclasses.replace(model, config=cfg, graphdef=graphdef, params=state)
