"""The notebooks: committed without outputs, and executed end to end (nbclient, a real Jupyter kernel).

``tour.ipynb`` runs as committed on the organism; ``real_model.ipynb`` runs through the same code path as on a
real model, with its parameters pointed at tiny random checkpoints of two families (Gemma 3, sandwich norms;
OLMo 3, norms on the sublayer outputs) and random transcoders in Google's raw Gemma Scope 2 format.
Parameters are overridden the way papermill does it: a cell inserted right after the cell tagged
``parameters``.
"""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[2] / "analyses" / "notebooks"


def _load(name: str) -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOKS / name, as_version=4)


def with_parameters(nb: nbformat.NotebookNode, **params: object) -> nbformat.NotebookNode:
    """A copy of ``nb`` with ``params`` assigned in a cell after its ``parameters`` cell."""
    nb = nbformat.from_dict(json.loads(json.dumps(nb)))
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(tagged) != 1:
        raise ValueError(f"expected one cell tagged 'parameters', found {len(tagged)}")
    source = "\n".join(f"{k} = {v!r}" for k, v in params.items())
    cell = nbformat.v4.new_code_cell(source)
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(tagged[0] + 1, cell)
    return nb


def execute(nb: nbformat.NotebookNode, cwd: Path) -> nbformat.NotebookNode:
    from nbclient import NotebookClient

    NotebookClient(
        nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
    ).execute()
    return nb


def outputs(nb: nbformat.NotebookNode) -> list[dict]:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


def mime_types(nb: nbformat.NotebookNode) -> set[str]:
    return {m for o in outputs(nb) for m in o.get("data", {})}


@pytest.mark.parametrize("name", ["tour.ipynb", "real_model.ipynb"])
def test_committed_without_outputs(name):
    nb = _load(name)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, f"{name} has no code cells"
    for i, c in enumerate(code):
        assert c.get("outputs") == [], f"{name}: code cell {i} has outputs committed (strip them)"
        assert c.get("execution_count") is None, f"{name}: code cell {i} has an execution count committed"
    tags = [c.get("metadata", {}).get("tags", []) for c in code]
    assert sum("parameters" in t for t in tags) == 1, f"{name} needs exactly one cell tagged 'parameters'"


def test_with_parameters_injects_after_the_parameters_cell():
    nb = with_parameters(_load("real_model.ipynb"), MODEL="/x", N_TRIALS=1)
    i = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    assert nb.cells[i + 1].source == "MODEL = '/x'\nN_TRIALS = 1"
    assert "injected-parameters" not in json.dumps(_load("real_model.ipynb"))  # the original is untouched


def _check_rendered(nb: nbformat.NotebookNode, *, figures: int, cards: set[str]) -> None:
    errors = [o for o in outputs(nb) if o.get("output_type") == "error"]
    assert not errors, errors
    plotly = [o for o in outputs(nb) if "application/vnd.plotly.v1+json" in o.get("data", {})]
    assert len(plotly) == figures, f"{len(plotly)} inline plotly figures, expected {figures}"
    html = "\n".join(str(o["data"].get("text/html", "")) for o in outputs(nb) if "data" in o)
    for title in cards:
        assert f"<b>{title}</b>" in html, f"no rich card for {title}"
    assert "<table" in html  # DataFrames render as HTML tables


def test_tour_runs_on_the_organism(tmp_path):
    nb = execute(with_parameters(_load("tour.ipynb"), STORE=str(tmp_path / "tour.sqlite")), tmp_path)
    _check_rendered(nb, figures=6, cards={"FeatureGrid", "AttributionGraph"})


@pytest.mark.parametrize("family", ["gemma3", "olmo3"])
def test_real_model_notebook_runs_on_tiny_random_models_of_two_families(tmp_path, family):
    from mechintro.testing import save_random_transcoders, save_tiny

    model = save_tiny(family, tmp_path / family)
    tcs = save_random_transcoders(tmp_path / "transcoders", seed=3)
    params = {
        "MODEL": str(model),
        "DEVICE": "cpu",
        "DTYPE": "float32",
        "TRANSCODERS": str(tcs),
        "TRANSCODER_ID": "layer_{layer}",
        "GRID_LAYERS": 2,
        "N_CONCEPTS": 3,
        "N_TRIALS": 1,
        "PATCH_LAYERS": 2,
        "STORE": str(tmp_path / "real_model.sqlite"),
    }
    nb = execute(with_parameters(_load("real_model.ipynb"), **params), tmp_path)
    _check_rendered(nb, figures=4, cards={"FeatureGrid", "AttributionGraph"})
    first = next(o for o in outputs(nb) if "text/html" in o.get("data", {}))["data"]["text/html"]
    assert {"gemma3": "Gemma 3", "olmo3": "OLMo 3"}[family] in first and "a default, not calibrated" in first
    said = "".join(o.get("text", "") for o in outputs(nb) if o.get("output_type") == "stream")
    assert "inject at layer 2 of 4, strength 4 (default, not a calibrated point" in said
