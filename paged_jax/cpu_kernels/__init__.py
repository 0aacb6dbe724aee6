"""Paged attention for the CPU: a C++ kernel (paged_attention.cc) called through the XLA FFI.

XLA's CPU gather copies pages at a few GB/s on one thread, so the XLA decode path spent most
of a decode step gathering K and V (docs/RESULTS.md). The kernel reads each page where it lies
and spreads (sequence, KV head, query chunk) items over XLA's intra-op threads. It takes ragged
batches: prefills, chunks of prefills over a cached prefix, and decodes, in any mix.

It reads the pages of every KV cache dtype (paged_jax/kv_quant.py): float32, bfloat16 and
float16 as they are; float8_e4m3fn and float8_e5m2 as fp8 * k_scale (v_scale); int8 pages
[Hkv, N, B, D + 2] as each row's D values times the float16 scale in its last 2 bytes. Rows
are converted to float32 as they are read and everything accumulates in float32; q may be
float32, bfloat16 or float16 and the output has its dtype. It is compiled on first
use with the machine's C++ compiler for the machine's CPU and kept in a cache directory; where
no compiler is found the engine stays on the XLA path (`unavailable_reason` says why).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import numbers
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

from paged_jax.kv_quant import SCALE_BYTES, is_fp8

SOURCE = pathlib.Path(__file__).with_name("paged_attention.cc")
TARGET = "paged_jax_cpu_paged_attention"
WRITE_TARGET = "paged_jax_cpu_write_rows"
Q_DTYPES = tuple(map(jnp.dtype, (jnp.float32, jnp.bfloat16, jnp.float16)))
PAGE_DTYPES = Q_DTYPES + tuple(map(jnp.dtype, (jnp.float8_e4m3fn, jnp.float8_e5m2, jnp.int8)))
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


def _names(dtypes) -> str:
    return ", ".join(d.name for d in dtypes)


def validate(q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, k_scale=1.0,
             v_scale=1.0) -> None:
    """What the kernel assumes of its arguments; raises ValueError naming the mismatch."""
    if q.ndim != 3:
        raise ValueError(f"q must be 3-D [tokens, q heads, head size], got shape {q.shape}")
    if q.dtype not in Q_DTYPES:
        raise ValueError(f"q must be {_names(Q_DTYPES)}, got {q.dtype}")
    if k_cache.dtype not in PAGE_DTYPES:
        raise ValueError(f"the CPU kernel reads pages of {_names(PAGE_DTYPES)}, got "
                         f"{k_cache.dtype} for k_cache")
    if v_cache.dtype != k_cache.dtype:
        raise ValueError(f"k_cache and v_cache must have one dtype, got {k_cache.dtype} and "
                         f"{v_cache.dtype}")
    if k_cache.ndim != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache and v_cache must be 4-D [kv heads, blocks, block size, "
                         f"head size] of one shape, got {k_cache.shape} and {v_cache.shape}")
    if k_cache.dtype == jnp.int8:
        if k_cache.shape[3] != q.shape[2] + SCALE_BYTES:
            raise ValueError(f"int8 pages hold a row's {SCALE_BYTES} scale bytes after its "
                             f"values: q head size {q.shape[2]} needs k_cache's last axis "
                             f"{q.shape[2] + SCALE_BYTES}, got {k_cache.shape[3]}")
    elif q.shape[2] != k_cache.shape[3]:
        raise ValueError(f"q head size {q.shape[2]} != k_cache head size {k_cache.shape[3]}")
    for name, value in (("k_scale", k_scale), ("v_scale", v_scale)):
        if not (isinstance(value, numbers.Real) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if value != 1 and not is_fp8(k_cache.dtype):
            raise ValueError(f"{name} scales float8 pages only, got {name}={value!r} with "
                             f"{k_cache.dtype} pages (int8 rows carry their own scales)")
    if q.shape[1] % k_cache.shape[0]:
        raise ValueError(f"q heads {q.shape[1]} not a multiple of kv heads {k_cache.shape[0]}")
    group = q.shape[1] // k_cache.shape[0]
    if group > 64:
        raise ValueError(f"{group} query heads per KV head; the kernel takes at most 64")
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
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.PagedAttention),
                                    platform="cpu")
        jax.ffi.register_ffi_target(WRITE_TARGET, jax.ffi.pycapsule(lib.WriteRows),
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
                    softcap: float | None = None, k_scale: float = 1.0,
                    v_scale: float = 1.0) -> jax.Array:
    """Ragged paged attention: sequence s owns query tokens [qsl[s], qsl[s + 1]) of q.

    q [T, Hq, D] float32, bfloat16 or float16; k_cache, v_cache [Hkv, N, B, D] (int8:
    [Hkv, N, B, D + 2]) of one PAGE_DTYPES dtype, the new tokens' K/V already written;
    query_start_loc [S + 1], seq_lens [S] (context with the new tokens; 0: padding),
    block_tables [S, MB], all int32. k_scale, v_scale: float8 pages' per-tensor scales (static
    numbers; 1.0 for other pages). Token i of a sequence with qlen new tokens sits at
    position seq_len - qlen + i and attends causally (to its last sliding_window positions if
    given), its scaled scores capped at +-softcap by tanh if given (Gemma 2). Returns
    [T, Hq, D] in q's dtype; padding tokens and sequences of length 0 give zeros.
    """
    validate(q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, k_scale, v_scale)
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0, got {softcap}")
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"the CPU paged-attention kernel is unavailable: {reason}")
    # q and the output are a token's worth per head, small beside the pages: XLA converts them.
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32))
    out = call(q.astype(jnp.float32), k_cache, v_cache, query_start_loc.astype(jnp.int32),
               seq_lens, block_tables, scale=np.float32(scale),
               window=np.int64(sliding_window or 0), softcap=np.float32(softcap or 0.0),
               k_scale=np.float32(k_scale), v_scale=np.float32(v_scale))
    return out.astype(q.dtype)


def paged_decode(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, seq_lens: jax.Array,
                 block_tables: jax.Array, *, scale: float,
                 sliding_window: int | None = None, softcap: float | None = None,
                 k_scale: float = 1.0, v_scale: float = 1.0) -> jax.Array:
    """Decode attention, one query token per sequence: q [S, Hq, D]; seq_lens [S] (0: a padded
    row, whose output is zeros); block_tables [S, MB]. Returns [S, Hq, D] (see
    paged_attention for the dtypes)."""
    if q.ndim != 3 or q.shape[0] != block_tables.shape[0]:
        raise ValueError(f"q {q.shape} must have one token for each of the "
                         f"{block_tables.shape[0]} table rows")
    qsl = jnp.arange(q.shape[0] + 1, dtype=jnp.int32)
    return paged_attention(q, k_cache, v_cache, qsl, seq_lens, block_tables, scale=scale,
                           sliding_window=sliding_window, softcap=softcap, k_scale=k_scale,
                           v_scale=v_scale)


def write_rows(cache: jax.Array, rows: jax.Array, slots: jax.Array) -> jax.Array:
    """cache [Hkv, N, B, W] with rows [Hkv, T, W] (its dtype) written at slots [T] (int32,
    each in [0, N * B)), in place: the result aliases the cache, which the caller donates.
    For 8- and 16-bit pages, whose XLA scatter on the CPU copies the whole cache
    (kv_quant.set_rows). (The cache is passed whole: a reshape before an aliased call makes
    XLA copy it.)"""
    if rows.dtype != cache.dtype or rows.ndim != 3 or cache.ndim != 4 or \
            (rows.shape[0], rows.shape[2]) != (cache.shape[0], cache.shape[3]) or \
            slots.shape != rows.shape[1:2]:
        raise ValueError(f"write_rows: rows {rows.dtype} {rows.shape} must be [Hkv, T, W] of "
                         f"the cache's {cache.dtype} {cache.shape}, slots [T], got "
                         f"{slots.shape}")
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"the CPU kernel library is unavailable: {reason}")
    call = jax.ffi.ffi_call(WRITE_TARGET, jax.ShapeDtypeStruct(cache.shape, cache.dtype),
                            input_output_aliases={0: 0})
    return call(cache, rows, slots.astype(jnp.int32))
