"""Flags derived from a config's fields: every field gets its flag and help, and a parsed non-default value
reaches the built config."""

import argparse
from dataclasses import dataclass, field
from typing import Literal

import pytest

from mechintro.cli.options import add_config_arguments, config_from_args, field_docs


@dataclass(frozen=True)
class Toy:
    """A config of every kind of field."""

    n_trials: int = 2
    """Trials per concept."""
    temperature: float = 1.0
    """Sampling temperature."""
    forced: bool = False
    """Also run forced trials."""
    retry_errors: bool = True
    """Run failed judges again."""
    variant: Literal["original", "skeptical"] = "original"
    """The prompt variant."""
    layers: tuple[int, ...] = (1, 2)
    """Injection layers."""
    store: str | None = None
    """A trial store (100% resumable)."""
    hidden: object = field(default=None, metadata={"cli": False})
    """Not on the command line."""

    def __post_init__(self):
        if self.n_trials < 1:
            raise ValueError("n_trials must be an int >= 1")


def _parser(**kw):
    p = argparse.ArgumentParser()
    add_config_arguments(p, Toy, **kw)
    return p


def test_field_docs_are_the_docstrings_under_the_fields():
    assert field_docs(Toy)["n_trials"] == "Trials per concept."
    assert "hidden" in field_docs(Toy)


def test_every_flag_with_a_non_default_value_reaches_the_config():
    argv = "--n-trials 7 --temperature 0.5 --forced --no-retry-errors --variant skeptical --layers 3,4,5"
    cfg = config_from_args(Toy, _parser().parse_args([*argv.split(), "--store", "x.sqlite"]))
    assert cfg == Toy(7, 0.5, True, False, "skeptical", (3, 4, 5), "x.sqlite")


def test_defaults_help_and_no_flag_fields():
    p = _parser(defaults={"n_trials": 4})
    assert config_from_args(Toy, p.parse_args([])) == Toy(n_trials=4)
    text = p.format_help()
    assert "Trials per concept. (default: 4)" in text and "--hidden" not in text and "100%" in text
    with pytest.raises(SystemExit):
        p.parse_args(["--variant", "other"])
    with pytest.raises(SystemExit):
        p.parse_args(["--layers", "a,b"])


def test_the_configs_own_checks_run_on_what_was_typed():
    with pytest.raises(ValueError, match="n_trials"):
        config_from_args(Toy, _parser().parse_args(["--n-trials", "0"]))


def test_only_and_exclude_name_real_fields():
    assert "--forced" not in _parser(only=["n_trials"]).format_help()
    with pytest.raises(ValueError, match="no field 'nope'"):
        _parser(exclude=["nope"])


# ------------------------------------------------------------------------- the trial commands' real flags

# Every flag derived from the trial configs, with a value that is not its default and the value the config
# must then carry: written by hand, so that a flag that does not reach its field fails here.
RUN_FLAGS = {
    "n_trials": (["--n-trials", "7"], 7),
    "forced": (["--forced"], True),
    "temperature": (["--temperature", "0.5"], 0.5),
    "max_new_tokens": (["--max-new-tokens", "33"], 33),
    "seed": (["--seed", "5"], 5),
    "batch_size": (["--batch-size", "3"], 3),
    "progress": (["--quiet"], False),
    "retry_errors": (["--no-retry-errors"], False),
    "lease_s": (["--lease-s", "9.5"], 9.5),
}
EVALUATE_FLAGS = RUN_FLAGS | {
    "layer": (["--layer", "2"], 2),
    "strength": (["--strength", "saturated"], "saturated"),
    "variant": (["--variant", "skeptical"], "skeptical"),
    "persona": (["--persona", "simulated_user"], "simulated_user"),
}
SWEEP_FLAGS = RUN_FLAGS | {
    "layers": (["--layers", "0,2"], (0, 2)),
    "strengths": (["--strengths", "1.5,3"], (1.5, 3.0)),
    "variants": (["--variants", "original,skeptical"], ("original", "skeptical")),
    "personas": (
        ["--personas", "standard_assistant,simulated_user"],
        ("standard_assistant", "simulated_user"),
    ),
}
TARGET = ["--model", "tiny", "--concepts", "Bread,Dust", "--judge", "logit", "--store", "s.sqlite"]
TARGET += ["--threads", "2", "--device", "cpu"]


def _captured(monkeypatch, command: str, flags: dict, target: list[str] = TARGET) -> tuple:
    """(config, target) that ``mechintro <command>`` hands its runner when given every flag of ``flags`` and
    the ``target`` options."""
    from mechintro.cli import commands
    from mechintro.cli.main import main

    seen = {}

    def runner(config, **target):
        seen.update(config=config, target=target)
        return 0

    monkeypatch.setattr(commands, f"run_{'evaluation' if command == 'evaluate' else command}", runner)
    argv = [word for words, _ in flags.values() for word in words]
    assert main([command, *argv, *target]) == 0
    return seen["config"], seen["target"]


@pytest.mark.parametrize(("command", "flags"), [("evaluate", EVALUATE_FLAGS), ("sweep", SWEEP_FLAGS)])
def test_every_trial_flag_with_a_non_default_value_reaches_the_config(monkeypatch, command, flags):
    from mechintro.behaviour.plan import SweepConfig, TrialConfig
    from mechintro.cli.commands import EVALUATE_FIELDS, SWEEP_FIELDS
    from mechintro.cli.setup import RUN_FIELDS

    cls, own = (TrialConfig, EVALUATE_FIELDS) if command == "evaluate" else (SweepConfig, SWEEP_FIELDS)
    assert set(flags) == {*RUN_FIELDS, *own}  # a new flagged field needs its line above
    defaults = cls(n_trials=10)
    for name, (_, value) in flags.items():
        assert getattr(defaults, name) != value, name  # the test would prove nothing for this field
    config, target = _captured(monkeypatch, command, flags)
    assert isinstance(config, cls)
    for name, (_, value) in flags.items():
        assert getattr(config, name) == value, name
    assert target == {
        "model": "tiny",
        "concepts": "Bread,Dust",
        "judge": "logit",
        "store": "s.sqlite",
        "device": "cpu",
        "threads": 2,
        "executor": "local",
    }


def test_the_trial_commands_keep_their_defaults(monkeypatch):
    """The flags' defaults users had before they were derived from the configs."""
    from mechintro.behaviour.plan import SweepConfig, TrialConfig

    run = {
        "n_trials": 10,
        "forced": False,
        "temperature": 1.0,
        "max_new_tokens": 100,
        "seed": 0,
        "batch_size": 64,
        "progress": True,
        "retry_errors": True,
        "lease_s": 600.0,
        "controls": True,
        "trials": tuple(range(1, 11)),
    }
    config, target = _captured(monkeypatch, "evaluate", {}, [])
    assert config == TrialConfig(
        **run, layer=None, strength=None, variant="original", persona="standard_assistant"
    )
    assert target == {
        "model": "organism",
        "concepts": "held-out",
        "judge": "rule",
        "store": None,
        "device": None,
        "threads": None,
        "executor": "local",
    }
    config, _ = _captured(monkeypatch, "sweep", {}, [])
    assert config == SweepConfig(
        **run, layers=None, strengths=None, variants=("original",), personas=("standard_assistant",)
    )


def test_the_run_options_of_the_scripts_reach_run_trials_keywords(capsys):
    from mechintro.cli.setup import add_run_options, run_settings

    p = argparse.ArgumentParser()
    add_run_options(p)
    settings = run_settings(p.parse_args([word for words, _ in RUN_FLAGS.values() for word in words]))
    assert set(settings) == {*RUN_FLAGS, "store", "executor"}
    for name, (_, value) in RUN_FLAGS.items():
        assert settings[name] == value, name
    args = p.parse_args(["--quiet"])
    assert args.quiet is True  # the scripts read --quiet as args.quiet
    for argv, needle in (
        (["--n-trials", "0"], "expected an integer >= 1"),
        (["--seed", "-1"], "expected an integer >= 0"),
        (["--lease-s", "0"], "expected a number > 0"),
        (["--temperature", "nan"], "finite"),
    ):
        with pytest.raises(SystemExit):
            p.parse_args(argv)
        assert needle in capsys.readouterr().err


def test_every_trial_config_field_has_a_docstring():
    from dataclasses import fields

    from mechintro.behaviour.plan import RunConfig, SweepConfig, TrialConfig

    for cls in (RunConfig, TrialConfig, SweepConfig):
        docs = field_docs(cls)
        assert [f.name for f in fields(cls) if not docs.get(f.name)] == [], cls.__name__
