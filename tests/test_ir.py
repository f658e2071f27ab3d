"""The IR keeps use-def true; its checker catches what a careless edit would break."""
from __future__ import annotations

import numpy as np
import pytest

from qcompile.ir import Graph, Use


def _chain() -> tuple[Graph, list]:
    g = Graph()
    x = g.add_value("x", dtype=1, shape=(1, 4))
    g.inputs.append(x)
    w = g.add_constant("w", np.ones((4, 4), np.float32))
    mm = g.add_node("MatMul", [x, w], 1, name="mm")
    relu = g.add_node("Relu", [mm.outputs[0]], 1, name="relu")
    g.outputs.append(relu.outputs[0])
    return g, [mm, relu]


def test_uses_follow_edits():
    g, (mm, relu) = _chain()
    y = mm.outputs[0]
    assert y.uses() == [Use(relu, 0)]
    ident = g.add_node("Identity", [y], 1, name="id", after=mm)
    y.replace_all_uses_with(ident.outputs[0], except_nodes=[ident])
    assert y.uses() == [Use(ident, 0)]
    assert ident.outputs[0].uses() == [Use(relu, 0)]
    g.check()


def test_remove_refuses_used_node_and_check_finds_stale_use():
    g, (mm, relu) = _chain()
    with pytest.raises(ValueError, match="still used"):
        g.remove_node(mm)
    relu._inputs[0] = g.values["w"]  # bypass the IR's methods: the checker must notice
    with pytest.raises(AssertionError):
        g.check()


def test_toposort_restores_order_and_detects_cycles():
    g, (mm, relu) = _chain()
    g.nodes.reverse()
    g.toposort()
    assert g.nodes == [mm, relu]
    mm.replace_input(1, relu.outputs[0])
    with pytest.raises(ValueError, match="cycle"):
        g.toposort()


def test_fresh_names_never_collide():
    g, _ = _chain()
    assert g.fresh_name("x") == "x_1"
    assert g.fresh_name("new") == "new"
