"""The walls between the host bookkeeping and the device code hold at run time: importing the
scheduler and its collaborators loads neither JAX nor flax (a fresh interpreter each, since
this process has long loaded both), and the package's names still load on first use."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

# Plain Python (and numpy): what decides a step, bookkeeps blocks and builds outputs.
HOST_MODULES = ("scheduler", "kv_cache_manager", "block_pool", "prefix_cache", "request",
                "sampling_params", "outputs", "spec_decode", "baselines", "beam_search",
                "config", "generation_defaults", "intmath", "step_inputs", "snapshot", "plan")
DEVICE_PACKAGES = ("jax", "flax", "torch", "transformers")


def loaded_after(code: str) -> list[str]:
    probe = (f"import sys\n{code}\nimport json\n"
             f"print(json.dumps([m for m in {DEVICE_PACKAGES!r} if m in sys.modules]))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", HOST_MODULES)
def test_host_bookkeeping_loads_no_jax(module):
    assert loaded_after(f"import paged_jax.{module}") == []


def test_the_package_names_load_on_first_use():
    assert loaded_after("import paged_jax; paged_jax.SamplingParams(); "
                        "from paged_jax import EngineConfig") == []
    assert "jax" in loaded_after("from paged_jax import LLM")
    with pytest.raises(AttributeError, match="no attribute 'Nothing'"):
        import paged_jax
        paged_jax.Nothing  # noqa: B018


def test_no_import_cycle_among_the_packages_modules():
    """Imports inside functions count too: a lazy import that closes a circle (as
    models/llama.py <-> sharding.py once did) still ties the two modules together."""
    import ast
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1] / "paged_jax"
    modules = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("paged_jax"):
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    deps.add(full if full in modules else node.module)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("paged_jax."))
        graph[name] = deps & set(modules) - {name, "paged_jax"}

    def reaches(start, goal, seen):
        for dep in graph[start]:
            if dep == goal or (dep not in seen and not seen.add(dep)
                               and reaches(dep, goal, seen)):
                return True
        return False

    cycles = sorted(name for name in graph if reaches(name, name, set()))
    assert cycles == [], f"modules on an import cycle: {cycles}"
