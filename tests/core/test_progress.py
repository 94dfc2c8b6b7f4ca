"""The long loops show a tqdm bar that reaches its total, and stay silent with ``progress=False``."""

from __future__ import annotations

import re

import pytest

from mechintro.attribution.passes import steering_attribution
from mechintro.core.concepts import concept_vectors
from mechintro.core.models import spec_for
from mechintro.mechanism.curves import gate_curves_logit
from mechintro.mechanism.features import feature_grid
from mechintro.mechanism.patching import PatchingConfig, component_patching

CONCEPTS = ["Bread", "Oceans", "Dust"]


@pytest.fixture(scope="module")
def vecs(tiny):
    return concept_vectors(tiny, CONCEPTS, layer=spec_for(tiny).injection_layer)


def _runs(tiny, tcs, vecs):
    inj = spec_for(tiny).injection_layer
    return {
        "feature grid": (
            6,
            lambda p: feature_grid(
                tiny, tcs, CONCEPTS, vectors=vecs, strengths=[0.0, 4.0], batch_size=4, progress=p
            ),
        ),
        "component patching": (
            3 * 2 * 3,  # experiments x sites (1 layer x 2 components) x concepts, one trial
            lambda p: component_patching(
                tiny,
                CONCEPTS,
                vectors=vecs,
                config=PatchingConfig(layers=(inj + 1,), batch_size=5),
                progress=p,
            ),
        ),
        "gate curves": (
            3 * 2 * 3,  # experiments x ks x concepts
            lambda p: gate_curves_logit(
                tiny, tcs, [(inj + 1, 0), (inj + 1, 1)], CONCEPTS, vectors=vecs, ks=[0, 2], progress=p
            ),
        ),
        "steering attribution": (
            3 * 3,  # concepts x strengths
            lambda p: steering_attribution(
                tiny, {inj + 1: tcs[inj + 1]}, CONCEPTS, strengths=[0.0, 2.0, 4.0], vectors=vecs, progress=p
            ),
        ),
    }


@pytest.mark.parametrize(
    "desc", ["feature grid", "component patching", "gate curves", "steering attribution"]
)
def test_long_loops_show_a_bar_that_reaches_its_total(tiny, tcs, vecs, capsys, desc):
    total, run = _runs(tiny, tcs, vecs)[desc]
    run(True)
    err = capsys.readouterr().err
    assert re.search(rf"{desc}: 100%\|.*\| {total}/{total} ", err), err[-400:]
    run(False)
    assert capsys.readouterr().err == ""


def test_training_loops_step_through_a_bar_that_is_cleared(capsys):
    from mechintro.core.progress import progress_steps

    assert list(progress_steps(5, desc="train")) == [0, 1, 2, 3, 4]
    assert list(progress_steps(3, desc="quiet", enabled=False)) == [0, 1, 2]
    assert "quiet" not in capsys.readouterr().err


def test_only_the_factory_imports_tqdm():
    """Every progress bar comes from :mod:`mechintro.core.progress` (one look, one switch)."""
    from pathlib import Path

    import mechintro

    root = Path(mechintro.__file__).parent
    users = sorted(
        str(p.relative_to(root))
        for p in root.rglob("*.py")
        if "data" not in p.relative_to(root).parts[:1]
        and re.search(r"^\s*(from|import) tqdm", p.read_text(), re.M)
    )
    assert users == ["core/progress.py"]
