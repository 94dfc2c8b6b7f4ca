"""The notebooks: committed without outputs, and executed end to end (nbclient, a real Jupyter kernel).

``tour.ipynb`` runs as committed on the organism; ``real_model.ipynb`` runs through the same code path as on a
real model, with its parameters pointed at tiny random checkpoints of two families (Gemma 3, sandwich norms;
OLMo 3, norms on the sublayer outputs) and random transcoders in Google's raw Gemma Scope 2 format.
Parameters are overridden the way papermill does it: a cell inserted right after the cell tagged
``parameters``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
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


TOUR_CHECKS = """
# Each result the tour's text states, checked on the numbers it shows (tests/cli/test_notebooks.py).
# 2. No without injection; Yes, naming the concept, at the saturated point.
assert rows[0]["answer"].startswith("No"), rows[0]
assert rows[2]["answer"].startswith("Yes") and concepts[0] in rows[2]["answer"], rows[2]
# 3. At the default strength: part of the injections detected, no false positive.
default = metrics.iloc[0]
assert metrics["strength"].tolist() == [spec.strength] and 0 < default.tpr < 1 and default.fpr == 0, metrics
# 4. At the default: zero at the first and last layer, highest in between; saturated >= default at every
# layer but zero at the last; introspection <= TPR.
swept = mi.detection_metrics(sweep, by=["layer", "strength"])
at = {s: swept[swept["strength"] == s].set_index("layer")["tpr"] for s in swept["strength"].unique()}
saturated, default_tpr = at[spec.resolve_strength("saturated")], at[spec.strength]
first, last = min(layers), max(layers)
assert default_tpr[first] == 0 == default_tpr[last] and default_tpr.max() > 0, default_tpr
assert (saturated >= default_tpr).all() and saturated[last] == 0, (saturated, default_tpr)
assert (swept["introspection"] <= swept["tpr"]).all()
# 5. The top gate: silenced at both ends, both correlations negative, peak at a small positive strength.
top = gates.iloc[0]
assert top.inverted_v > 0.999 and top.spearman_pos < 0 and top.spearman_neg < 0, top
assert not top.peak_at_zero, top
mean = grid.dense(int(top.layer), [int(top["index"])])[:, :, 0].mean(0)
peak = grid.strengths[int(mean.argmax())]
assert 0 < peak < spec.strength, peak
# 7. Ablation (steered runs, gates to unsteered values) lowers the gap; patching raises it past zero.
curve = summarize_gate_curves(curves).set_index(["experiment", "k"])["mean"]
ablation, patching_ = curve["ablation"], curve["patching"]
assert ablation.is_monotonic_decreasing, ablation
assert abs(ablation.iloc[0] + 0.6) < 0.15 and abs(ablation.iloc[-1] + 10) < 0.5, ablation
assert patching_.is_monotonic_increasing, patching_
assert abs(patching_.iloc[0] + 9.4) < 0.15 and abs(patching_.iloc[-1] - 6.6) < 0.3, patching_
forced = curve["forced_ablation"]
assert forced.max() - forced.min() < 0.01, forced
"""
"""Assertions run in the tour's kernel after its last cell: one per result its prose states."""


@pytest.fixture(scope="module")
def tour(tmp_path_factory):
    """The tour executed once on the organism, with :data:`TOUR_CHECKS` run after its last cell."""
    tmp = tmp_path_factory.mktemp("tour")
    nb = with_parameters(_load("tour.ipynb"), STORE=str(tmp / "tour.sqlite"))
    checks = nbformat.v4.new_code_cell(TOUR_CHECKS)
    checks.metadata["tags"] = ["checks"]
    nb.cells.append(checks)
    return execute(nb, tmp)


def test_tour_runs_on_the_organism(tour):
    _check_rendered(tour, figures=6, cards={"FeatureGrid", "SteeringAttribution", "AttributionGraph"})
    assert tour.cells[-1].metadata["tags"] == ["checks"] and tour.cells[-1].outputs == []


def test_the_tours_cards_round_their_numbers(tour):
    html = "\n".join(str(o["data"].get("text/html", "")) for o in outputs(tour) if "data" in o)
    card = html[html.index("<b>AttributionGraph</b>") :]
    row = card[card.index("metric by strength") :].split("</tr>")[0]
    numbers = re.findall(r"-?\d+\.\d+", row)
    assert numbers and all(len(n.lstrip("-").replace(".", "").lstrip("0")) <= 4 for n in numbers), row


def test_the_first_cell_says_how_to_fix_a_kernel_without_mechintro():
    setup = next(c for c in _load("tour.ipynb").cells if c.cell_type == "code")
    assert setup.source == next(c for c in _load("real_model.ipynb").cells if c.cell_type == "code").source
    # -I -S: no site-packages and no working folder, so mechintro cannot be found, as in Lab's own Python.
    done = subprocess.run([sys.executable, "-I", "-S", "-c", setup.source], capture_output=True, text=True)
    assert done.returncode != 0
    said = done.stderr.strip().splitlines()[-1]
    assert said.startswith("ModuleNotFoundError: This kernel's Python has no mechintro"), said
    assert "ipykernel install --user --name mechintro" in said


@pytest.mark.parametrize("name", ["tour.ipynb", "real_model.ipynb"])
def test_notebooks_name_the_mechintro_kernel_and_a_renderer_that_shows_everywhere(name):
    nb = _load(name)
    assert nb.metadata["kernelspec"]["name"] == "mechintro"
    setup = next(c for c in nb.cells if c.cell_type == "code").source
    assert 'pio.renderers.default = "plotly_mimetype+notebook"' in setup


FIGURE_PROBE = """
// A text's four corners on the screen (rotation included), and whether two such boxes are apart
// (separating axes: some edge's normal on which their projections do not overlap).
const corners = (t) => {
  const b = t.getBBox(), m = t.getScreenCTM();
  return [[b.x, b.y], [b.x + b.width, b.y], [b.x + b.width, b.y + b.height], [b.x, b.y + b.height]]
    .map(([x, y]) => [m.a * x + m.c * y + m.e, m.b * x + m.d * y + m.f]);
};
const apart = (p, q) => [p, q].some((poly) => poly.some((a, i) => {
  const b = poly[(i + 1) % 4], n = [a[1] - b[1], b[0] - a[0]];
  const P = p.map(([x, y]) => x * n[0] + y * n[1]), Q = q.map(([x, y]) => x * n[0] + y * n[1]);
  return Math.max(...P) <= Math.min(...Q) + 0.5 || Math.max(...Q) <= Math.min(...P) + 0.5;
}));
window.addEventListener("load", () => setTimeout(() => {
  const page = document.documentElement.clientWidth;
  const figures = [...document.querySelectorAll(".js-plotly-plot")].map((gd) => {
    const box = gd.getBoundingClientRect();
    const area = gd.closest(".jp-OutputArea-output") || gd.parentElement;
    const outside = [...gd.querySelectorAll("svg text")]
      .filter((t) => t.textContent.trim())
      .filter((t) => {
        const b = t.getBoundingClientRect();
        return b.width > 0 && (b.left < box.left - 2 || b.right > box.right + 2);
      })
      .map((t) => t.textContent.slice(0, 40));
    const notes = [...gd.querySelectorAll(".annotation text")].filter((t) => t.textContent.trim());
    const boxes = notes.map(corners), overlaps = [];
    boxes.forEach((a, i) => boxes.slice(i + 1).forEach((b, j) => {
      if (!apart(a, b)) overlaps.push([notes[i].textContent, notes[i + 1 + j].textContent]);
    }));
    return {
      width: box.width, height: box.height, right: box.right,
      traces: (gd.data || []).length,
      drawn: gd.querySelectorAll(".scatterlayer .trace, .barlayer .trace, .heatmaplayer .hm").length,
      scroll: area.scrollWidth - area.clientWidth,
      outside,
      overlaps,
    };
  });
  report({ page, figures });
}, 3000));
"""
"""Per figure of the page: its box, traces and drawn trace groups, the horizontal overflow of its output
area, any text of it drawn outside its box, and how many pairs of its annotations (the graph's node labels,
subplot titles) overlap."""


def test_the_tours_figures_are_drawn_in_its_html_export_at_900_px(tour, tmp_path):
    from headless import probe_page, with_probe
    from nbconvert import HTMLExporter

    shown = nbformat.from_dict(json.loads(json.dumps(tour)))
    shown.cells = [c for c in shown.cells if "checks" not in c.metadata.get("tags", [])]
    body, _ = HTMLExporter(template_name="lab").from_notebook_node(shown)
    page = tmp_path / "tour.html"
    page.write_text(body)
    got = probe_page(with_probe(page, FIGURE_PROBE).as_uri(), width=900)
    figures = got["figures"]
    assert len(figures) == 6, figures
    for i, f in enumerate(figures):
        assert f["width"] > 100 and f["height"] > 100, (i, f)
        assert f["traces"] > 0 and f["drawn"] > 0, (i, f)
        assert f["right"] <= got["page"] + 1 and f["scroll"] <= 1, (i, f, got["page"])
        assert f["outside"] == [], (i, f)
    assert figures[-1]["overlaps"] == [], figures[-1]  # the graph's node labels


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
