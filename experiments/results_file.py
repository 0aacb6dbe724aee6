"""Where every experiment leaves its numbers: out_dir/results.json."""
from __future__ import annotations

import json
import os
import pathlib
import platform


# CPU features that change the figures: vector width, and native bfloat16 matmuls.
_CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "neon", "asimd")


def machine() -> dict:
    """The machine the figures came from: CPU model, cores, the flags that matter, and the
    JAX platform, so that figures from different machines are told apart."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in ("", platform.machine()):
                model = value.strip()
            elif key.strip() in ("flags", "Features"):
                flags.update(value.split())
    except OSError:
        pass
    import jax

    return dict(cpu=model, cores=os.cpu_count(), cpu_flags=[f for f in _CPU_FLAGS if f in flags],
                jax_platform=jax.default_backend(), jax=jax.__version__)


def describe(m: dict) -> str:
    return (f"{m['cpu']}, {m['cores']} cores ({' '.join(m['cpu_flags']) or 'no listed flags'}), "
            f"jax {m['jax']} on {m['jax_platform']}")


def write_results(out_dir: str, results: dict) -> pathlib.Path:
    """Writes results.json, with the machine's description, into out_dir (made if missing),
    prints the machine line, and returns out_dir as a Path."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = {**results, "machine": {**machine(), **results.get("machine", {})}}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"machine: {describe(results['machine'])}")
    return out


def publish(out_dir: str, results: dict, report: str) -> None:
    """write_results, then the report and where the numbers went, on stdout."""
    out = write_results(out_dir, results)
    print(report)
    print(f"wrote {out / 'results.json'}")
