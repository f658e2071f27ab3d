"""Classification metrics against independent definitions: ONNX TopK (its reference implementation and
onnxruntime) for top-k with tied logits, and a hand-worked KL divergence."""
from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from qcompile.metrics import Reference, mean_kl, metric, topk_accuracy
from qcompile.runtime import session


def _topk_model(k: int) -> onnx.ModelProto:
    node = helper.make_node("TopK", ["x", "k"], ["values", "indices"], axis=1, largest=1, sorted=1)
    graph = helper.make_graph([node], "topk", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None])],
                              [helper.make_tensor_value_info("values", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("indices", TensorProto.INT64, None)],
                              [helper.make_tensor("k", TensorProto.INT64, [1], [k])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


@pytest.fixture
def tied_logits():
    """1000-class logits on a coarse grid, as quantized logits are: every row has ties at the top.
    Half the labels are the first of the tied classes, so how ties rank decides those rows."""
    rng = np.random.default_rng(0)
    logits = rng.integers(0, 3, size=(300, 1000)).astype(np.float32)
    labels = np.where(rng.random(300) < 0.5, logits.argmax(axis=1), rng.integers(0, 1000, size=300))
    return logits, labels


@pytest.mark.parametrize("k", [1, 3])
def test_topk_ranks_ties_like_onnx_topk(tied_logits, k):
    logits, labels = tied_logits
    model = _topk_model(k)
    by_reference = ReferenceEvaluator(model).run(None, {"x": logits})[1]
    by_onnxruntime = session(model).run(None, {"x": logits})[1]
    np.testing.assert_array_equal(by_reference, by_onnxruntime)  # both follow the spec: lower index first
    expected = float(np.mean(np.any(by_reference == labels[:, None], axis=1)))
    assert topk_accuracy(logits, labels, k) == expected


def test_top1_metric_and_agreement_judge_a_tie_alike(tied_logits):
    logits, labels = tied_logits
    ties = np.sum(logits == logits.max(axis=1, keepdims=True), axis=1) > 1
    assert ties.mean() > 0.5  # the case that matters is common here
    top1 = metric("top1").compute([logits], Reference(("logits",), [logits], labels))
    assert top1 == pytest.approx(100.0 * np.mean(logits.argmax(axis=1) == labels))
    # worked by hand: [1, 1, 0] ranks class 0 first, then class 1
    row = np.array([[1.0, 1.0, 0.0]], np.float32)
    assert topk_accuracy(row, np.array([0]), 1) == 1.0
    assert topk_accuracy(row, np.array([1]), 1) == 0.0
    assert topk_accuracy(row, np.array([1]), 2) == 1.0
    assert topk_accuracy(row, np.array([2]), 5) == 1.0  # k above the class count means every class


def test_mean_kl_hand_worked():
    # p = softmax([0, 0]) = (1/2, 1/2), q = softmax([ln 3, 0]) = (3/4, 1/4):
    # KL(p ‖ q) = 1/2 ln(2/3) + 1/2 ln(2) = 1/2 ln(4/3); identical rows give 0
    reference = np.array([[0.0, 0.0], [1.0, 2.0]])
    other = np.array([[math.log(3.0), 0.0], [1.0, 2.0]])
    assert mean_kl(reference, other) == pytest.approx(0.5 * (0.5 * math.log(4.0 / 3.0)), rel=1e-12)
    assert mean_kl(reference, reference + 5.0) == pytest.approx(0.0, abs=1e-15)  # softmax ignores a shift
