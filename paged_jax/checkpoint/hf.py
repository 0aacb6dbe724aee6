"""Hugging Face checkpoint folders: config.json and safetensors weights, read into numpy.

The safetensors reader is our own (the format is an 8-byte header length, a JSON header and the raw
tensor bytes) so that bfloat16 and float8 tensors come back as `ml_dtypes` arrays, which the
`safetensors` numpy loader cannot produce, and so that the arrays are read-only memory maps of the
file: nothing is read from disk until a tensor is used.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import struct
from typing import Any, Iterable, Mapping

import ml_dtypes
import numpy as np

from paged_jax.models import registry

# The architectures (config.json "architectures" entries) the paged-jax models implement
# (models/registry.py is the one place the list lives).
SUPPORTED_ARCHITECTURES = registry.SUPPORTED_ARCHITECTURES

# What a config without an "architectures" entry stands for, by its model_type.
_ARCHITECTURE_OF_MODEL_TYPE = registry.ARCHITECTURE_OF_MODEL_TYPE

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"

SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}


def model_folder(folder: str | os.PathLike) -> pathlib.Path:
    """`folder` as a path, or FileNotFoundError when it is not an existing directory."""
    path = pathlib.Path(folder).expanduser()
    if not path.is_dir():
        if path.exists():
            raise FileNotFoundError(f"model folder {path} is not a directory")
        raise FileNotFoundError(f"model folder {path} does not exist")
    return path


def architectures_of(config: Any) -> list[str]:
    """The config's `architectures`, or the one its `model_type` implies when it lists none."""
    get = config.get if isinstance(config, Mapping) else lambda key: getattr(config, key, None)
    architectures = list(get("architectures") or [])
    if not architectures and get("model_type") in _ARCHITECTURE_OF_MODEL_TYPE:
        architectures = [_ARCHITECTURE_OF_MODEL_TYPE[get("model_type")]]
    return architectures


def check_architecture(config: Any, source: Any = None) -> str:
    """The supported architecture `config` (a PretrainedConfig or a config dict) names, else ValueError."""
    architectures = architectures_of(config)
    for architecture in architectures:
        if architecture in SUPPORTED_ARCHITECTURES:
            return architecture
    where = f" in {source}" if source is not None else ""
    named = ", ".join(architectures) if architectures else "none (no architectures or known model_type)"
    raise ValueError(
        f"unsupported model architecture {named}{where}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def load_hf_config(folder: str | os.PathLike):
    """The transformers config of a checkpoint folder, after checking its architecture is supported."""
    import transformers

    path = model_folder(folder)
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in model folder {path}")
    try:
        raw = json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_file} is not valid JSON: {error}") from error
    check_architecture(raw, config_file)
    return transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)


def read_safetensors_file(file: str | os.PathLike, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """The tensors of one .safetensors file (only `names` if given), as read-only memory-mapped arrays."""
    file = pathlib.Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"safetensors file {file} does not exist")
    size = file.stat().st_size
    with open(file, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{file} is not a safetensors file (shorter than its 8-byte header length)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > size - 8:
            raise ValueError(f"{file} is not a safetensors file (header length {header_len} > file size {size})")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{file} is not a safetensors file (bad JSON header: {error})") from error
    header.pop("__metadata__", None)
    wanted = set(header) if names is None else set(names)
    missing = wanted - set(header)
    if missing:
        raise ValueError(f"safetensors file {file} lacks tensors {sorted(missing)[:10]}")
    data_start = 8 + header_len
    blob = np.memmap(file, dtype=np.uint8, mode="r") if size > data_start else np.zeros(0, np.uint8)
    tensors = {}
    for name in sorted(wanted):
        entry = header[name]
        dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ValueError(f"tensor {name} in {file} has unsupported dtype {entry['dtype']}")
        shape = tuple(entry["shape"])
        begin, end = entry["data_offsets"]
        if end - begin != math.prod(shape) * dtype.itemsize or data_start + end > size:
            raise ValueError(f"tensor {name} in {file} has inconsistent offsets {begin}..{end} for {shape}")
        raw = blob[data_start + begin : data_start + end]
        tensors[name] = np.asarray(raw).view(dtype).reshape(shape)
    return tensors


def read_safetensors(folder: str | os.PathLike) -> dict[str, np.ndarray]:
    """All weights of a checkpoint folder by their Hugging Face names.

    Reads `model.safetensors`, or every shard `model.safetensors.index.json` names. The arrays keep
    the stored dtype (bfloat16 as `ml_dtypes.bfloat16`) and are read-only memory maps of the files.
    """
    path = model_folder(folder)
    index_file = path / WEIGHTS_INDEX_NAME
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{index_file} is not a safetensors index (no weight_map): {error}") from error
        by_shard: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            by_shard.setdefault(shard, []).append(name)
        for shard in by_shard:
            if not (path / shard).is_file():
                raise FileNotFoundError(f"shard {shard} named in {index_file} does not exist in {path}")
        tensors: dict[str, np.ndarray] = {}
        for shard, names in sorted(by_shard.items()):
            tensors.update(read_safetensors_file(path / shard, names))
        return tensors
    weights_file = path / WEIGHTS_NAME
    if weights_file.is_file():
        return read_safetensors_file(weights_file)
    other = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".safetensors", ".gguf"))
    found = f" (found {', '.join(other)}; only safetensors weights are read)" if other else ""
    raise FileNotFoundError(f"no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME} in model folder {path}{found}")


def write_safetensors_header(tensors: Mapping[str, tuple[str, tuple[int, ...]]], metadata: dict | None = None):
    """The header bytes (length prefix included) of a safetensors file holding `tensors`, in order.

    `tensors` maps name -> (safetensors dtype, shape); the data must follow in the same order.
    """
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        nbytes = math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as the safetensors library writes it
    return struct.pack("<Q", len(text)) + text
