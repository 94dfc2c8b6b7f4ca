"""The two elicitation scripts end to end on the tiny random model (smoke: every part runs, numbers are
written, artifacts are reused on a second run)."""

from __future__ import annotations

from mechintro.cli.setup import run_script

TINY = ["--model", "tiny", "--n-trials", "1", "--max-new-tokens", "4", "--formats", "html", "--quiet"]


def test_fig_bias_vector_runs_every_part_and_reuses_its_artifacts(tmp_path):
    argv = [
        *TINY,
        *("--labels", "injected", "--sweep-labels", "injected", "--concepts", "Bread,Oceans"),
        *("--train-eval", "Dust", "--sweep-concepts", "Bread", "--injection-concepts", "Bread"),
        *("--sweep-layers", "1,3", "--arm-layers", "1", "--epoch-size", "8", "--sweep-epoch-size", "8"),
        *("--dose-multiples", "0.5,1", "--artifacts", str(tmp_path / "art"), "--out", str(tmp_path / "figs")),
    ]
    run_script("fig_bias_vector.py", argv)
    numbers = (tmp_path / "figs" / "bias_vector_numbers.txt").read_text()
    for part in ("== headline", "== dose", "Figure 16 left", "Figure 16 right", "+74.7"):
        assert part in numbers
    for name in ("gains", "dose", "layers", "injection"):
        assert (tmp_path / "figs" / f"bias_vector_{name}.html").exists()
    assert sorted(p.name for p in (tmp_path / "art").glob("bias_L*")) == [
        "bias_L1_injected_e1x8_b8_lr0.01",
        "bias_L2_injected_e1x8_b8_lr0.01",
        "bias_L3_injected_e1x8_b8_lr0.01",
    ]
    saved = tmp_path / "art" / "bias_L2_injected_e1x8_b8_lr0.01" / "bias.safetensors"
    stamp = saved.stat().st_mtime_ns
    run_script("fig_bias_vector.py", [*argv, "--parts", "headline"])
    assert saved.stat().st_mtime_ns == stamp  # the cached bias is loaded, not retrained and saved again


def test_fig_direction_ablation_runs(tmp_path):
    argv = [
        *TINY,
        *(
            "--concepts",
            "Bread,Oceans",
            "--grid-concepts",
            "Bread,Oceans,Dust",
            "--k",
            "3",
            "--n-random",
            "1",
        ),
        *("--multiples", "1", "--artifacts", str(tmp_path / "art"), "--out", str(tmp_path / "figs")),
    ]
    run_script("fig_direction_ablation.py", argv)
    numbers = (tmp_path / "figs" / "direction_ablation_numbers.txt").read_text()
    assert "gates' say-No direction" in numbers and "random 1" in numbers
    assert (tmp_path / "figs" / "direction_ablation.html").exists()
