"""The geometry figure scripts end to end on the tiny random Gemma 3 (logit judge, a strength where its
detection varies across concepts). Slow: run with ``pytest -m slow``."""

from __future__ import annotations

import pandas as pd
import pytest

SCRIPTS = {
    "fig_swaps.py": [
        "geometry_swaps.html",
        "geometry_swaps.csv",
        "geometry_swap_tests.csv",
        "geometry_partition.csv",
    ],
    "fig_bidirectional.py": ["geometry_bidirectional.html", "geometry_bidirectional.csv"],
    "fig_concept_space.py": [
        "geometry_pca.html",
        "geometry_verbalizability.html",
        "geometry_delta_pcs.csv",
        "geometry_delta_mu.npy",
    ],
    "fig_ridge.py": ["geometry_ridge.html", "geometry_ridge.csv"],
    "fig_noise_controls.py": ["geometry_noise.html", "geometry_noise.csv"],
}


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_geometry_script_runs_on_the_tiny_model(script, tmp_path):
    from mechintro.cli.setup import run_script

    argv = ["--model", "tiny", "--concepts", "held-out:40", "--judge", "logit", "--strength", "8"]
    argv += ["--n-trials", "2", "--rates-trials", "4", "--quiet", "--formats", "html"]
    argv += ["--store", str(tmp_path / "s.sqlite"), "--out", str(tmp_path)]
    run_script(script, argv)
    for name in SCRIPTS[script]:
        assert (tmp_path / name).exists(), name
    from mechintro.behaviour.store import TrialStore

    with TrialStore(tmp_path / "s.sqlite") as store:  # the concept trials only
        assert not store.load()["concept"].str.contains("#").any()
    if script != "fig_ridge.py":  # the steered trials in their own store
        with TrialStore(tmp_path / "s.geometry.sqlite") as store:
            assert store.load()["concept"].str.contains("#").all()
    if script == "fig_swaps.py":
        swaps = pd.read_csv(tmp_path / "geometry_swaps.csv")
        assert set(swaps["kind"]) == {"original", "projection", "residual"}
        assert swaps.groupby("kind").size().to_dict() == {"original": 40, "projection": 80, "residual": 80}
