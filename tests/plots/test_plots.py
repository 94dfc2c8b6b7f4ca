"""Figures build from small synthetic trial tables; the paper panel has the paper's data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mechintro.behaviour.metrics import detection_metrics
from mechintro.core.prompts import PAPER_VARIANTS, PERSONAS
from mechintro.plots import behaviour as plots
from mechintro.plots import save


def synthetic_trials(
    *,
    layers=(0, 1, 2),
    strengths=(1.0, 4.0),
    variants=("original",),
    personas=("standard_assistant",),
    n=20,
    seed=0,
) -> pd.DataFrame:
    """Trial rows in the store's format with random verdicts (detection more likely with strength)."""
    rng = np.random.default_rng(seed)
    rows = []
    for layer in layers:
        for variant in variants:
            for persona in personas:
                settings = [("control", 0.0)] + [(c, s) for s in strengths for c in ("injection", "forced")]
                for condition, strength in settings:
                    for i in range(n):
                        hit = bool(rng.random() < 0.05 + 0.1 * strength)
                        forced = condition == "forced"
                        rows.append(
                            {
                                "model": "synthetic",
                                "judge": "rule",
                                "concept": f"c{i % 5}",
                                "trial": i % 10 + 1,
                                "sample": i // 10,
                                "condition": condition,
                                "layer": layer,
                                "strength": strength,
                                "variant": variant,
                                "persona": persona,
                                "detected": None if forced else hit,
                                "identified": None if forced else hit and bool(rng.random() < 0.5),
                                "forced_identified": hit if forced else None,
                                "judge_error": None,
                            }
                        )
    return pd.DataFrame(rows)


def test_layer_sweep_figure_has_our_series_and_the_papers():
    metrics = detection_metrics(synthetic_trials(), by=("layer", "strength"))
    fig = plots.layer_sweep_figure(metrics, model_name="synthetic")
    lines = [t for t in fig.data if t.mode == "lines+markers"]
    ours = [t for t in lines if t.name.startswith("ours")]
    paper = [t for t in lines if t.name.startswith("paper")]
    assert len(ours) == 2 * len(plots.METRICS)  # strengths x metric rows
    assert len(paper) == 5 * len(plots.METRICS)  # the paper's strengths 1..5
    assert all(len(t.x) == 62 and np.isfinite(np.asarray(t.y, dtype=float)).any() for t in paper)
    assert any(max(t.y) > 0.4 for t in paper if t.xaxis == "x2")  # the paper's TPR peak, about 0.5
    bands = [t for t in fig.data if t.fill == "toself"]
    assert len(bands) == len(lines)
    titles = [a.text for a in fig.layout.annotations]
    assert any("Paper: Gemma3-27B-IT" in t for t in titles) and "Ours: synthetic" in titles


def test_paper_metrics_are_read_and_checked():
    paper = plots.paper_layer_metrics()
    assert len(paper) == 62 * 5 and set(paper.strength) == {1.0, 2.0, 3.0, 4.0, 5.0}
    for m in plots.METRICS:
        assert (paper[f"{m}_lo"] <= paper[m] + 1e-9).all() and (paper[m] <= paper[f"{m}_hi"] + 1e-9).all()
    assert paper.loc[paper.strength == 4.0, "tpr"].max() == pytest.approx(0.5, abs=0.1)


def test_variant_and_persona_bars():
    trials = synthetic_trials(layers=(1,), strengths=(4.0,), variants=PAPER_VARIANTS)
    fig = plots.variants_figure(detection_metrics(trials, by=("variant",)))
    assert [t.name.split(":")[0] for t in fig.data] == ["TPR", "FPR"]
    assert list(fig.data[0].x) == list(PAPER_VARIANTS)
    assert (np.asarray(fig.data[0].error_y.array) >= 0).all()
    trials = synthetic_trials(layers=(1,), strengths=(4.0,), personas=PERSONAS)
    fig = plots.personas_figure(detection_metrics(trials, by=("persona",)))
    assert list(fig.data[1].x) == list(PERSONAS)


def test_figures_refuse_ambiguous_metrics():
    metrics = detection_metrics(synthetic_trials(variants=("original", "skeptical")))
    with pytest.raises(ValueError, match="one metrics row per"):
        plots.layer_sweep_figure(metrics)


def test_save_figure_writes_html(tmp_path):
    fig = plots.variants_figure(
        detection_metrics(synthetic_trials(layers=(1,), variants=PAPER_VARIANTS), by=("variant",))
    )
    paths = save.save_figure(fig, "variants", tmp_path / "figs", formats=("html",))
    assert paths == [tmp_path / "figs" / "variants.html"] and paths[0].stat().st_size > 1000
    with pytest.raises(ValueError, match="valid"):
        save.save_figure(fig, "variants", tmp_path, formats=("gif",))
    assert "cdn.plot.ly" in paths[0].read_text()
    for name in ("a", "b"):  # offline: one shared plotly.js beside the HTML files, none embedded
        save.save_figure(fig, name, tmp_path / "offline", formats=("html",), offline=True)
    files = sorted(p.name for p in (tmp_path / "offline").iterdir())
    assert files == ["a.html", "b.html", "plotly.min.js"]
    html = (tmp_path / "offline" / "a.html").read_text()
    assert 'src="plotly.min.js"' in html and "cdn.plot.ly" not in html and len(html) < 100_000


def test_without_a_browser_figures_degrade_to_html_with_one_message(tmp_path, monkeypatch, capsys):
    """CI's machine has a browser, so the missing one is simulated: the HTML is written, PNG skipped, and one
    message per process says how to get PNGs; MECHINTRO_BROWSER=none hides a browser on purpose."""
    from mechintro.plots import browser

    fig = plots.variants_figure(
        detection_metrics(synthetic_trials(layers=(1,), variants=PAPER_VARIANTS), by=("variant",))
    )
    monkeypatch.setattr(browser, "_warned", set())
    monkeypatch.setattr(save, "browser_path", lambda: None)
    monkeypatch.setattr(
        type(fig), "write_image", lambda *a, **k: pytest.fail("tried to render without a browser")
    )
    first = save.save_figure(fig, "variants", tmp_path)
    second = save.save_figure(fig, "personas", tmp_path)
    assert first == [tmp_path / "variants.html"] and second == [tmp_path / "personas.html"]
    assert (tmp_path / "variants.html").stat().st_size > 1000 and not list(tmp_path.glob("*.png"))
    err = capsys.readouterr().err
    assert err.count("written as HTML only") == 1 and "MECHINTRO_BROWSER" in err

    monkeypatch.undo()
    monkeypatch.setenv("MECHINTRO_BROWSER", "none")
    assert browser.browser_path() is None and "none hides" in browser.hint()
    monkeypatch.setenv("MECHINTRO_BROWSER", str(tmp_path / "no-such-chrome"))
    assert browser.browser_path() is None and "not an executable" in browser.hint()


def test_static_export_uses_the_browser_found(tmp_path, monkeypatch):
    """With a browser the PNG goes through kaleido with BROWSER_PATH set to it (restored afterwards)."""
    seen = {}
    fig = plots.variants_figure(
        detection_metrics(synthetic_trials(layers=(1,), variants=PAPER_VARIANTS), by=("variant",))
    )

    def fake_write_image(self, path, width=None, height=None, scale=1):
        import os

        seen["browser"], seen["scale"] = os.environ.get("BROWSER_PATH"), scale
        seen["size"] = (width, height)
        path.write_bytes(b"\x89PNG")

    monkeypatch.delenv("BROWSER_PATH", raising=False)
    monkeypatch.setattr(save, "browser_path", lambda: "/opt/chrome/chrome")
    monkeypatch.setattr(type(fig), "write_image", fake_write_image)
    paths = save.save_figure(fig, "variants", tmp_path)
    assert paths == [tmp_path / "variants.html", tmp_path / "variants.png"]
    assert seen == {"browser": "/opt/chrome/chrome", "scale": 2, "size": (1100, fig.layout.height)}
    import os

    assert "BROWSER_PATH" not in os.environ


def test_figures_fill_their_container_and_pngs_keep_a_fixed_size(tmp_path):
    """On screen no fixed width (autosize); the PNG is Style.width x the figure's height, at scale 2, through
    the real browser (make test installs it); a figure's own width wins."""
    import struct

    import plotly.io as pio

    from mechintro.plots.style import STYLE

    renderer, template = pio.renderers.default, pio.templates.default
    fig = plots.variants_figure(
        detection_metrics(synthetic_trials(layers=(1,), variants=PAPER_VARIANTS), by=("variant",))
    )
    assert fig.layout.width is None and fig.layout.autosize is True
    assert (pio.renderers.default, pio.templates.default) == (renderer, template), "globals untouched"
    assert save.browser_path(), "no browser for PNG figures: run `make browser`"

    def png_size(path):
        return struct.unpack(">II", path.read_bytes()[16:24])

    (png,) = save.save_figure(fig, "auto", tmp_path, formats=("png",))
    assert png_size(png) == (2 * STYLE.width, 2 * fig.layout.height)
    fig.update_layout(width=640)
    (png,) = save.save_figure(fig, "fixed", tmp_path, formats=("png",))
    assert png_size(png) == (2 * 640, 2 * fig.layout.height)


def test_plotted_values_are_the_metrics(tmp_path):
    """Each plotted point is the metric it is labelled with: our TPR line at a strength is that strength's TPR
    per layer, the FPR line the FPR, and the variant bars each variant's TPR / FPR (swapping fails)."""
    trials = synthetic_trials(layers=(0, 1, 2, 3), strengths=(1.0, 4.0), n=40, seed=3)
    metrics = detection_metrics(trials, by=("layer", "strength"))
    fig = plots.layer_sweep_figure(metrics, model_name="synthetic")
    axes = {name: f"y{2 * i + 1}" if i else "y" for i, name in enumerate(plots.METRICS)}  # column 1 of row i
    for metric, axis in axes.items():
        for strength in (1.0, 4.0):
            (line,) = [t for t in fig.data if t.name == f"ours: strength {strength:g}" and t.yaxis == axis]
            expected = metrics[metrics.strength == strength].sort_values("layer")[metric].to_numpy()
            np.testing.assert_allclose(np.asarray(line.y, dtype=float), expected)
    tpr, fpr = (metrics[metrics.strength == 4.0][m].to_numpy() for m in ("tpr", "fpr"))
    assert not np.allclose(tpr, fpr), "the synthetic rates must tell TPR from FPR"

    trials = synthetic_trials(layers=(1,), strengths=(4.0,), variants=PAPER_VARIANTS, n=40, seed=4)
    by_variant = detection_metrics(trials, by=("variant",)).set_index("variant").loc[list(PAPER_VARIANTS)]
    bars = plots.variants_figure(by_variant.reset_index())
    np.testing.assert_allclose(np.asarray(bars.data[0].y, dtype=float), by_variant["tpr"].to_numpy())
    np.testing.assert_allclose(np.asarray(bars.data[1].y, dtype=float), by_variant["fpr"].to_numpy())
