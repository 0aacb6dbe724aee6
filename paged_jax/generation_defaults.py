"""A model's default sampling parameters, from its generation_config.json, as vLLM reads them.

vLLM's `--generation-config auto` (its default) takes temperature, top_p, top_k, min_p,
repetition_penalty and max_new_tokens from the checkpoint's generation_config.json and uses
them wherever a request leaves the field unset; `vllm` ignores the file; a folder path reads
that folder's file instead. Model authors ship tuned values there (Qwen, Llama 3, Gemma do), so
a server that ignored them would sample differently from vLLM for the same request.
"""
from __future__ import annotations

import json
import logging
import math
import os
import pathlib

log = logging.getLogger(__name__)

FILE = "generation_config.json"
# generation_config.json key -> SamplingParams field
KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
        "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def load_sampling_defaults(model_dir: str | os.PathLike, source: str = "auto") -> dict:
    """{SamplingParams field: value} from the generation config `source` names: "auto" (the
    model folder's), "vllm" (none: SamplingParams' own defaults) or a folder holding one.
    Raises ValueError naming the file and the key for a value no request could take."""
    if source == "vllm":
        return {}
    folder = pathlib.Path(model_dir if source == "auto" else source).expanduser()
    path = folder / FILE
    if not path.is_file():
        if source != "auto":
            raise FileNotFoundError(f"generation config {path} does not exist "
                                    "(--generation-config: auto, vllm or a folder holding "
                                    f"{FILE})")
        return {}
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"generation config {path} is not readable JSON: {err}") from err
    if not isinstance(raw, dict):
        raise ValueError(f"generation config {path} is not a JSON object")
    defaults = {field: raw[key] for key, field in KEYS.items() if raw.get(key) is not None}
    if defaults.get("top_k") == 0:  # transformers' "no top-k"; SamplingParams spells it -1
        defaults["top_k"] = -1
    _check(defaults, path)
    if defaults:
        log.info("sampling defaults from %s (used where a request leaves them unset): %s",
                 path, defaults)
    return defaults


def defaults_from_gguf(metadata: dict) -> dict:
    """generation_config.json keys from a GGUF's `general.sampling.*` metadata (llama.cpp's
    convert_hf_to_gguf writes them from the model's generation config)."""
    names = {"temp": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
             # llama.cpp applies it over the last penalty_last_n tokens, transformers over all
             "penalty_repeat": "repetition_penalty"}
    return {hf: metadata[f"general.sampling.{key}"] for key, hf in names.items()
            if metadata.get(f"general.sampling.{key}") is not None}


def _check(defaults: dict, path: pathlib.Path) -> None:
    from paged_jax.sampling_params import SamplingParams

    for field, value in defaults.items():
        if field in ("top_k", "max_tokens"):
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
                math.isfinite(value))
        if not ok:
            raise ValueError(f"generation config {path}: {field} {value!r} is not a number")
    try:
        SamplingParams(**defaults)
    except ValueError as err:
        raise ValueError(f"generation config {path}: {err}") from err
