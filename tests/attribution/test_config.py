"""AttributionConfig and GraphConfig: checked when built, documented field by field, and taken by
steering_attribution / attribution_graph either whole (config=) or as keywords that replace its fields."""

from __future__ import annotations

import dataclasses

import pandas as pd
import pytest
import torch

import mechintro as mi
from mechintro.attribution.config import AttributionConfig, GraphConfig, config_with, graph_config_with
from mechintro.attribution.graph import attribution_graph
from mechintro.attribution.passes import steering_attribution
from mechintro.cli.options import field_docs

GRID = (0.0, 1.5, 3.0)


@pytest.mark.parametrize("cls", [AttributionConfig, GraphConfig])
def test_every_field_has_a_docstring_and_the_configs_are_frozen_and_exported(cls):
    docs = field_docs(cls)
    assert all(docs.get(f.name) for f in dataclasses.fields(cls)), cls
    with pytest.raises(dataclasses.FrozenInstanceError):
        cls().__setattr__("progress" if cls is AttributionConfig else "depth", 0)
    assert getattr(mi, cls.__name__) is cls


def test_the_defaults_are_the_functions_old_defaults():
    cfg = GraphConfig()
    assert (cfg.depth, cfg.directions, cfg.rel_threshold, cfg.caps, cfg.sign, cfg.remainders) == (
        2,
        ("backward", "forward"),
        0.1,
        (8, 5, 3, 2),
        "positive",
        True,
    )
    root = cfg.root
    assert (root.strengths, root.points, root.integration, root.metric, root.layer) == (
        None,
        21,
        "trapezoid",
        None,
        None,
    )
    assert (root.trial, root.variant, root.batch_size, root.prefix_cache, root.progress) == (
        1,
        "original",
        32,
        True,
        True,
    )


@pytest.mark.parametrize(
    ("kw", "error", "match"),
    [
        ({"strengths": [0.0, 2.0, 1.0]}, ValueError, "strictly increasing"),
        ({"strengths": [0.0, float("nan")]}, ValueError, "finite"),
        ({"strengths": [1.0]}, ValueError, "at least 2"),
        ({"strengths": "0,1"}, TypeError, "sequence of numbers"),
        ({"points": 1}, ValueError, "at least 2 points"),
        ({"points": True}, ValueError, "at least 2 points"),
        ({"integration": "midpoint"}, ValueError, "valid: \\['trapezoid', 'simpson'\\]"),
        ({"strengths": [0.0, 1.0], "integration": "simpson"}, ValueError, "at least 3 strengths"),
        ({"layer": 1.5}, ValueError, "layer must be an int"),
        ({"layer": True}, ValueError, "layer must be an int"),
        ({"trial": 0}, ValueError, "trial must be a positive int"),
        ({"variant": "nope"}, ValueError, "valid: \\['original'"),
        ({"batch_size": 0}, ValueError, "batch_size must be a positive integer"),
        ({"batch_size": True}, ValueError, "batch_size must be a positive integer"),
        ({"prefix_cache": 1}, ValueError, "prefix_cache must be True or False"),
        ({"progress": "yes"}, ValueError, "progress must be True or False"),
    ],
)
def test_attribution_config_checks_name_what_is_valid(kw, error, match):
    with pytest.raises(error, match=match):
        AttributionConfig(**kw)


def test_attribution_config_keeps_the_strengths_exactly_as_floats():
    cfg = AttributionConfig(strengths=torch.tensor([0.0, 0.5, 1.25], dtype=torch.float64))
    assert cfg.strengths == (0.0, 0.5, 1.25) and all(type(s) is float for s in cfg.strengths)
    assert AttributionConfig(strengths=[0, 1]).strengths == (0.0, 1.0)


@pytest.mark.parametrize(
    ("kw", "error", "match"),
    [
        ({"depth": -1}, ValueError, "depth must be a non-negative integer"),
        ({"depth": True}, ValueError, "depth must be a non-negative integer"),
        ({"directions": ("sideways",)}, ValueError, "valid: \\['backward', 'forward'\\]"),
        ({"directions": ()}, ValueError, "\\(none\\)"),
        ({"rel_threshold": 1.0}, ValueError, "in \\[0, 1\\)"),
        ({"rel_threshold": float("nan")}, ValueError, "finite"),
        ({"caps": (0,)}, ValueError, "caps must be positive integers"),
        ({"caps": (2, True)}, ValueError, "caps must be positive integers"),
        ({"caps": ()}, ValueError, "caps must be positive integers"),
        ({"sign": "big"}, ValueError, "valid: \\['positive', 'negative', 'absolute'\\]"),
        ({"remainders": None}, ValueError, "remainders must be True or False"),
        ({"root": {"points": 5}}, TypeError, "root must be an AttributionConfig"),
    ],
)
def test_graph_config_checks_name_what_is_valid(kw, error, match):
    with pytest.raises(error, match=match):
        GraphConfig(**kw)


def test_graph_config_normalizes_sequences_and_records_its_selection():
    cfg = GraphConfig(directions=["forward"], caps=[3, 1], rel_threshold=0)
    assert cfg.directions == ("forward",) and cfg.caps == (3, 1) and type(cfg.rel_threshold) is float
    assert [cfg.cap(h) for h in range(4)] == [3, 1, 1, 1]
    assert list(cfg.selection()) == ["depth", "directions", "rel_threshold", "caps", "sign", "remainders"]


def test_keywords_replace_the_configs_fields_and_unknown_ones_name_the_valid():
    base = AttributionConfig(strengths=GRID, batch_size=4)
    got = config_with(AttributionConfig, base, {"batch_size": 7}, caller="f")
    assert got == AttributionConfig(strengths=GRID, batch_size=7)
    assert config_with(AttributionConfig, None, {}, caller="f") == AttributionConfig()
    with pytest.raises(TypeError, match="unexpected settings \\['strenghts'\\]; valid: \\[.*'strengths'"):
        config_with(AttributionConfig, None, {"strenghts": GRID}, caller="f")
    with pytest.raises(TypeError, match="config must be of type AttributionConfig, got GraphConfig"):
        config_with(AttributionConfig, GraphConfig(), {}, caller="f")
    graph = graph_config_with(GraphConfig(depth=1, root=base), {"caps": (2,), "points": 5}, caller="g")
    assert graph == GraphConfig(
        depth=1, caps=(2,), root=AttributionConfig(strengths=GRID, batch_size=4, points=5)
    )
    with pytest.raises(TypeError, match="valid: \\[.*'caps'.*'strengths'"):
        graph_config_with(None, {"cap": 2}, caller="g")


def test_steering_attribution_takes_a_config_or_its_keywords(tiny, tcs):
    kw = {"strengths": GRID, "layer": 1, "batch_size": 4, "progress": False}
    by_keywords = steering_attribution(tiny, tcs, ["Bread"], **kw)
    by_config = steering_attribution(tiny, tcs, ["Bread"], config=AttributionConfig(**kw))
    mixed = steering_attribution(
        tiny, tcs, ["Bread"], config=AttributionConfig(**(kw | {"strengths": (0.0, 1.0)})), strengths=GRID
    )
    for got in (by_config, mixed):
        assert got.settings == by_keywords.settings
        for name in ("features", "remainders", "metric"):
            pd.testing.assert_frame_equal(getattr(got, name), getattr(by_keywords, name))
    with pytest.raises(TypeError, match="unexpected settings \\['depth'\\]"):
        steering_attribution(tiny, tcs, ["Bread"], depth=2, **kw)


def test_attribution_graph_takes_a_config_or_its_keywords(tiny, tcs):
    kw = {"caps": (3, 2), "sign": "absolute", "strengths": GRID, "layer": 1, "progress": False}
    by_keywords = attribution_graph(tiny, tcs, "Bread", 1, **kw)
    cfg = GraphConfig(
        depth=1, caps=(3, 2), sign="absolute", root=AttributionConfig(strengths=GRID, layer=1, progress=False)
    )
    by_config = attribution_graph(tiny, tcs, "Bread", config=cfg)
    positional_depth = attribution_graph(tiny, tcs, "Bread", 1, config=dataclasses.replace(cfg, depth=0))
    for got in (by_config, positional_depth):
        assert got.settings == by_keywords.settings
        pd.testing.assert_frame_equal(got.nodes, by_keywords.nodes)
        pd.testing.assert_frame_equal(got.edges, by_keywords.edges)
    assert by_config.settings["graph"] == {
        "depth": 1,
        "directions": ["backward", "forward"],
        "rel_threshold": 0.1,
        "caps": [3, 2],
        "sign": "absolute",
        "remainders": True,
    }
