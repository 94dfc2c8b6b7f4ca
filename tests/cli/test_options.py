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
