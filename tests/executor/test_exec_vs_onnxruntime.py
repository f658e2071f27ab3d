"""The integer executor against onnxruntime (CPU, graph optimizations off, one thread) on random data.

Every case is one quantized op (onnx or com.microsoft domain) with random 8-bit codes and scales
chosen so the output spans its code range (few saturated values). Mode "onnx" must agree with
onnxruntime on >= 99.9 % of the outputs and never differ by more than 1 LSB (we get 100 % on all
of them on x86-64; the bound is what the brief guarantees, not what we measure). Mode
"fixed-point" must stay within 1 LSB of mode "onnx".
"""
from __future__ import annotations

import math
import zlib

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompile.executor import run_model

ort = pytest.importorskip("onnxruntime")

MS = "com.microsoft"
UNIFORM_STD = 74.0  # standard deviation of codes uniform over 256 values, centred


def _rng(name: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(name.encode()))  # one fixed stream per case


def _elem(array) -> int:
    return helper.np_dtype_to_tensor_dtype(np.asarray(array).dtype)


def single_node_model(op: str, inputs: list, attrs: dict | None = None, *, domain: str = "", opset: int = 13,
                      output_elem: int | None = None) -> tuple[onnx.ModelProto, dict]:
    """One node; inputs are (name, array) with names 'in_*' fed at run time, the rest initializers."""
    names, feeds, initializers, graph_inputs = [], {}, [], []
    for name, array in inputs:
        if array is None:
            names.append("")
            continue
        names.append(name)
        array = np.asarray(array)
        if name.startswith("in_"):
            feeds[name] = array
            graph_inputs.append(helper.make_tensor_value_info(name, _elem(array), array.shape))
        else:
            initializers.append(numpy_helper.from_array(array, name))
    node = helper.make_node(op, names, ["y"], name=f"{op.lower()}_0", domain=domain or None, **(attrs or {}))
    out_elem = output_elem if output_elem is not None else _elem(inputs[0][1])
    graph = helper.make_graph([node], op, graph_inputs, [helper.make_tensor_value_info("y", out_elem, None)],
                              initializers)
    opsets = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 9
    return model, feeds


def ort_run(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def _codes(rng, dtype, shape) -> np.ndarray:
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, shape, endpoint=True).astype(dtype)


def _zero_point(rng, dtype, spread: int = 40) -> np.ndarray:
    middle = 128 if dtype == np.uint8 else 0
    return np.array(middle + rng.integers(-spread, spread + 1), dtype)


def _scale(value: float) -> np.float32:
    return np.float32(value)


# ------------------------------------------------------------------------------------- cases


def conv_case(name, *, x_dtype=np.uint8, w_dtype=np.int8, shape=(1, 16, 20, 20), out_channels=24, kernel=3,
              group=1, stride=1, pads=None, dilation=1, per_channel=True, w_zero=True, bias=True, auto_pad=None,
              domain="", channels_last=False):
    rng = _rng(name)
    n, c = shape[:2]
    spatial = len(shape) - 2
    x = _codes(rng, x_dtype, shape)
    wlo, whi = (-127, 127) if w_dtype == np.int8 else (0, 255)
    w = rng.integers(wlo, whi, (out_channels, c // group) + (kernel,) * spatial, endpoint=True).astype(w_dtype)
    s_x = _scale(rng.uniform(0.01, 0.03))
    s_w = rng.uniform(0.002, 0.006, out_channels if per_channel else 1).astype(np.float32)
    w_zp = np.zeros(s_w.shape, w_dtype) if w_zero else np.full(s_w.shape, 128 if w_dtype == np.uint8 else 3, w_dtype)
    if not per_channel:
        s_w, w_zp = s_w.reshape(()), w_zp.reshape(())
    taps = (c // group) * kernel**spatial
    real_std = float(s_x) * float(np.max(s_w)) * UNIFORM_STD * 74.0 * math.sqrt(taps)
    b = rng.integers(-3000, 3000, out_channels).astype(np.int32) if bias else None
    attrs = dict(group=group, kernel_shape=[kernel] * spatial, strides=[stride] * spatial,
                 dilations=[dilation] * spatial)
    if auto_pad:
        attrs["auto_pad"] = auto_pad
    else:
        attrs["pads"] = pads if pads is not None else [kernel // 2 * dilation] * (2 * spatial)
    if channels_last:
        attrs["channels_last"] = 1
        x = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    return single_node_model("QLinearConv", [
        ("in_x", x), ("x_scale", s_x), ("x_zero_point", _zero_point(rng, x_dtype)), ("w", w), ("w_scale", s_w),
        ("w_zero_point", w_zp), ("y_scale", _scale(6 * real_std / 255)), ("y_zero_point", _zero_point(rng, x_dtype)),
        ("bias", b)], attrs, domain=domain, opset=10 if not domain else 13)


def matmul_case(name, *, a_dtype=np.uint8, b_dtype=np.int8, a_shape=(64, 96), b_shape=(96, 48), per_column=False):
    rng = _rng(name)
    a, b = _codes(rng, a_dtype, a_shape), _codes(rng, b_dtype, b_shape)
    n = b_shape[-1]
    s_b = rng.uniform(0.002, 0.006, n if per_column else 1).astype(np.float32)
    b_zp = np.full(s_b.shape, 0 if b_dtype == np.int8 else 128, b_dtype)
    s_a = _scale(rng.uniform(0.01, 0.03))
    real_std = float(s_a) * float(s_b.max()) * UNIFORM_STD**2 * math.sqrt(a_shape[-1])
    return single_node_model("QLinearMatMul", [
        ("in_a", a), ("a_scale", s_a), ("a_zero_point", _zero_point(rng, a_dtype)), ("b", b), ("b_scale", s_b),
        ("b_zero_point", b_zp), ("y_scale", _scale(6 * real_std / 255)), ("y_zero_point", _zero_point(rng, a_dtype))])


def qgemm_case(name, *, a_dtype=np.uint8, b_dtype=np.int8, trans_b=0, c_shape=(48,), alpha=1.0, quantized_output=True):
    rng = _rng(name)
    m, k, n = 32, 80, 48
    a = _codes(rng, a_dtype, (m, k))
    b = _codes(rng, b_dtype, (n, k) if trans_b else (k, n))
    s_a, s_b = _scale(rng.uniform(0.01, 0.03)), rng.uniform(0.002, 0.006, n).astype(np.float32)
    b_zp = np.full(n, 0 if b_dtype == np.int8 else 128, b_dtype)
    c = None if c_shape is None else rng.integers(-3000, 3000, c_shape).astype(np.int32)
    inputs = [("in_a", a), ("a_scale", s_a), ("a_zero_point", _zero_point(rng, a_dtype)), ("b", b),
              ("b_scale", s_b), ("b_zero_point", b_zp), ("c", c)]
    if quantized_output:
        real_std = alpha * float(s_a) * float(s_b.max()) * UNIFORM_STD**2 * math.sqrt(k)
        inputs += [("y_scale", _scale(6 * real_std / 255)), ("y_zero_point", _zero_point(rng, a_dtype))]
    return single_node_model("QGemm", inputs, dict(transB=trans_b, alpha=alpha), domain=MS,
                             output_elem=None if quantized_output else TensorProto.FLOAT)


def binary_case(name, op, *, dtype=np.uint8, a_shape=(2, 16, 24, 24), b_shape=(2, 16, 24, 24)):
    rng = _rng(name)
    a, b = _codes(rng, dtype, a_shape), _codes(rng, dtype, b_shape)
    s_a, s_b = _scale(rng.uniform(0.01, 0.05)), _scale(rng.uniform(0.01, 0.05))
    if op == "QLinearAdd":
        real_std = UNIFORM_STD * math.hypot(float(s_a), float(s_b))
    else:
        real_std = UNIFORM_STD**2 * float(s_a) * float(s_b)
    return single_node_model(op, [
        ("in_a", a), ("a_scale", s_a), ("a_zero_point", _zero_point(rng, dtype)), ("in_b", b), ("b_scale", s_b),
        ("b_zero_point", _zero_point(rng, dtype)), ("c_scale", _scale(6 * real_std / 255)),
        ("c_zero_point", _zero_point(rng, dtype))], domain=MS)


def unary_case(name, op, *, dtype=np.uint8, shape=(4, 16, 16, 16)):
    rng = _rng(name)
    x = _codes(rng, dtype, shape)
    attrs = {}
    if op == "QLinearSigmoid":  # inputs over about [-5, 5], the usual [0, 1) output grid
        s_x, s_y = _scale(10 / 255 * rng.uniform(0.8, 1.2)), _scale(1 / 256)
        y_zp = np.array(0 if dtype == np.uint8 else -128, dtype)
    else:  # negative side shrinks by alpha: move the output zero point down to make room
        attrs["alpha"] = float(rng.uniform(0.05, 0.3))
        s_x = _scale(rng.uniform(0.01, 0.05))
        s_y = _scale(float(s_x) * rng.uniform(0.85, 1.0))
        y_zp = np.array((100 if dtype == np.uint8 else -28) + rng.integers(-10, 11), dtype)
    return single_node_model(op, [("in_x", x), ("x_scale", s_x), ("x_zero_point", _zero_point(rng, dtype)),
                                  ("y_scale", s_y), ("y_zero_point", y_zp)], attrs, domain=MS)


def concat_case(name, *, dtype=np.uint8):
    rng = _rng(name)
    s_y, y_zp = _scale(0.04), _zero_point(rng, dtype)
    inputs = [("y_scale", s_y), ("y_zero_point", y_zp)]
    for i, channels in enumerate((8, 12, 4)):
        same = i == 1  # this input shares the output's parameters: copied, not requantized
        inputs += [(f"in_x{i}", _codes(rng, dtype, (2, channels, 16, 16))),
                   (f"x{i}_scale", s_y if same else _scale(rng.uniform(0.02, 0.045))),
                   (f"x{i}_zero_point", y_zp if same else _zero_point(rng, dtype))]
    return single_node_model("QLinearConcat", inputs, dict(axis=1), domain=MS, output_elem=_elem(y_zp))


def pool_case(name, op, *, dtype=np.uint8, shape=(2, 32, 14, 14), channels_last=0, **pool_attrs):
    rng = _rng(name)
    x = _codes(rng, dtype, shape)
    s_x = _scale(rng.uniform(0.01, 0.05))
    attrs = dict(channels_last=channels_last, **pool_attrs)
    shrink = 4.0 if op == "QLinearGlobalAveragePool" else 1.0  # averages vary less than the codes
    return single_node_model(op, [("in_x", x), ("x_scale", s_x), ("x_zero_point", _zero_point(rng, dtype)),
                                  ("y_scale", _scale(float(s_x) / shrink)), ("y_zero_point", _zero_point(rng, dtype))],
                             attrs, domain=MS)


CASES = {
    "conv_u8s8_perchannel_3x3": lambda n: conv_case(n),
    "conv_u8u8_pertensor_wzp_stride2": lambda n: conv_case(n, w_dtype=np.uint8, per_channel=False, w_zero=False,
                                                           stride=2, shape=(2, 16, 21, 21)),
    "conv_s8s8_stride2_pad1": lambda n: conv_case(n, x_dtype=np.int8, stride=2, shape=(1, 16, 23, 19)),
    "conv_asymmetric_pads": lambda n: conv_case(n, pads=[0, 1, 2, 1], shape=(1, 8, 17, 15)),
    "conv_auto_pad_same_upper_stride2": lambda n: conv_case(n, auto_pad="SAME_UPPER", stride=2, shape=(1, 8, 18, 17)),
    "conv_pointwise_1x1": lambda n: conv_case(n, kernel=1, shape=(1, 64, 14, 14), out_channels=96),
    "conv_pointwise_1x1_stride2": lambda n: conv_case(n, kernel=1, stride=2, shape=(1, 32, 14, 14), pads=[0] * 4),
    "conv_depthwise_3x3_u8s8": lambda n: conv_case(n, group=32, shape=(1, 32, 28, 28), out_channels=32),
    "conv_depthwise_5x5_stride2": lambda n: conv_case(n, group=32, kernel=5, stride=2, shape=(1, 32, 28, 28),
                                                      out_channels=32),
    "conv_depthwise_s8s8": lambda n: conv_case(n, x_dtype=np.int8, group=24, shape=(1, 24, 20, 20), out_channels=24),
    "conv_depthwise_u8u8_wzp": lambda n: conv_case(n, w_dtype=np.uint8, per_channel=False, w_zero=False, group=16,
                                                   shape=(1, 16, 20, 20), out_channels=16),
    "conv_depthwise_multiplier2": lambda n: conv_case(n, group=16, shape=(1, 16, 12, 12), out_channels=32),
    "conv_grouped_dilated": lambda n: conv_case(n, group=4, dilation=2, shape=(1, 16, 18, 18), out_channels=32),
    "conv_stem_3ch_stride2_nobias": lambda n: conv_case(n, shape=(1, 3, 48, 48), out_channels=16, stride=2,
                                                        bias=False),
    "conv_1d": lambda n: conv_case(n, shape=(2, 16, 40), out_channels=24, kernel=5, stride=2),
    "conv_3d_stride2": lambda n: conv_case(n, shape=(1, 8, 6, 7, 8), out_channels=8, stride=2),
    "conv_3d_depthwise": lambda n: conv_case(n, shape=(1, 8, 6, 7, 8), out_channels=8, group=8),
    "conv_ms_channels_last": lambda n: conv_case(n, domain=MS, channels_last=True, shape=(1, 16, 12, 12)),
    "matmul_u8s8_2d": lambda n: matmul_case(n),
    "matmul_u8u8_3d_per_column": lambda n: matmul_case(n, b_dtype=np.uint8, a_shape=(3, 40, 96), per_column=True),
    "matmul_s8s8_4d_batched_b": lambda n: matmul_case(n, a_dtype=np.int8, a_shape=(2, 3, 20, 64), b_shape=(3, 64, 32)),
    "qgemm_bias_n": lambda n: qgemm_case(n),
    "qgemm_transb_alpha_bias_mn": lambda n: qgemm_case(n, trans_b=1, alpha=0.5, c_shape=(32, 48)),
    "qgemm_s8s8_bias_1n": lambda n: qgemm_case(n, a_dtype=np.int8, c_shape=(1, 48)),
    "qgemm_float_output": lambda n: qgemm_case(n, trans_b=1, c_shape=(48,), quantized_output=False),
    "add_same_shape_u8": lambda n: binary_case(n, "QLinearAdd"),
    "add_same_shape_s8": lambda n: binary_case(n, "QLinearAdd", dtype=np.int8),
    "add_broadcast_channel": lambda n: binary_case(n, "QLinearAdd", b_shape=(1, 16, 1, 1)),
    "add_broadcast_channel_first": lambda n: binary_case(n, "QLinearAdd", dtype=np.int8, a_shape=(1, 16, 1, 1)),
    "add_scalar_first": lambda n: binary_case(n, "QLinearAdd", a_shape=(1,)),
    "add_row_column": lambda n: binary_case(n, "QLinearAdd", a_shape=(64, 1), b_shape=(1, 80)),
    "mul_same_shape_u8": lambda n: binary_case(n, "QLinearMul"),
    "mul_broadcast_s8": lambda n: binary_case(n, "QLinearMul", dtype=np.int8, b_shape=(1, 16, 1, 1)),
    "concat_u8": lambda n: concat_case(n),
    "concat_s8": lambda n: concat_case(n, dtype=np.int8),
    "sigmoid_u8": lambda n: unary_case(n, "QLinearSigmoid"),
    "sigmoid_s8": lambda n: unary_case(n, "QLinearSigmoid", dtype=np.int8),
    "leaky_relu_u8": lambda n: unary_case(n, "QLinearLeakyRelu"),
    "leaky_relu_s8": lambda n: unary_case(n, "QLinearLeakyRelu", dtype=np.int8),
    "global_average_pool_nchw": lambda n: pool_case(n, "QLinearGlobalAveragePool", shape=(4, 64, 7, 7)),
    "global_average_pool_nhwc_s8": lambda n: pool_case(n, "QLinearGlobalAveragePool", dtype=np.int8,
                                                       shape=(4, 7, 7, 64), channels_last=1),
    "average_pool_3x3_pad_exclude": lambda n: pool_case(n, "QLinearAveragePool", kernel_shape=[3, 3],
                                                        pads=[1, 1, 1, 1]),
    "average_pool_3x3_s2_include_pad_s8": lambda n: pool_case(n, "QLinearAveragePool", dtype=np.int8,
                                                              kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
                                                              count_include_pad=1),
    "average_pool_2x2_s2_nhwc": lambda n: pool_case(n, "QLinearAveragePool", shape=(2, 14, 14, 32), channels_last=1,
                                                    kernel_shape=[2, 2], strides=[2, 2]),
    "average_pool_global_window": lambda n: pool_case(n, "QLinearAveragePool", kernel_shape=[14, 14]),
    "average_pool_ceil_mode": lambda n: pool_case(n, "QLinearAveragePool", shape=(1, 16, 10, 10), kernel_shape=[3, 3],
                                                  strides=[2, 2], ceil_mode=1),
    "average_pool_1d": lambda n: pool_case(n, "QLinearAveragePool", shape=(2, 16, 40), kernel_shape=[3], strides=[2],
                                           pads=[1, 1]),
}


def _lsb_difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.astype(np.int64) - b.astype(np.int64))


@pytest.mark.parametrize("name", sorted(CASES))
def test_onnx_mode_matches_onnxruntime(name):
    model, feeds = CASES[name](name)
    expected = ort_run(model, feeds)
    got = run_model(model, feeds, mode="onnx")["y"]
    assert got.dtype == expected.dtype and got.shape == expected.shape
    if expected.dtype.kind == "f":  # QGemm without y_scale: float32 output, compared exactly
        np.testing.assert_array_equal(got, expected)
        return
    info = np.iinfo(expected.dtype)
    saturated = np.mean((expected == info.min) | (expected == info.max))
    assert saturated < 0.25, f"test data saturates {saturated:.0%} of the outputs; fix the case's scales"
    difference = _lsb_difference(got, expected)
    assert np.mean(difference == 0) >= 0.999 and difference.max() <= 1, \
        f"{np.mean(difference == 0):.4%} identical, max {difference.max()} LSB"


@pytest.mark.parametrize("name", sorted(CASES))
def test_fixed_point_mode_within_one_lsb_of_onnx_mode(name):
    model, feeds = CASES[name](name)
    onnx_mode = run_model(model, feeds, mode="onnx")["y"]
    fixed = run_model(model, feeds, mode="fixed-point")["y"]
    assert fixed.dtype == onnx_mode.dtype and fixed.shape == onnx_mode.shape
    if onnx_mode.dtype.kind == "f":
        np.testing.assert_array_equal(fixed, onnx_mode)  # no requantization: identical
    else:
        assert _lsb_difference(fixed, onnx_mode).max() <= 1


# ------------------------------------------------------------------- ops outside the single-y harness


def test_per_row_a_scale_matches_row_by_row_onnxruntime():
    """Per-row A parameters (ONNX QLinearMatMul allows them, onnxruntime does not): each output row
    must equal onnxruntime's per-tensor QLinearMatMul of that row alone."""
    rng = _rng("per_row")
    a, b = _codes(rng, np.uint8, (6, 64)), _codes(rng, np.int8, (64, 20))
    s_a = rng.uniform(0.01, 0.03, 6).astype(np.float32)
    z_a = rng.integers(100, 156, 6).astype(np.uint8)
    s_b = rng.uniform(0.002, 0.006, 20).astype(np.float32)
    s_y = _scale(6 * 0.03 * 0.006 * UNIFORM_STD**2 * 8 / 255)
    common = [("b", b), ("b_scale", s_b), ("b_zero_point", np.zeros(20, np.int8)), ("y_scale", s_y),
              ("y_zero_point", np.array(128, np.uint8))]
    model, feeds = single_node_model("QLinearMatMul", [("in_a", a), ("a_scale", s_a), ("a_zero_point", z_a)] + common)
    got = run_model(model, feeds)["y"]
    for row in range(6):
        row_model, row_feeds = single_node_model(
            "QLinearMatMul", [("in_a", a[row:row + 1]), ("a_scale", s_a[row]), ("a_zero_point", z_a[row])] + common)
        np.testing.assert_array_equal(got[row:row + 1], ort_run(row_model, row_feeds))


@pytest.mark.parametrize("w_dtype", [np.uint8, np.int8])
def test_conv_integer_matches_onnxruntime(w_dtype):
    rng = _rng(f"conv_integer_{np.dtype(w_dtype).name}")
    x, w = _codes(rng, np.uint8, (1, 8, 12, 12)), _codes(rng, w_dtype, (16, 8, 3, 3))
    model, feeds = single_node_model("ConvInteger", [("in_x", x), ("w", w), ("x_zero_point", np.array(120, np.uint8)),
                                                     ("w_zero_point", np.array(3, w_dtype))],
                                     dict(pads=[1, 1, 1, 1], strides=[2, 2]), opset=10, output_elem=TensorProto.INT32)
    np.testing.assert_array_equal(run_model(model, feeds)["y"], ort_run(model, feeds))


def test_dynamic_quantize_linear_matches_onnxruntime():
    rng = _rng("dynamic_quantize_linear")
    x = (rng.normal(0.3, 2.0, (4, 300))).astype(np.float32)
    node = helper.make_node("DynamicQuantizeLinear", ["x"], ["y", "y_scale", "y_zero_point"])
    graph = helper.make_graph([node], "dql", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                              [helper.make_tensor_value_info(n, t, None) for n, t in
                               (("y", TensorProto.UINT8), ("y_scale", TensorProto.FLOAT),
                                ("y_zero_point", TensorProto.UINT8))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 9
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    expected = ort.InferenceSession(model.SerializeToString(), options,
                                    providers=["CPUExecutionProvider"]).run(None, {"x": x})
    got = run_model(model, {"x": x})
    for name, want in zip(("y", "y_scale", "y_zero_point"), expected):
        assert got[name].dtype == want.dtype and got[name].shape == want.shape
        np.testing.assert_array_equal(got[name], want)
