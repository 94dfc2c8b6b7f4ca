"""The mechanism scripts' feature-grid flags are derived from FeatureGridConfig: each flag given a non-default
value reaches the config built from the parsed options, and today's flags keep their names and defaults."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

from mechintro.cli.options import field_docs
from mechintro.cli.setup import DEFAULT_STORE, grid_config, mechanism_parser
from mechintro.core.settings import BATCHING
from mechintro.mechanism.features import FeatureGridConfig

GRID_ARGV = [
    *("--grid-strengths", "4,-2,0.5"),
    *("--grid-layers", "3,1"),
    *("--grid-position", "-3"),
    *("--grid-trial", "4"),
    *("--grid-variant", "skeptical"),
    "--no-grid-prefix-cache",
    *("--batch-size", "7"),
]


def _config(argv):
    args = mechanism_parser("doc").parse_args(argv)
    return args, grid_config(SimpleNamespace(args=args, layer=2, strength=1.5))


def test_every_grid_flag_with_a_non_default_value_reaches_the_config():
    _, cfg = _config(GRID_ARGV)
    assert cfg.strengths == (-2.0, 0.5, 4.0)
    assert cfg.layers == (1, 3)
    assert cfg.positions == -3
    assert cfg.trial == 4
    assert cfg.variant == "skeptical"
    assert cfg.prefix_cache is False
    assert cfg.batch_size == 7  # the run options' --batch-size
    assert (cfg.injection_layer, cfg.default_strength) == (2, 1.5)  # the setup's layer and strength
    default = FeatureGridConfig()
    assert all(getattr(cfg, f.name) != getattr(default, f.name) for f in dataclasses.fields(cfg))


def test_without_grid_flags_the_config_is_todays_grid():
    args, cfg = _config([])
    assert cfg == FeatureGridConfig(injection_layer=2, default_strength=1.5, batch_size=BATCHING.batch_size)
    assert (args.layer, args.strength, args.k, args.out, args.cache) == (
        None,
        None,
        200,
        "figures",
        "runs/cache",
    )
    assert (args.store, args.forced, args.threads) == (DEFAULT_STORE, True, 1)


def test_grid_flags_carry_the_fields_docstrings():
    text = " ".join(mechanism_parser("doc").format_help().split())
    for field in dataclasses.fields(FeatureGridConfig):
        if field.metadata.get("cli", True):
            assert field.metadata["flag"] in text
            assert field_docs(FeatureGridConfig)[field.name].replace("``", "")[:40] in text, field.name
