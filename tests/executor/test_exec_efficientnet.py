"""A real network: EfficientNet-Lite0 quantized by onnxruntime's own tool, run by the integer executor.

onnxruntime.quantization.quantize_static (QOperator format, per-channel int8 weights, uint8
activations, MinMax on two images) lowers the shared float model to QuantizeLinear, 49
QLinearConv, 17 Pad (on codes), 9 QLinearAdd, QLinearGlobalAveragePool, Reshape, QGemm and
DequantizeLinear. Mode "onnx" must reproduce onnxruntime's logits bit for bit. The QDQ export of
the same model still has float Conv between its QuantizeLinear / DequantizeLinear pairs and must
be refused.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from qcompile.executor import IntegerExecutor, UnsupportedOpError

from test_exec_vs_onnxruntime import ort_run

SHARED = Path(__file__).resolve().parents[3] / "shared"
MODEL = SHARED / "models" / "efficientnet_lite0_fused.onnx"
DATA = SHARED / "data" / "imagenet_sample_dev.npz"

pytestmark = pytest.mark.skipif(not (MODEL.exists() and DATA.exists()), reason="shared EfficientNet-Lite0 not found")


def _images(start: int, count: int) -> np.ndarray:
    images = np.load(DATA)["images"][start:start + count]
    return ((images.astype(np.float32) - 127.0) / 128.0).transpose(0, 3, 1, 2)  # shared/README.md


def _quantize(tmp_path: Path, quant_format) -> onnx.ModelProto:
    from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._batches = iter({"input": image[None]} for image in _images(0, 2))

        def get_next(self):
            return next(self._batches, None)

    out = tmp_path / "quantized.onnx"
    quantize_static(str(MODEL), str(out), Reader(), quant_format=quant_format, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return onnx.load(str(out))


@pytest.fixture(scope="module")
def qoperator_model(tmp_path_factory) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantFormat

    return _quantize(tmp_path_factory.mktemp("effnet"), QuantFormat.QOperator)


def test_qoperator_graph_is_what_we_expect(qoperator_model):
    ops = {n.op_type for n in qoperator_model.graph.node}
    assert {"QLinearConv", "QLinearAdd", "QLinearGlobalAveragePool", "QGemm", "Pad"} <= ops
    assert not ops & {"Conv", "Add", "Clip", "Gemm"}


def test_onnx_mode_logits_bit_exact_with_onnxruntime(qoperator_model):
    executor = IntegerExecutor(qoperator_model, mode="onnx")
    for image in _images(100, 2):
        feeds = {"input": image[None]}
        np.testing.assert_array_equal(executor.run(feeds)["logits"], ort_run(qoperator_model, feeds))


def test_fixed_point_mode_predicts_like_onnx_mode(qoperator_model):
    onnx_mode = IntegerExecutor(qoperator_model, mode="onnx")
    fixed = IntegerExecutor(qoperator_model, mode="fixed-point")
    for image in _images(102, 2):
        feeds = {"input": image[None]}
        reference = onnx_mode.run(feeds)["logits"][0]
        logits = fixed.run(feeds)["logits"][0]
        assert int(np.argmax(logits)) in np.argsort(reference)[-5:]
        assert np.abs(logits - reference).max() < 1.0  # measured 0.11-0.33 on dev images 100-103


def test_fixed_point_mode_each_op_within_one_lsb_of_onnxruntime_on_its_inputs(qoperator_model, tmp_path):
    """End to end, fixed-point codes drift tens of LSB from onnxruntime's: a requantization 1 LSB
    off is amplified by the convolutions after it. Given onnxruntime's inputs, each op is within 1."""
    from qcompile.verify import verify

    onnx.save(qoperator_model, tmp_path / "quantized.onnx")
    np.save(tmp_path / "images.npy", _images(104, 2))
    result = verify(tmp_path / "quantized.onnx", tmp_path / "images.npy", mode="fixed-point", samples=2)
    checks = result.layers + result.outputs
    assert result.passed and max(c.max_lsb for c in checks) == 1
    assert max(c.drift_lsb for c in result.layers) > 1
    assert all(c.identical > 0.95 * c.elements for c in checks)


def test_qdq_model_is_refused_because_conv_stays_float(tmp_path):
    from onnxruntime.quantization import QuantFormat

    model = _quantize(tmp_path, QuantFormat.QDQ)
    with pytest.raises(UnsupportedOpError, match="op Conv in node .* has no integer kernel"):
        IntegerExecutor(model)
