"""Paged attention for the CPU: a C++ kernel (paged_attention.cc) called through the XLA FFI.

XLA's CPU gather copies pages at a few GB/s on one thread, so the XLA decode path spent most
of a decode step gathering K and V (docs/RESULTS.md). The kernel reads each page where it lies
and spreads (sequence, KV head, query chunk) items over XLA's intra-op threads. It takes ragged
batches: prefills, chunks of prefills over a cached prefix, and decodes, in any mix. It is compiled on first
use with the machine's C++ compiler for the machine's CPU and kept in a cache directory; where
no compiler is found the engine stays on the XLA path (`unavailable_reason` says why).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

SOURCE = pathlib.Path(__file__).with_name("paged_attention.cc")
TARGET = "paged_jax_cpu_paged_attention_f32"
# -ffast-math lets the dot products and exp vectorize (libmvec); the kernel keeps no
# infinities or NaNs. It is given to the compile step only: linking a shared library with
# it would add crtfastmath, which flushes denormals for the whole process.
COMPILE_FLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp-simd", "-std=c++17", "-fPIC",
                 "-w")


def cache_dir() -> pathlib.Path:
    """Where built kernels are kept: beside paged-jax's other caches (converted checkpoints,
    compiled steps), under $XDG_CACHE_HOME or ~/.cache."""
    root = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return pathlib.Path(root).expanduser() / "paged_jax" / "cpu_kernels"


def validate(q, k_cache, v_cache, query_start_loc, seq_lens, block_tables) -> None:
    """What the kernel assumes of its arguments; raises ValueError naming the mismatch."""
    if q.ndim != 3:
        raise ValueError(f"q must be 3-D [tokens, q heads, head size], got shape {q.shape}")
    if k_cache.ndim != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache and v_cache must be 4-D [kv heads, blocks, block size, "
                         f"head size] of one shape, got {k_cache.shape} and {v_cache.shape}")
    if q.shape[2] != k_cache.shape[3]:
        raise ValueError(f"q head size {q.shape[2]} != k_cache head size {k_cache.shape[3]}")
    if q.shape[1] % k_cache.shape[0]:
        raise ValueError(f"q heads {q.shape[1]} not a multiple of kv heads {k_cache.shape[0]}")
    group = q.shape[1] // k_cache.shape[0]
    if group > 64:
        raise ValueError(f"{group} query heads per KV head; the kernel takes at most 64")
    for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if x.dtype != jnp.float32:
            raise ValueError(f"the CPU kernel takes float32, got {x.dtype} for {name}")
    if block_tables.ndim != 2 or block_tables.dtype != jnp.int32:
        raise ValueError(f"block_tables must be int32 [S, MB], got {block_tables.dtype} "
                         f"{block_tables.shape}")
    s = block_tables.shape[0]
    if seq_lens.shape != (s,) or seq_lens.dtype != jnp.int32:
        raise ValueError(f"seq_lens must be int32 [{s}] like block_tables' rows, got "
                         f"{seq_lens.dtype} {seq_lens.shape}")
    if query_start_loc.shape != (s + 1,):
        raise ValueError(f"query_start_loc must be [{s + 1}] (S + 1), got "
                         f"{query_start_loc.shape}")


def _cpu_signature() -> str:
    # -march=native builds for this CPU: a cache shared between machines keys on it.
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = ""
    return f"{platform.machine()} {flags}"


@functools.lru_cache(maxsize=None)
def _load() -> ctypes.CDLL | str:
    """The compiled library, registered with XLA; or a string saying why there is none."""
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None:
        return f"no C++ compiler found (CXX={os.environ.get('CXX', 'g++')!r})"
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
        # The FFI headers come with jaxlib; _cpu_signature because of -march=native.
        key = hashlib.sha256(b"\0".join([
            SOURCE.read_bytes(), " ".join(COMPILE_FLAGS).encode(), jaxlib.__version__.encode(),
            cxx.encode(), version.encode(), _cpu_signature().encode()])).hexdigest()[:16]
        lib_path = cache_dir() / f"paged_attention-{key}.so"
        if not lib_path.exists():
            failure = _build(cxx, lib_path)
            if failure:
                return failure
        lib = ctypes.cdll.LoadLibrary(str(lib_path))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.PagedAttentionF32),
                                    platform="cpu")
    except (OSError, RuntimeError) as e:  # unreadable source, unwritable cache, noexec mount
        return f"cannot build or load the kernel: {e}"
    return lib


def _build(cxx: str, lib_path: pathlib.Path) -> str | None:
    """Compiles SOURCE into lib_path; returns the compiler's complaint if it fails."""
    lib_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=lib_path.parent) as tmp:
        obj, lib = os.path.join(tmp, "k.o"), os.path.join(tmp, "k.so")
        for cmd in ([cxx, *COMPILE_FLAGS, "-I", jax.ffi.include_dir(), "-c", str(SOURCE),
                     "-o", obj],
                    [cxx, "-shared", obj, "-o", lib, "-lm"]):
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                return f"compiling {SOURCE.name} failed: {done.stderr.strip()[-2000:]}"
        os.replace(lib, lib_path)  # atomic: concurrent builders never see half a file
    return None


def unavailable_reason() -> str | None:
    """None when the kernel can run here; otherwise why not."""
    if jax.default_backend() != "cpu":
        return f"it runs on the CPU platform, not {jax.default_backend()!r}"
    loaded = _load()
    return loaded if isinstance(loaded, str) else None


def paged_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                    query_start_loc: jax.Array, seq_lens: jax.Array, block_tables: jax.Array,
                    *, scale: float, sliding_window: int | None = None,
                    softcap: float | None = None) -> jax.Array:
    """Ragged paged attention: sequence s owns query tokens [qsl[s], qsl[s + 1]) of q.

    q [T, Hq, D] float32; k_cache, v_cache [Hkv, N, B, D] float32, the new tokens' K/V already
    written; query_start_loc [S + 1], seq_lens [S] (context with the new tokens; 0: padding),
    block_tables [S, MB], all int32. Token i of a sequence with qlen new tokens sits at
    position seq_len - qlen + i and attends causally (to its last sliding_window positions if
    given), its scaled scores capped at +-softcap by tanh if given (Gemma 2). Returns
    [T, Hq, D]; padding tokens and sequences of length 0 give zeros.
    """
    validate(q, k_cache, v_cache, query_start_loc, seq_lens, block_tables)
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0, got {softcap}")
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"the CPU paged-attention kernel is unavailable: {reason}")
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32))
    return call(q, k_cache, v_cache, query_start_loc.astype(jnp.int32), seq_lens, block_tables,
                scale=np.float32(scale), window=np.int64(sliding_window or 0),
                softcap=np.float32(softcap or 0.0))


def paged_decode(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, seq_lens: jax.Array,
                 block_tables: jax.Array, *, scale: float,
                 sliding_window: int | None = None, softcap: float | None = None) -> jax.Array:
    """Decode attention, one query token per sequence: q [S, Hq, D]; seq_lens [S] (0: a padded
    row, whose output is zeros); block_tables [S, MB]. Returns [S, Hq, D]."""
    if q.ndim != 3 or q.shape[0] != block_tables.shape[0]:
        raise ValueError(f"q {q.shape} must have one token for each of the "
                         f"{block_tables.shape[0]} table rows")
    qsl = jnp.arange(q.shape[0] + 1, dtype=jnp.int32)
    return paged_attention(q, k_cache, v_cache, qsl, seq_lens, block_tables, scale=scale,
                           sliding_window=sliding_window, softcap=softcap)
