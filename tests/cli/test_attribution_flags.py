"""The attribution script's flags are derived from AttributionConfig and GraphConfig: every derived flag,
given a non-default value, reaches the built config, field by field; today's flag names and defaults stay."""

from __future__ import annotations

from dataclasses import replace

import pytest

from mechintro.attribution.config import AttributionConfig, GraphConfig
from mechintro.cli.attribution import graph_config, main, parser
from mechintro.cli.commands import REPRODUCE_STEPS

# field -> (the flag and its words on the command line, the value the config must then carry), written out
# by hand: a field added to a config without a line here fails test_every_derived_flag_is_listed_here
ROOT_FLAGS = {
    "strengths": (["--strengths", "0,0.25,1.5"], (0.0, 0.25, 1.5)),
    "points": (["--points", "7"], 7),
    "integration": (["--integration", "simpson"], "simpson"),
    "trial": (["--trial", "4"], 4),
    "variant": (["--variant", "skeptical"], "skeptical"),
    "prefix_cache": (["--no-prefix-cache"], False),
}
GRAPH_FLAGS = {
    "depth": (["--depth", "1"], 1),
    "directions": (["--directions", "forward"], ("forward",)),
    "rel_threshold": (["--rel-threshold", "0.25"], 0.25),
    "caps": (["--caps", "4,1"], (4, 1)),
    "sign": (["--sign", "absolute"], "absolute"),
    "remainders": (["--no-remainders"], False),
}
# fields the mechanism run options set (their flags are not derived here)
RUN_OPTIONS = {
    "batch_size": (["--batch-size", "5"], 5),
    "progress": (["--quiet"], False),
}


def _flags(group: str) -> set[str]:
    p = parser()
    found = next(g for g in p._action_groups if g.title == group)
    return {flag for action in found._group_actions for flag in action.option_strings}


def test_every_derived_flag_is_listed_here():
    assert _flags("attribution") == {words[0] for words, _ in ROOT_FLAGS.values()}
    assert _flags("graph") == {words[0] for words, _ in GRAPH_FLAGS.values()}


def test_every_flag_with_a_non_default_value_reaches_the_config():
    argv = [
        word
        for table in (ROOT_FLAGS, GRAPH_FLAGS, RUN_OPTIONS)
        for words, _ in table.values()
        for word in words
    ]
    cfg = graph_config(parser().parse_args(argv))
    default = GraphConfig()
    for name, (_, value) in GRAPH_FLAGS.items():
        assert getattr(cfg, name) == value != getattr(default, name), name
    for name, (_, value) in {**ROOT_FLAGS, **RUN_OPTIONS}.items():
        assert getattr(cfg.root, name) == value != getattr(default.root, name), name


def test_one_flag_at_a_time_changes_only_its_field():
    base = graph_config(parser().parse_args([]))
    for name, (words, value) in ROOT_FLAGS.items():
        cfg = graph_config(parser().parse_args(words))
        assert cfg == replace(base, root=replace(base.root, **{name: value})), name
    for name, (words, value) in GRAPH_FLAGS.items():
        assert graph_config(parser().parse_args(words)) == replace(base, **{name: value}), name


def test_defaults_are_todays():
    args = parser().parse_args([])
    assert (args.n_graphs, args.points, args.depth, args.top, args.strengths) == (2, 21, 2, 15, None)
    assert args.integration == "trapezoid" and args.concept is None and args.compare is None
    cfg = graph_config(args)
    assert cfg == GraphConfig(root=AttributionConfig(batch_size=args.batch_size))
    assert cfg.root.layer is None, "the injection layer comes from the model's spec (--layer sets it there)"


def test_the_reproduce_steps_parse():
    """``mechintro reproduce`` passes ``--n-graphs 1 --points 5 --depth 1 --top 5`` in the quick run."""
    (step,) = [s for s in REPRODUCE_STEPS if s.script == "fig_attribution_graph.py"]
    for quick in (False, True):
        args = parser().parse_args(step.argv(quick=quick, out="out", store="s.sqlite", cache="cache"))
        cfg = graph_config(args)
        expected = (1, 5, 1, 5) if quick else (2, 21, 2, 15)
        assert (args.n_graphs, cfg.root.points, cfg.depth, args.top) == expected


@pytest.mark.parametrize(
    "argv",
    [
        ["--strengths", "0,nan"],
        ["--strengths", "1,0"],
        ["--points", "1"],
        ["--caps", "0"],
        ["--directions", "sideways"],
        ["--rel-threshold", "1.5"],
        ["--variant", "nope"],
        ["--integration", "midpoint"],
        ["--strengths", "0,1", "--integration", "simpson"],
    ],
)
def test_a_bad_value_is_a_usage_error_before_any_model_loads(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--model", "never-loaded"])
    assert exit_.value.code == 2
    assert "error:" in capsys.readouterr().err
