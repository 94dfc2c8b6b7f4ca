"""The mechintro command: evaluate, sweep and figures on the tiny random Gemma 3; argument errors."""

from __future__ import annotations

import pytest
import torch

from mechintro.behaviour.judges import LLMJudge, LogitJudge, MissingAPIKeyError, RuleJudge
from mechintro.behaviour.store import TrialStore
from mechintro.cli.main import main
from mechintro.cli.setup import parse_concepts, parse_judge

torch.set_num_threads(1)

RUN = ["--concepts", "Bread,Oceans", "--n-trials", "2", "--max-new-tokens", "4", "--quiet", "--threads", "1"]


def test_evaluate_prints_a_metrics_table(tiny_dir, tmp_path, capsys):
    store = tmp_path / "runs.sqlite"
    argv = [
        "evaluate",
        "--model",
        str(tiny_dir),
        "--layer",
        "1",
        "--strength",
        "4",
        "--judge",
        "rule",
        "--store",
        str(store),
        "--forced",
        *RUN,
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if "tpr" in line).split()
    assert header[:4] == ["layer", "strength", "variant", "persona"]
    assert {"n_injection", "n_control", "n_forced", "tpr", "fpr", "introspection", "forced_id"} <= set(header)
    assert "original" in out and "[" in out  # a row with a rate and its interval
    with TrialStore(store) as s:
        assert len(s) == 2 * 2 * 3


def test_evaluate_defaults_come_from_the_spec(tiny, tiny_dir, tmp_path, capsys):
    from mechintro.core.models import spec_for

    spec = spec_for(tiny)
    assert main(["evaluate", "--model", str(tiny_dir), "--store", str(tmp_path / "s.sqlite"), *RUN]) == 0
    with TrialStore(tmp_path / "s.sqlite") as s:
        df = s.load(condition="injection")
    assert set(df.layer) == {spec.injection_layer} and set(df.strength) == {spec.strength}


def test_sweep_then_figures(tiny_dir, tmp_path, capsys):
    store = tmp_path / "runs.sqlite"
    argv = [
        "sweep",
        "--model",
        str(tiny_dir),
        "--layers",
        "0,2",
        "--strengths",
        "1,8",
        "--store",
        str(store),
        "--judge",
        "logit",
        *RUN,
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("original") == 4  # 2 layers x 2 strengths
    argv = ["figures", "--store", str(store), "--out", str(tmp_path / "figs"), "--formats", "html"]
    assert main(argv) == 0
    assert (tmp_path / "figs" / "layer_sweep.html").stat().st_size > 10_000


def test_bad_arguments_exit_naming_the_choices(tiny_dir, capsys, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    for argv, needle in [
        (["evaluate", "--model", str(tiny_dir), "--judge", "gpt4", *RUN], "rule, logit, llm:<model>"),
        (["evaluate", "--model", str(tiny_dir), "--judge", "llm:gpt-4o", *RUN], "OPENAI_API_KEY"),
        (["evaluate", "--model", str(tiny_dir), "--layer", "9", *RUN], "valid layers are 0..3"),
        (["sweep", "--model", str(tiny_dir), "--concepts", "heldout"], "held-out"),
    ]:
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        assert needle in capsys.readouterr().err


def test_parse_judge_and_concepts(monkeypatch):
    assert isinstance(parse_judge("rule"), RuleJudge) and isinstance(parse_judge("logit"), LogitJudge)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "test")
    judge = parse_judge("anthropic:claude-haiku-4-5")
    assert isinstance(judge, LLMJudge) and judge.name == "llm:claude-haiku-4-5"
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(MissingAPIKeyError):
        parse_judge("llm:gpt-4o")
    with pytest.raises(ValueError, match="valid: rule"):
        parse_judge("llm:")
    assert len(parse_concepts("original")) == 50
    assert parse_concepts("Bread, Oceans,") == ["Bread", "Oceans"]
    with pytest.raises(ValueError, match="concept set"):
        parse_concepts("originals")


def test_demo_still_parses():
    from mechintro.cli.main import build_parser

    assert build_parser().parse_args(["demo"]).func.__name__ == "demo"
    assert build_parser().parse_args(["reproduce"]).func.__name__ == "reproduce"


def test_mechanism_commands_hand_their_arguments_to_the_analyses_scripts(capsys):
    import pytest

    from mechintro.cli.commands import SCRIPT_COMMANDS
    from mechintro.cli.main import main
    from mechintro.cli.setup import analyses_dir

    for command, (_, scripts) in SCRIPT_COMMANDS.items():
        for script in scripts:
            assert (analyses_dir() / script).exists(), script
        with pytest.raises(SystemExit) as stop:
            main([command, "--help"])
        assert stop.value.code == 0
        assert scripts[0] in capsys.readouterr().out


def test_quick_reproduce_never_writes_the_committed_figures(capsys):
    from mechintro.cli.setup import analyses_dir

    with pytest.raises(SystemExit) as stop:
        main(["reproduce", "--quick", "--out", str(analyses_dir().parent / "figures")])
    assert stop.value.code == 2 and "never writes over the committed figures" in capsys.readouterr().err


def test_figures_refuses_a_missing_or_empty_store(tmp_path, capsys):
    out = tmp_path / "figs"
    for store, needle in (
        (tmp_path / "missing.sqlite", "no trial store"),
        (tmp_path / "empty.sqlite", "holds no trials"),
    ):
        if "empty" in store.name:
            TrialStore(store).close()
        with pytest.raises(SystemExit) as stop:
            main(["figures", "--store", str(store), "--out", str(out)])
        assert stop.value.code == 2 and needle in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["evaluate", "--layer", "9"], "valid layers are 0..3"),
        (["evaluate", "--strength", "nan"], "finite"),
        (["evaluate", "--variant", "skeptic"], "valid: ['original'"),
        (["sweep", "--personas", "robot"], "valid: ['standard_assistant'"),
        (["sweep", "--layers", "1,7"], "valid layers are 0..3"),
        (["evaluate", "--threads", "-1"], "expected an integer >= 1"),
        (["evaluate", "--device", "cuda"], "CUDA is not available"),
        (["evaluate", "--device", "tpu"], "valid: cpu, cuda, cuda:N"),
        (["evaluate", "--n-trials", "0"], "expected an integer >= 1"),
    ],
)
def test_argument_errors_come_before_the_model_loads(tiny_dir, monkeypatch, capsys, argv, needle):
    import mechintro.core.models as models

    if "--device" in argv and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded the model before checking"))
    with pytest.raises(SystemExit) as stop:
        main([*argv, "--model", str(tiny_dir), "--concepts", "Bread", "--quiet"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and needle in err
    last = err.strip().splitlines()[-1]  # argparse prints its usage first
    assert "Traceback" not in err and last.startswith(f"mechintro {argv[0]}: error:") and needle in last


def test_environment_errors_are_one_line(tmp_path, capsys, monkeypatch):
    corrupt = tmp_path / "corrupt.sqlite"
    corrupt.write_bytes(b"this is not a database" * 100)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for argv, needle in [
        (["evaluate", "--model", "google/gemma-3-1b-it"], "not in the local Hugging Face cache"),
        (["evaluate", "--model", "tiny", "--store", str(corrupt)], str(corrupt)),
        (["figures", "--store", str(corrupt), "--out", str(tmp_path / "f")], str(corrupt)),
        (["rejudge", "--store", str(corrupt), "--judge", "rule"], str(corrupt)),
    ]:
        with pytest.raises(SystemExit) as stop:
            main([*argv, *(["--concepts", "Bread", "--quiet"] if argv[0] == "evaluate" else [])])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and needle in err and "Traceback" not in err, err


def test_reproduce_steps_name_each_flag_once():
    """A step's own setting replaces the shared one (not a second copy of the flag)."""
    from mechintro.cli.commands import REPRODUCE_STEPS

    for step in REPRODUCE_STEPS:
        for quick in (False, True):
            argv = step.argv(quick=quick, out="out", store="s.sqlite", cache="cache")
            flags = [a for a in argv if a.startswith("--")]
            assert len(flags) == len(set(flags)), (step.script, quick, argv)
            if step.kind != "table":
                assert argv[argv.index("--model") + 1] == "organism"
            else:
                assert "--model" not in argv  # the Gemma organism's command lines are as before
            olmo = step.argv(quick=quick, out="out", store="s.sqlite", cache="cache", model="organism-olmo")
            assert olmo[olmo.index("--model") + 1] == "organism-olmo" and olmo.count("--model") == 1, olmo
            assert [a for a in olmo if a not in ("--model", "organism-olmo")] == [
                a for a in argv if a not in ("--model", "organism")
            ]
    layer_sweep = REPRODUCE_STEPS[1].argv(quick=False, out="o", store="s", cache="c")
    assert layer_sweep[layer_sweep.index("--n-trials") + 1] == "2"  # the step's, not the shared 4


def test_reproduce_on_the_olmo_organism_runs_every_step_on_it(tmp_path, monkeypatch):
    """``reproduce --model organism-olmo``: the evaluation and every script run on the OLMo organism, whose
    root (its report) is looked up by that name."""
    from mechintro.cli import commands
    from mechintro.core import resources

    seen, scripts, roots = [], [], []
    monkeypatch.setattr(commands, "run_evaluation", lambda config, **target: seen.append(target) or 0)
    monkeypatch.setattr(commands.runs, "run_script", lambda script, argv: scripts.append((script, argv)))
    monkeypatch.setattr(resources, "organism_root", lambda name="organism": roots.append(name) or tmp_path)
    only = "fig_organism_profile.py,fig_gates.py,fig_base_vs_instruct.py"
    argv = ["reproduce", "--quick", "--model", "organism-olmo", "--only", only, "--out", str(tmp_path / "o")]
    assert main(argv) == 0
    assert roots == ["organism-olmo"] and seen[0]["model"] == "organism-olmo"
    assert [s for s, _ in scripts] == only.split(",")
    for _, args in scripts:
        assert args[args.index("--model") + 1] == "organism-olmo"
    with pytest.raises(SystemExit) as stop:
        main(["reproduce", "--model", "organism-olmo-base"])
    assert stop.value.code == 2


def test_organism_family_flag_names_the_valid_families(capsys):
    from mechintro.cli import commands
    from mechintro.cli.main import build_parser

    assert build_parser().parse_args(["organism", "train", "--family", "olmo"]).family == "olmo"
    assert build_parser().parse_args(["organism", "train"]).family == "gemma"
    assert commands.ORGANISM_FAMILY_FLAGS == {"gemma": "gemma3", "olmo": "olmo3"}
    for sub in ("train", "calibrate"):
        with pytest.raises(SystemExit) as stop:
            main(["organism", sub, "--family", "llama"])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and "'gemma', 'olmo'" in err, err


@pytest.mark.parametrize("quick", [False, True])
def test_reproduce_evaluates_as_the_command_line_it_used_to_parse(tmp_path, monkeypatch, quick):
    """reproduce calls the shared run_evaluation with a config of its own (it no longer builds an argument
    list and parses it again): the config and target are those `mechintro evaluate` gives for the command line
    reproduce used to parse, so the store gets the same rows."""
    from mechintro.cli import commands
    from mechintro.cli.main import build_parser
    from mechintro.core import resources

    seen = []
    monkeypatch.setattr(
        commands, "run_evaluation", lambda config, **target: seen.append((config, target)) or 0
    )
    monkeypatch.setattr(resources, "organism_root", lambda name="organism": tmp_path)
    out, store = tmp_path / "out", str(tmp_path / "r.sqlite")
    argv = ["reproduce", "--store", store, "--n-trials", "3", "--only", "none.py", "--out", str(out)]
    assert main([*argv, *(["--quick"] if quick else [])]) == 0
    store = str(out / "reproduce.sqlite") if quick else store
    before = ["--store", store, "--forced", "--quiet", "--threads", "1"]
    before += (
        ["--concepts", "held-out:6", "--n-trials", "2", "--max-new-tokens", "24"]
        if quick
        else ["--n-trials", "3", "--max-new-tokens", "40", "--batch-size", "128"]
    )
    assert commands.evaluate(build_parser().parse_args(["evaluate", *before])) == 0
    (config, target), (expected_config, expected_target) = seen
    assert config == expected_config and target == expected_target
