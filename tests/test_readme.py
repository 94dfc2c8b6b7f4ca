"""The README's API tour runs as written, on the organism, with the tour's own (small) settings, and gives
what its comments say."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def tour_source(text: str) -> str:
    """The python block of the README's "## API tour" section (the first one there)."""
    _, found, rest = text.partition("\n## API tour\n")
    assert found, "README.md has no '## API tour' section"
    section = rest.split("\n## ", 1)[0]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the API tour has no python block"
    return match.group(1)


def test_tour_is_found_and_short():
    source = tour_source(README.read_text())
    assert source.startswith("import mechintro as mi\n")
    assert len(source.splitlines()) <= 25


def test_tour_runs_on_the_organism(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the tour's store is a relative path
    namespace: dict = {"__name__": "readme_tour"}
    exec(compile(tour_source(README.read_text()), f"{README}:API tour", "exec"), namespace)
    mi, model, spec = namespace["mi"], namespace["model"], namespace["spec"]
    d_model = model.cfg.d_model

    assert spec.strength == pytest.approx(2.11)  # "2.11, {"saturated": 4.0} on the organism"
    assert spec.operating_points == {"saturated": 4.0}
    assert namespace["vecs"].shape == (2, d_model) and namespace["vecs"].dtype == torch.float32
    assert namespace["logits"].shape[-2] == namespace["prompt"].tokens.shape[-1]  # a logit row per token
    assert set(namespace["df"]["concept"]) == set(namespace["concepts"])
    assert (tmp_path / "runs" / "trials.sqlite").is_file()
    cfg = namespace["cfg"]  # "or those keywords": the keyword call reads the same stored rows
    keywords = mi.run_trials(
        model,
        namespace["concepts"],
        layer=cfg.layer,
        strength=cfg.strength,
        n_trials=2,
        forced=True,
        judge=mi.RuleJudge(),
        store="runs/trials.sqlite",
        progress=False,
    )
    assert keywords.drop(columns="created_at").equals(namespace["df"].drop(columns="created_at"))
    acts = namespace["acts"][mi.HookNames.resid_post(3)]
    assert acts.shape == (1, 1, d_model)  # [batch, 1, d_model]
    assert len(namespace["gates"]) > 0
    assert isinstance(namespace["graph"], mi.AttributionGraph) and len(namespace["graph"].nodes) > 0
