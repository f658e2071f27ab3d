"""import -> export with no passes keeps every shared model bit-identical in onnxruntime."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from conftest import EXAMPLE, SHARED, ort_run
from qcompile.exporter import to_proto, write_model
from qcompile.importer import import_model

MODELS = {
    "efficientnet_lite0_fused.onnx": {"input": (1, 3, 224, 224)},
    "efficientnet_lite0_bn.onnx": {"input": (1, 3, 224, 224)},
    "ch_ppocr_mobile_v2.0_cls_infer.onnx": {"x": (2, 3, 48, 192)},
    "ch_PP-OCRv4_det_infer.onnx": {"x": (1, 3, 96, 160)},
}


def _feeds(shapes):
    rng = np.random.default_rng(0)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_shared_model_round_trip_is_exact(name, tmp_path):
    source = SHARED / "models" / name
    out = write_model(to_proto(import_model(source)), tmp_path / name)
    onnx.checker.check_model(str(out), full_check=True)
    feeds = _feeds(MODELS[name])
    for expected, got in zip(ort_run(source, feeds), ort_run(out, feeds)):
        assert expected.shape == got.shape
        assert np.array_equal(expected, got)


@pytest.mark.parametrize("name", ["ch_ppocr_mobile_v2.0_cls_infer.onnx", "ch_PP-OCRv4_det_infer.onnx"])
def test_opset_conversion_to_13_keeps_outputs(name, tmp_path):
    source = SHARED / "models" / name
    graph = import_model(source, min_opset=13)
    assert graph.opset("") == 13
    out = write_model(to_proto(graph), tmp_path / name)
    feeds = _feeds(MODELS[name])
    for expected, got in zip(ort_run(source, feeds), ort_run(out, feeds)):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_constant_nodes_become_initializers():
    graph = import_model(SHARED / "models" / "ch_ppocr_mobile_v2.0_cls_infer.onnx")
    assert not [n for n in graph.nodes if n.op_type == "Constant"]
    conv = next(n for n in graph.nodes if n.op_type == "Conv")
    assert conv.inputs[1].is_const


def test_example_round_trip(tmp_path):
    source = EXAMPLE / "digits_mobilenet_bn.onnx"
    out = write_model(to_proto(import_model(source)), tmp_path / "m.onnx")
    x = np.load(EXAMPLE / "test.npz")["input"][:8]
    assert np.array_equal(ort_run(source, {"input": x})[0], ort_run(out, {"input": x})[0])
