"""README's supported-models table says what the loaders take."""
import pathlib
import re

from paged_jax.checkpoint.gguf_convert import GGUF_ARCHITECTURES
from paged_jax.checkpoint.hf import SUPPORTED_ARCHITECTURES

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def model_rows() -> dict[str, list[str]]:
    text = README.read_text()
    table = text.split("<!-- models -->", 1)[1].split("<!-- /models -->", 1)[0]
    rows = {}
    for line in table.strip().splitlines()[2:]:  # after the header and its rule
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[re.fullmatch(r"`(\w+)`", cells[0]).group(1)] = cells[1:]
    return rows


def test_the_supported_models_table_matches_the_loaders():
    rows = model_rows()
    assert set(rows) == set(SUPPORTED_ARCHITECTURES)
    for architecture, (safetensors, gguf, _) in rows.items():
        assert safetensors == "yes"
        assert gguf.startswith("yes") == (architecture in GGUF_ARCHITECTURES.values())
    for gguf_name, architecture in GGUF_ARCHITECTURES.items():
        assert f"`general.architecture` {gguf_name}" in rows[architecture][1]


def test_paged_jax_models_lists_the_registry(capsys):
    from paged_jax.cli import main
    from paged_jax.models.registry import FAMILIES

    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines] == [[f.architecture, f.model_type]
                                                    for f in FAMILIES]
