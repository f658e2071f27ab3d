"""Quantization arithmetic against the ONNX reference implementation and hand-worked values."""
from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from qcompile.numerics import bias_qparams, dequantize, qparams_from_range, quantize, quantize_bias
from qcompile.qtypes import QuantSpec


def _onnx_quantize(x, scale, zp, axis=None):
    attrs = {"axis": axis} if axis is not None else {}
    elem = helper.np_dtype_to_tensor_dtype(zp.dtype)
    node = helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"], **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                              [helper.make_tensor_value_info("y", elem, x.shape)],
                              [helper.make_tensor("s", TensorProto.FLOAT, scale.shape, scale.reshape(-1)),
                               helper.make_tensor("z", elem, zp.shape, zp.reshape(-1))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    return ReferenceEvaluator(model).run(None, {"x": x})[0]


def test_symmetric_int8_hand_worked():
    spec = QuantSpec(bits=8, signed=True, symmetric=True, narrow=True)
    qp = qparams_from_range(-0.5, 2.54, spec)
    assert np.isclose(qp.scale, 2.54 / 127) and qp.zero_point == 0
    codes = quantize(np.array([2.54, -2.54, 0.01, 0.03, -10.0], np.float32), qp)
    assert codes.tolist() == [127, -127, 0, 2, -127]  # 0.01/0.02 = 0.5 rounds to even 0; 0.03/0.02 = 1.5 -> 2


def test_asymmetric_uint8_matches_onnx_reference():
    spec = QuantSpec(bits=8, signed=False, symmetric=False)
    qp = qparams_from_range(-1.0, 3.0, spec)
    assert np.isclose(qp.scale, 4.0 / 255) and qp.zero_point == 64  # round(0 - (-1)/(4/255)) = round(63.75)
    x = np.random.default_rng(0).uniform(-2, 4, size=(3, 50)).astype(np.float32)
    assert np.array_equal(quantize(x, qp), _onnx_quantize(x, qp.scale, qp.zero_point))
    err = np.abs(dequantize(quantize(x, qp), qp) - np.clip(x, -1, 3))
    assert err.max() <= qp.scale / 2 + 1e-6


def test_per_channel_matches_onnx_reference():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32) * np.array([0.01, 1, 10, 0], np.float32)[:, None, None, None]
    spec = QuantSpec(bits=8, signed=True, symmetric=True, narrow=True, axis=0)
    lo, hi = w.reshape(4, -1).min(1), w.reshape(4, -1).max(1)
    qp = qparams_from_range(lo, hi, spec)
    assert qp.scale.shape == (4,) and qp.scale[3] == 1.0  # dead channel: any positive scale is exact
    assert np.array_equal(quantize(w, qp), _onnx_quantize(w, qp.scale, qp.zero_point, axis=0))
    assert np.abs(quantize(w, qp)).max() == 127


def test_unsigned_symmetric_has_zero_point_zero():
    qp = qparams_from_range(0.0, 6.0, QuantSpec(bits=8, signed=False, symmetric=True))
    assert qp.zero_point == 0 and np.isclose(qp.scale, 6.0 / 255)


def test_bias_int32_scale_and_overflow_guard():
    x_qp = qparams_from_range(-1, 1, QuantSpec(narrow=False))
    w_qp = qparams_from_range(np.array([-1e-8, -1.0]), np.array([1e-8, 1.0]), QuantSpec(narrow=True, axis=0))
    bias = np.array([5.0, 0.25], np.float32)
    b_qp, w2 = bias_qparams(bias, x_qp, w_qp)
    assert w2.scale[1] == w_qp.scale[1]  # channel that fits is untouched
    assert w2.scale[0] > w_qp.scale[0]  # dead channel's scale grows so 5.0 fits in int32
    codes = quantize_bias(bias, b_qp)
    assert np.abs(codes.astype(np.int64)).max() < 2**31 - 1
    assert np.all(np.abs(codes * b_qp.scale.astype(np.float64) - bias) <= b_qp.scale / 2 * (1 + 1e-6))
