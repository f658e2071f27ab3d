"""Whole-graph behaviour of the integer executor: the integer region, float fallback, shape plumbing,
data-movement ops on codes, errors, and a small multi-node model against onnxruntime."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompile.errors import QCompileError
from qcompile.executor import (KERNELS, ExecutionError, IntegerExecutor, IntegerOverflowError, KernelKind,
                               UnsupportedOpError, run_model)

from test_exec_vs_onnxruntime import ort_run, single_node_model

MS = "com.microsoft"


def _const(name: str, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def _model(nodes, inputs, outputs, initializers, opset=13, ms=False) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializers)
    opsets = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(MS, 1)] if ms else [])
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 9
    return model


def _float_in(name="x", shape=(1, 4, 6, 6)):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _float_out(name="y"):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, None)


QDQ_PARAMS = [_const("s", np.float32(0.05)), _const("z", np.uint8(128))]


def _sandwich(middle: list[onnx.NodeProto], extra_initializers=(), opset=13, shape=(1, 4, 6, 6)):
    """x -> QuantizeLinear -> middle (reads 'q', writes 'm') -> DequantizeLinear -> y."""
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="quant")] + middle + \
        [helper.make_node("DequantizeLinear", ["m", "s", "z"], ["y"], name="dequant")]
    return _model(nodes, [_float_in(shape=shape)], [_float_out()], QDQ_PARAMS + list(extra_initializers), opset)


# ------------------------------------------------------------------------------ integer region


def test_float_op_on_codes_is_refused_when_built():
    model = _sandwich([helper.make_node("Relu", ["q"], ["m"], name="relu1")])
    with pytest.raises(UnsupportedOpError, match=r"op Relu in node 'relu1' has no integer kernel.*integer region"):
        IntegerExecutor(model)


def test_float_op_between_dequantize_and_quantize_inside_the_region_is_refused():
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="quant"),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"], name="dq_mid"),
             helper.make_node("Sigmoid", ["d"], ["e"], name="float_sigmoid"),
             helper.make_node("QuantizeLinear", ["e", "s", "z"], ["q2"], name="requant"),
             helper.make_node("DequantizeLinear", ["q2", "s", "z"], ["y"], name="dequant")]
    model = _model(nodes, [_float_in()], [_float_out()], QDQ_PARAMS)
    with pytest.raises(UnsupportedOpError, match="op Sigmoid in node 'float_sigmoid'.*after node 'quant'"):
        IntegerExecutor(model)


def test_op_without_any_kernel_is_refused_naming_node_and_op():
    model = _sandwich([helper.make_node("Erf", ["q"], ["m"], name="erf_node")])
    with pytest.raises(UnsupportedOpError, match="op Erf in node 'erf_node' has no integer kernel; the integer"):
        IntegerExecutor(model)
    assert issubclass(UnsupportedOpError, QCompileError)


def test_float_fallback_runs_outside_the_region():
    """Normalisation before the first QuantizeLinear and Softmax after the last DequantizeLinear."""
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (1, 4, 6, 6)).astype(np.float32)
    nodes = [helper.make_node("Sub", ["x", "mean"], ["centred"]),
             helper.make_node("Div", ["centred", "std"], ["normalised"]),
             helper.make_node("QuantizeLinear", ["normalised", "s", "z"], ["q"]),
             helper.make_node("MaxPool", ["q"], ["m"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("DequantizeLinear", ["m", "s", "z"], ["d"]),
             helper.make_node("Flatten", ["d"], ["flat"]),
             helper.make_node("Softmax", ["flat"], ["y"], axis=1)]
    model = _model(nodes, [_float_in()], [_float_out()],
                   QDQ_PARAMS + [_const("mean", np.float32(127.0)), _const("std", np.float32(64.0))])
    got = run_model(model, {"x": x})["y"]
    expected = ort_run(model, {"x": x})
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)  # Softmax: numpy exp vs MLAS exp


def test_int64_shape_arithmetic_is_allowed_inside_the_region():
    """Shape -> Gather -> Mul -> Concat -> Reshape on codes: the PyTorch-export flatten pattern."""
    nodes = [helper.make_node("Shape", ["q"], ["shape"]),
             helper.make_node("Gather", ["shape", "zero"], ["batch"], axis=0),
             helper.make_node("Mul", ["batch", "one"], ["batch1"]),
             helper.make_node("Unsqueeze", ["batch1", "axes0"], ["batch_1d"]),
             helper.make_node("Concat", ["batch_1d", "minus_one"], ["target"], axis=0),
             helper.make_node("Reshape", ["q", "target"], ["m"])]
    extra = [_const("zero", np.int64(0)), _const("one", np.int64(1)), _const("axes0", np.array([0], np.int64)),
             _const("minus_one", np.array([-1], np.int64))]
    model = _sandwich(nodes, extra)
    x = np.random.default_rng(1).normal(0, 2, (1, 4, 6, 6)).astype(np.float32)
    got = run_model(model, {"x": x})["y"]
    np.testing.assert_array_equal(got, ort_run(model, {"x": x}))
    assert got.shape == (1, 144)


def test_region_check_at_run_time_when_types_are_unknown():
    """A float op in the region whose input type inference cannot see is refused when reached."""
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="quant"),
             helper.make_node("Cast", ["q"], ["m"], name="cast_codes", to=TensorProto.FLOAT),
             helper.make_node("DequantizeLinear", ["m", "s", "z"], ["y"], name="dequant")]
    model = _model(nodes, [_float_in()], [_float_out()], QDQ_PARAMS)
    del model.graph.input[0].type.tensor_type.shape.dim[:]
    with pytest.raises(UnsupportedOpError, match="cast_codes"):
        run_model(model, {"x": np.zeros((1, 4, 6, 6), np.float32)})


def test_every_kernel_table_entry_has_a_kind():
    assert {k.kind for k in KERNELS.values()} == set(KernelKind)
    assert KERNELS[("", "QLinearConv")].kind is KernelKind.INTEGER
    assert KERNELS[(MS, "QLinearAdd")].kind is KernelKind.INTEGER
    assert KERNELS[("", "Reshape")].kind is KernelKind.MOVEMENT
    assert KERNELS[("", "Softmax")].kind is KernelKind.FLOAT


# -------------------------------------------------------------------------- data movement on codes

MOVEMENT_CASES = {
    "transpose": ([helper.make_node("Transpose", ["q"], ["m"], perm=[0, 2, 3, 1])], []),
    "reshape": ([helper.make_node("Reshape", ["q", "shape"], ["m"])], [_const("shape", np.array([0, -1], np.int64))]),
    "flatten": ([helper.make_node("Flatten", ["q"], ["m"], axis=2)], []),
    "squeeze_unsqueeze": ([helper.make_node("Unsqueeze", ["q", "ax"], ["u"]),
                           helper.make_node("Squeeze", ["u", "ax"], ["m"])], [_const("ax", np.array([2], np.int64))]),
    "pad_with_zero_point": ([helper.make_node("Pad", ["q", "pads", "z"], ["m"])],
                            [_const("pads", np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64))]),
    "slice": ([helper.make_node("Slice", ["q", "starts", "ends", "axes", "steps"], ["m"])],
              [_const("starts", np.array([1, 0], np.int64)), _const("ends", np.array([4, 6], np.int64)),
               _const("axes", np.array([1, 3], np.int64)), _const("steps", np.array([2, 2], np.int64))]),
    "maxpool_padded_strided": ([helper.make_node("MaxPool", ["q"], ["m"], kernel_shape=[3, 3], strides=[2, 2],
                                                 pads=[1, 1, 1, 1])], []),
    "concat_same_scale": ([helper.make_node("Concat", ["q", "q"], ["m"], axis=1)], []),
    "identity": ([helper.make_node("Identity", ["q"], ["m"])], []),
}


@pytest.mark.parametrize("name", sorted(MOVEMENT_CASES))
def test_data_movement_on_codes_matches_onnxruntime(name):
    nodes, extra = MOVEMENT_CASES[name]
    model = _sandwich(nodes, extra)
    x = np.random.default_rng(2).normal(0, 2, (1, 4, 6, 6)).astype(np.float32)
    np.testing.assert_array_equal(run_model(model, {"x": x})["y"], ort_run(model, {"x": x}))


def test_global_max_pool_on_codes_equals_float_global_max_pool():
    """ONNX types GlobalMaxPool for floats only; on codes it commutes with DequantizeLinear."""
    x = np.random.default_rng(8).normal(0, 2, (2, 4, 6, 6)).astype(np.float32)
    on_codes = _sandwich([helper.make_node("GlobalMaxPool", ["q"], ["m"])], shape=(2, 4, 6, 6))
    on_floats = _model([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
                        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"]),
                        helper.make_node("GlobalMaxPool", ["d"], ["y"])],
                       [_float_in(shape=(2, 4, 6, 6))], [_float_out()], QDQ_PARAMS)
    np.testing.assert_array_equal(run_model(on_codes, {"x": x})["y"], ort_run(on_floats, {"x": x}))


# ---------------------------------------------------------------------------------- errors and API


def test_bias_overflow_is_reported():
    rng = np.random.default_rng(3)
    model, feeds = single_node_model("QLinearConv", [
        ("in_x", rng.integers(0, 256, (1, 2, 4, 4)).astype(np.uint8)), ("xs", np.float32(0.1)),
        ("xz", np.uint8(0)), ("w", np.full((1, 2, 1, 1), 127, np.int8)), ("ws", np.float32(0.1)),
        ("wz", np.int8(0)), ("ys", np.float32(0.1)), ("yz", np.uint8(0)),
        ("b", np.array([2**31 - 1], np.int32))], opset=10)
    with pytest.raises(IntegerOverflowError, match="qlinearconv_0.*int32"):
        run_model(model, feeds)


def test_matmul_integer_overflow_is_reported():
    k = 40000  # 40000 * 255 * 255 > 2^31
    model, feeds = single_node_model("MatMulInteger", [("in_a", np.full((1, k), 255, np.uint8)),
                                                       ("b", np.full((k, 1), 255, np.uint8))],
                                     output_elem=TensorProto.INT32)
    with pytest.raises(IntegerOverflowError):
        run_model(model, feeds)


def test_unknown_mode_and_bad_feeds():
    model = _sandwich([helper.make_node("Identity", ["q"], ["m"])])
    with pytest.raises(ExecutionError, match="unknown mode"):
        IntegerExecutor(model, mode="float")
    executor = IntegerExecutor(model)
    with pytest.raises(ExecutionError, match="missing feeds"):
        executor.run({})
    with pytest.raises(ExecutionError, match="not a graph input"):
        executor.run({"x": np.zeros((1, 4, 6, 6), np.float32), "nope": np.zeros(1)})


def test_nodes_out_of_order_and_repeated_inputs_are_scheduled():
    nodes = [helper.make_node("Concat", ["q", "q", "r"], ["m"], axis=1),  # listed before its producer
             helper.make_node("Identity", ["q"], ["r"])]
    model = _sandwich(nodes)
    x = np.random.default_rng(9).normal(0, 1, (1, 4, 6, 6)).astype(np.float32)
    np.testing.assert_array_equal(run_model(model, {"x": x})["y"], ort_run(model, {"x": x}))


def test_kernel_errors_name_the_node():
    model = _sandwich([helper.make_node("QLinearConv", ["q", "s", "z", "w", "s", "wz", "s", "z"], ["m"], name="conv9")],
                      [_const("w", np.ones((4, 3, 1, 1), np.int8)), _const("wz", np.int8(0))], opset=10)
    with pytest.raises(ExecutionError, match="conv9"):
        run_model(model, {"x": np.zeros((1, 4, 6, 6), np.float32)})


def test_executor_is_reusable_and_caches_constant_weights():
    rng = np.random.default_rng(4)
    model, feeds = single_node_model("QLinearConv", [
        ("in_x", rng.integers(0, 256, (1, 8, 6, 6)).astype(np.uint8)), ("xs", np.float32(0.02)),
        ("xz", np.uint8(120)), ("w", rng.integers(-127, 128, (8, 8, 3, 3)).astype(np.int8)),
        ("ws", np.float32(0.003)), ("wz", np.int8(0)), ("ys", np.float32(0.2)), ("yz", np.uint8(128))],
        dict(pads=[1, 1, 1, 1]), opset=10)
    executor = IntegerExecutor(model)
    first = executor.run(feeds)["y"]
    other = {"in_x": rng.integers(0, 256, (1, 8, 6, 6)).astype(np.uint8)}
    np.testing.assert_array_equal(executor.run(other)["y"], ort_run(model, other))
    np.testing.assert_array_equal(executor.run(feeds)["y"], first)


def test_run_on_reference_feeds_each_op_the_reference_inputs():
    """x -> QuantizeLinear 'q' -> MaxPool 'm' -> DequantizeLinear 'y' (s = 0.05, z = 128), with
    another runtime's 'q' one code higher than the executor's own: each op's result is worked out
    here from the ONNX formulas on the reference inputs, not on the executor's own."""
    model = _sandwich([helper.make_node("MaxPool", ["q"], ["m"], kernel_shape=[2, 2], strides=[2, 2])])
    x = np.random.default_rng(5).uniform(-3, 3, (1, 4, 6, 6)).astype(np.float32)
    own_q = np.clip(np.rint(x / np.float32(0.05)) + 128, 0, 255).astype(np.uint8)
    reference_q = np.minimum(own_q.astype(np.int64) + 1, 255).astype(np.uint8)
    reference_m = reference_q.reshape(1, 4, 3, 2, 3, 2).max(axis=(3, 5)) - 1
    executor = IntegerExecutor(model)
    own = executor.run_on_reference({"x": x}, {"q": reference_q, "m": reference_m.astype(np.uint8),
                                                 "y": np.zeros((1, 4, 3, 3), np.float32)})
    np.testing.assert_array_equal(own["q"], own_q)
    np.testing.assert_array_equal(own["m"], reference_q.reshape(1, 4, 3, 2, 3, 2).max(axis=(3, 5)))
    np.testing.assert_allclose(own["y"], (reference_m.astype(np.float32) - 128) * np.float32(0.05), rtol=1e-6)
    np.testing.assert_array_equal(executor.run({"x": x})["y"],
                                  (own_q.reshape(1, 4, 3, 2, 3, 2).max(axis=(3, 5)).astype(np.float32) - 128) * np.float32(0.05))


# ----------------------------------------------------------------------- a small model end to end


def _small_network() -> onnx.ModelProto:
    """Q -> conv 3x3 -> depthwise 3x3 -> 1x1 conv -> QLinearAdd residual -> GAP -> QGemm -> DQ."""
    rng = np.random.default_rng(5)

    def weights(shape):
        return rng.integers(-127, 128, shape).astype(np.int8)

    init = [_const("xs", np.float32(0.02)), _const("xz", np.uint8(128)),
            _const("w1", weights((16, 3, 3, 3))), _const("w1s", rng.uniform(0.002, 0.01, 16).astype(np.float32)),
            _const("wz16", np.zeros(16, np.int8)), _const("a1s", np.float32(0.05)), _const("a1z", np.uint8(0)),
            _const("b1", rng.integers(-500, 500, 16).astype(np.int32)),
            _const("w2", weights((16, 1, 3, 3))), _const("w2s", rng.uniform(0.005, 0.02, 16).astype(np.float32)),
            _const("a2s", np.float32(0.04)), _const("a2z", np.uint8(0)),
            _const("w3", weights((16, 16, 1, 1))), _const("w3s", rng.uniform(0.002, 0.01, 16).astype(np.float32)),
            _const("a3s", np.float32(0.06)), _const("a3z", np.uint8(120)),
            _const("a4s", np.float32(0.08)), _const("a4z", np.uint8(100)),
            _const("a5s", np.float32(0.03)), _const("a5z", np.uint8(90)),
            _const("flat", np.array([1, 16], np.int64)),
            _const("wf", weights((10, 16))), _const("wfs", rng.uniform(0.005, 0.02, 10).astype(np.float32)),
            _const("wz10", np.zeros(10, np.int8)), _const("bf", rng.integers(-200, 200, 10).astype(np.int32)),
            _const("ys", np.float32(0.1)), _const("yz", np.uint8(128))]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["q"]),
        helper.make_node("QLinearConv", ["q", "xs", "xz", "w1", "w1s", "wz16", "a1s", "a1z", "b1"], ["c1"],
                         pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("QLinearConv", ["c1", "a1s", "a1z", "w2", "w2s", "wz16", "a2s", "a2z"], ["c2"],
                         pads=[1, 1, 1, 1], group=16),
        helper.make_node("QLinearConv", ["c2", "a2s", "a2z", "w3", "w3s", "wz16", "a3s", "a3z"], ["c3"]),
        helper.make_node("QLinearAdd", ["c3", "a3s", "a3z", "c1", "a1s", "a1z", "a4s", "a4z"], ["sum"], domain=MS),
        helper.make_node("QLinearGlobalAveragePool", ["sum", "a4s", "a4z", "a5s", "a5z"], ["pooled"], domain=MS,
                         channels_last=0),
        helper.make_node("Reshape", ["pooled", "flat"], ["flat_codes"]),
        helper.make_node("QGemm", ["flat_codes", "a5s", "a5z", "wf", "wfs", "wz10", "bf", "ys", "yz"], ["logits_q"],
                         domain=MS, transB=1),
        helper.make_node("DequantizeLinear", ["logits_q", "ys", "yz"], ["logits"]),
    ]
    return _model(nodes, [_float_in("x", (1, 3, 32, 32))], [_float_out("logits")], init, ms=True)


def test_small_network_bit_exact_with_onnxruntime():
    model = _small_network()
    rng = np.random.default_rng(6)
    for _ in range(3):
        x = rng.normal(0, 1, (1, 3, 32, 32)).astype(np.float32)
        np.testing.assert_array_equal(run_model(model, {"x": x})["logits"], ort_run(model, {"x": x}))


def test_small_network_fixed_point_mode_stays_close():
    model = _small_network()
    x = np.random.default_rng(7).normal(0, 1, (1, 3, 32, 32)).astype(np.float32)
    onnx_mode = run_model(model, {"x": x}, mode="onnx")["logits"]
    fixed = run_model(model, {"x": x}, mode="fixed-point")["logits"]
    # differences of 1 LSB per layer compound through five requantizations; a few output LSB at most
    assert np.abs(fixed - onnx_mode).max() <= 4 * 0.1 + 1e-6
