"""fold_batchnorm keeps float outputs and computes the folded weights as the formula says."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import EXAMPLE, SHARED, ort_run
from qcompile.exporter import to_proto, write_model
from qcompile.importer import import_model
from qcompile.pipeline import PassContext, PassManager
from qcompile.registry import PASSES, load_builtins_and_entry_points

load_builtins_and_entry_points()


def _fold(path, tmp_path):
    graph = import_model(path)
    ctx = PassContext()
    PassManager([PASSES.get("fold_batchnorm")()]).run(graph, ctx)
    return graph, write_model(to_proto(graph), tmp_path / "folded.onnx"), ctx


@pytest.mark.parametrize("path,shape,count", [
    (EXAMPLE / "digits_mobilenet_bn.onnx", (8, 1, 32, 32), 17),
    (SHARED / "models" / "efficientnet_lite0_bn.onnx", (1, 3, 224, 224), 49),
    (SHARED / "models" / "ch_ppocr_mobile_v2.0_cls_infer.onnx", (2, 3, 48, 192), 35),
])
def test_float_outputs_unchanged(tmp_path, path, shape, count):
    graph, folded, _ = _fold(path, tmp_path)
    assert not [n for n in graph.nodes if n.op_type == "BatchNormalization"]
    assert sum("batchnorm" in n.meta for n in graph.nodes) == count
    name = onnx.load(str(path), load_external_data=False).graph.input[0].name
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    if path.name.startswith("digits"):
        x = np.load(EXAMPLE / "test.npz")["input"][:8]
    expected, got = ort_run(path, {name: x})[0], ort_run(folded, {name: x})[0]
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


def test_hand_worked_conv_bn(tmp_path):
    w = np.array([[[[1.0]], [[2.0]]], [[[-1.0]], [[0.5]]]], np.float32)  # 2 out, 2 in, 1x1
    b = np.array([0.5, -1.0], np.float32)
    gamma, beta = np.array([2.0, 0.5], np.float32), np.array([0.1, 0.2], np.float32)
    mean, var = np.array([1.0, -2.0], np.float32), np.array([3.0, 0.0], np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"]),
         helper.make_node("BatchNormalization", ["c", "g", "be", "m", "v"], ["y"], epsilon=1.0)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 1, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 1, 1])],
        [numpy_helper.from_array(a, n) for a, n in ((w, "w"), (b, "b"), (gamma, "g"), (beta, "be"), (mean, "m"), (var, "v"))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "cbn.onnx"))
    folded_graph, _, _ = _fold(tmp_path / "cbn.onnx", tmp_path)
    conv = folded_graph.nodes[0]
    # sigma_hat = sqrt(var + eps) = [2, 1]; factor = gamma / sigma_hat = [1, 0.5]
    np.testing.assert_allclose(conv.inputs[1].const, [[[[1.0]], [[2.0]]], [[[-0.5]], [[0.25]]]])
    # b' = (b - mean) * factor + beta = [(0.5 - 1) * 1 + 0.1, (-1 + 2) * 0.5 + 0.2]
    np.testing.assert_allclose(conv.inputs[2].const, [-0.4, 0.7], rtol=1e-6)
    np.testing.assert_allclose(conv.meta["batchnorm"]["gamma"], gamma)
    assert [v.name for v in folded_graph.outputs] == ["y"]


def test_bn_after_shared_output_is_left_alone(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"]),
         helper.make_node("BatchNormalization", ["c", "g", "g", "z", "g"], ["y"]),
         helper.make_node("Relu", ["c"], ["r"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 2, 2]),
         helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, 1, 2, 2])],
        [numpy_helper.from_array(np.ones((1, 1, 1, 1), np.float32), "w"),
         numpy_helper.from_array(np.ones(1, np.float32), "g"), numpy_helper.from_array(np.zeros(1, np.float32), "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "shared.onnx"))
    folded_graph, _, ctx = _fold(tmp_path / "shared.onnx", tmp_path)
    assert [n.op_type for n in folded_graph.nodes] == ["Conv", "BatchNormalization", "Relu"]
    assert "other uses" in ctx.notes["not_folded"][0]["reason"]
