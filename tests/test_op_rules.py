"""op_rules.clamp_bounds: the bounds every pass reads off a Relu or Clip, in each ONNX form."""
from __future__ import annotations

import math

import numpy as np
import pytest

from qcompile.ir import Graph
from qcompile.op_rules import clamp_bounds


def _node(op_type: str, bounds: list, attributes: dict | None = None):
    g = Graph()
    x = g.add_value("x", dtype=1, shape=(8,))
    def bound(b):  # a float: a constant; a name: a computed value; None: omitted
        if isinstance(b, float):
            return g.add_constant("b", np.array(b, np.float32))
        return g.add_value(b, dtype=1, shape=()) if b else None
    inputs = [x] + [bound(b) for b in bounds]
    return g, g.add_node(op_type, inputs, 1, name="n", attributes=attributes)


@pytest.mark.parametrize("op_type, bounds, attributes, expected", [
    ("Relu", [], None, (0.0, math.inf)),
    ("Clip", [0.0, 6.0], None, (0.0, 6.0)),            # opset 11+: bounds are inputs
    ("Clip", [-1.5], None, (-1.5, math.inf)),          # max omitted
    ("Clip", [None, 6.0], None, (-math.inf, 6.0)),     # min omitted (empty input name)
    ("Clip", [], {"min": 0.0, "max": 6.0}, (0.0, 6.0)),  # opset < 11: attributes
    ("Clip", [], {"max": 2.0}, (-math.inf, 2.0)),
    ("Sigmoid", [], None, None),
])
def test_clamp_bounds_in_every_form(op_type, bounds, attributes, expected):
    _, node = _node(op_type, bounds, attributes)
    assert clamp_bounds(node) == expected


def test_clamp_bounds_refuses_a_computed_bound():
    _, node = _node("Clip", [0.0, "computed_max"])
    assert clamp_bounds(node) is None
