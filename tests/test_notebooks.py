"""The notebooks run top to bottom (nbclient) on small settings, and show what they promise.

01 runs on the real SmolLM2; 03 plots the tiny-model batching run that test_batching.py checks
(the session fixture batching_run).
"""
from __future__ import annotations

import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"


def execute(name: str, timeout: int = 240) -> str:
    """Runs the notebook (raising on any cell error); returns all its text outputs, and the
    number of PNG images it displayed, as one string."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    texts, images = [], 0
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            assert out.get("output_type") != "error", out
            texts.append(out.get("text", ""))
            data = out.get("data", {})
            texts.append(data.get("text/plain", ""))
            images += "image/png" in data
    return "\n".join(texts) + f"\n[{images} images]"


def test_notebooks_are_generated_from_the_script():
    for name in ("01_quickstart.ipynb", "02_memory_waste.ipynb", "03_batching.ipynb"):
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        nbformat.validate(nb)
        assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), name


def test_quickstart(monkeypatch):
    monkeypatch.delenv("PAGED_JAX_NB_MODEL", raising=False)
    out = execute("01_quickstart.ipynb")
    assert "63 usable KV blocks of 16 tokens" in out
    assert "The capital of France is Paris." in out  # SmolLM2, greedy
    assert "after the prefill" in out and "-> block table [" in out
    assert "layer 0 K cache: (3, 64, 16, 64)" in out  # SmolLM2: 3 KV heads of 64
    assert "free blocks: 63 of 63" in out
    assert "[1 images]" in out  # the block pool (kv_view.plot_kv_pool)


def test_memory_waste(monkeypatch):
    monkeypatch.setenv("PAGED_JAX_NB_REQUESTS", "300")
    out = execute("02_memory_waste.ipynb")
    assert "orca_pow2" in out and "96.3" in out and "wasted" in out
    assert "[2 images]" in out


def test_batching(monkeypatch, make_tiny_llama_dir, batching_run):
    # The notebook plots the run test_batching.py checks (its own run, when the file is
    # missing, is that same experiment with other flags).
    model = make_tiny_llama_dir(tokenizer=True, initializer_range=0.2)
    proc, out_dir = batching_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    monkeypatch.setenv("PAGED_JAX_NB_MODEL", str(model))
    monkeypatch.setenv("PAGED_JAX_NB_RESULTS", str(out_dir / "results.json"))
    out = execute("03_batching.ipynb")
    assert "paged / orca_oracle" in out and "paper: 2.23x" in out
    assert "[1 images]" in out
