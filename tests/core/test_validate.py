"""The one set of argument checks: each accepts what it should, in its canonical type, and refuses bools,
wrong types and out-of-range values with a message naming the argument."""

import math

import numpy as np
import pytest
import torch

from mechintro.core import validate


@pytest.mark.parametrize("value", [0, 3, np.int64(2), torch.tensor(5)])
def test_integer_accepts_integers_of_every_kind(value):
    out = validate.integer("n", value, minimum=0)
    assert out == int(value) and type(out) is int


@pytest.mark.parametrize("value", [True, False, 1.0, "1", None, torch.tensor(True), np.float64(2)])
def test_integer_refuses_bools_and_non_integers(value):
    with pytest.raises(ValueError, match="n must be an int"):
        validate.integer("n", value)


def test_integer_names_its_minimum_and_the_value():
    with pytest.raises(ValueError, match=r"batch_size must be an int >= 1, got 0"):
        validate.count("batch_size", 0)
    with pytest.raises(ValueError, match="trial must be a positive int, got -2"):
        validate.integer("trial", -2, minimum=1, requirement="a positive int")


def test_layer_names_the_valid_range():
    assert validate.layer(3, n_layers=4) == 3
    for bad in (4, -1, True, 1.5):
        with pytest.raises(ValueError, match=r"valid layers are 0..3"):
            validate.layer(bad, n_layers=4, model="tiny")


def test_numbers():
    assert validate.finite_number("x", 2) == 2.0
    assert validate.positive_number("ttl_s", 0.5) == 0.5
    for bad in (math.nan, math.inf, True, "1"):
        with pytest.raises(ValueError, match="x must be a finite number"):
            validate.finite_number("x", bad)
    for bad in (0, -1, math.inf, False):
        with pytest.raises(ValueError, match="ttl_s must be a positive number of seconds"):
            validate.positive_number("ttl_s", bad, unit="of seconds")


def test_strength_list_keeps_order_and_drops_repeats():
    assert validate.strength_list([4, 2, 4.0, -1]) == [4.0, 2.0, -1.0]
    assert validate.strength_list(3) == [3.0]
    for bad in ([], [True], ["a"], [math.nan]):
        with pytest.raises(ValueError, match="strength"):
            validate.strength_list(bad)


def test_strength_tensor_keeps_autograd_and_refuses_non_numbers():
    s = torch.tensor([1.0, 2.0], requires_grad=True)
    out = validate.strength_tensor(s)
    assert out.requires_grad and out.shape == (2,)
    assert validate.strength_tensor(4).tolist() == [4.0]
    with pytest.raises(TypeError):
        validate.strength_tensor([True])
    with pytest.raises(ValueError, match="finite"):
        validate.strength_tensor([1.0, math.inf])
    with pytest.raises(ValueError, match="empty"):
        validate.strength_tensor([])


class _Model:
    class cfg:  # noqa: N801 (stands for a model's config)
        d_model = 8


def test_vectors_shape_width_and_finiteness():
    out = validate.vectors(_Model(), np.ones((2, 8)), ["a", "b"])
    assert out.dtype == torch.float32 and out.shape == (2, 8)
    assert validate.vectors(_Model(), torch.ones(8), ["a"]).shape == (1, 8)
    with pytest.raises(ValueError, match=r"\[concept=3, d_model\]"):
        validate.vectors(_Model(), torch.ones(2, 8), ["a", "b", "c"])
    with pytest.raises(ValueError, match="d_model is 8"):
        validate.vectors(_Model(), torch.ones(2, 7), ["a", "b"])
    bad = torch.ones(2, 8)
    bad[1, 3] = math.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        validate.vectors(_Model(), bad, ["a", "b"])


def test_a_refused_argument_is_both_a_type_and_a_value_error():
    for check in (lambda: validate.integer("n", True), lambda: validate.layer(9, n_layers=4)):
        with pytest.raises(validate.InvalidArgument) as info:
            check()
        assert isinstance(info.value, TypeError) and isinstance(info.value, ValueError)
