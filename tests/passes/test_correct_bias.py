"""correct_bias: b' = b − ε_sum·E[x], checked against numpy written here and onnxruntime.

Expected values are computed in the tests from papers.md §1.4 (numpy; Monte Carlo for the
analytic means; onnxruntime for layer outputs), never with the pass's own helpers.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import EXAMPLE
from qcompile.data import DataSource, model_inputs
from qcompile.errors import QCompileError
from qcompile.importer import import_model
from qcompile.numerics import bias_qparams, fake_quantize
from qcompile.passes.correct_bias import clipped_normal_mean
from qcompile.pipeline import PassContext, PassManager
from qcompile.recipe import Quantization, WeightQuant
from qcompile.registry import PASSES, load_builtins_and_entry_points

load_builtins_and_entry_points()
PER_TENSOR = Quantization(weights=WeightQuant(granularity="per_tensor"))


def _save(tmp_path, nodes, inputs, outputs, initializers, name="m.onnx"):
    graph = helper.make_graph(nodes, "g", inputs, outputs,
                              [numpy_helper.from_array(np.asarray(a), n) for n, a in initializers.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / name
    onnx.save(model, str(path))
    return path


def _compile(path, data, tmp_path, steps, scheme=PER_TENSOR, batch_size=16):
    """Import `path` and run the named passes with `data` (input name -> array) as calibration."""
    np.savez(tmp_path / "calib.npz", **data)
    graph = import_model(path)
    source = DataSource(str(tmp_path / "calib.npz"), tuple(model_inputs(graph)), None, batch_size)
    ctx = PassContext(scheme=scheme, calibration=source)
    passes = [PASSES.get(name)(PASSES.get(name).Options(**options)) for name, options in steps]
    PassManager(passes).run(graph, ctx)
    return graph, ctx


def _node(graph, name):
    return next(n for n in graph.nodes if n.name == name)


def _run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feeds)


def _one_node_model(node_proto, x_info, y_info, weight, bias):
    inits = [numpy_helper.from_array(weight.astype(np.float32), "w")]
    inputs = [node_proto.input[0], "w"]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias.astype(np.float32), "b"))
        inputs.append("b")
    node = helper.make_node(node_proto.op_type, inputs, [y_info.name])
    node.attribute.extend(node_proto.attribute)
    model = helper.make_model(helper.make_graph([node], "one", [x_info], [y_info], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


# ---- hand-worked Conv: the formula in numpy ---------------------------------------------------------
@pytest.mark.parametrize("groups,with_bias", [(1, True), (2, True), (4, False)])
def test_hand_worked_conv_bias_matches_the_formula(tmp_path, groups, with_bias):
    rng = np.random.default_rng(groups)
    channels, out_channels = 4, 4
    w = (rng.standard_normal((out_channels, channels // groups, 3, 3)) * 0.3).astype(np.float32)
    b = rng.standard_normal(out_channels).astype(np.float32)
    channel_means = np.array([1.0, -2.0, 0.5, 3.0])
    x = (rng.standard_normal((64, channels, 6, 6)) + channel_means[None, :, None, None]).astype(np.float32)
    inits = {"w": w, "b": b} if with_bias else {"w": w}
    path = _save(tmp_path, [helper.make_node("Conv", ["x", "w", "b"] if with_bias else ["x", "w"], ["y"],
                                             name="conv", group=groups)],
                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", channels, 6, 6])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", out_channels, 4, 4])], inits)
    graph, ctx = _compile(path, {"x": x}, tmp_path, [("annotate", {}), ("calibrate", {}), ("correct_bias", {})])

    # independent: per-tensor symmetric int8 weights, scale = max|W| / 127, round half to even
    scale = np.abs(w).max() / 127.0
    error = np.round(w.astype(np.float64) / scale) * scale - w            # ε
    error_sum = error.sum(axis=(2, 3))                                   # ε_sum[oc, ic in group]
    mean_x = x.astype(np.float64).mean(axis=(0, 2, 3))                  # E[x] per input channel
    per_group_in = channels // groups
    expected = (b if with_bias else np.zeros(out_channels)).astype(np.float64)
    for oc in range(out_channels):
        group = oc // (out_channels // groups)
        expected[oc] -= error_sum[oc] @ mean_x[group * per_group_in:(group + 1) * per_group_in]

    conv = _node(graph, "conv")
    assert conv.input(2) is not None, "a layer without a bias gets one"
    np.testing.assert_allclose(conv.input(2).const, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(conv.input(1).const, w)  # the weights themselves are untouched


# ---- every layer kind: the mean output error on float inputs vanishes (onnxruntime) ----------------
def _layer_case(kind: str, rng):
    """(nodes, inputs, outputs, initializers, x, channel axis of y)."""
    if kind == "conv_group":
        w = rng.standard_normal((6, 2, 3, 3)) * 0.4
        # constant over space per sample: every output pixel's window then has the image's mean
        # (with random pixels the windows' sample means differ from E[x] by chance)
        x = np.tile(rng.standard_normal((48, 6, 1, 1)) + rng.uniform(-2, 3, (1, 6, 1, 1)), (1, 1, 7, 7))
        return ([helper.make_node("Conv", ["x", "w"], ["y"], name="layer", group=3)],
                {"x": ["N", 6, 7, 7]}, {"y": ["N", 6, 5, 5]}, {"w": w}, x, 1)
    if kind == "conv_transpose":
        w = rng.standard_normal((4, 3, 2, 2)) * 0.4
        x = rng.standard_normal((48, 4, 5, 5)) + rng.uniform(-2, 3, (1, 4, 1, 1))
        return ([helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], name="layer", strides=[2, 2])],
                {"x": ["N", 4, 5, 5]}, {"y": ["N", 3, 10, 10]}, {"w": w, "b": rng.standard_normal(3)}, x, 1)
    if kind == "gemm":
        w = rng.standard_normal((5, 8)) * 0.4  # transB: [N, K]
        x = rng.standard_normal((256, 8)) + rng.uniform(-2, 3, (1, 8))
        return ([helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="layer", transB=1, alpha=0.5, beta=2.0)],
                {"x": ["N", 8]}, {"y": ["N", 5]}, {"w": w, "b": rng.standard_normal((1, 5))}, x, 1)
    w = rng.standard_normal((8, 5)) * 0.4  # MatMul + Add: a Linear layer on a 3-D input
    x = rng.standard_normal((64, 3, 8)) + rng.uniform(-2, 3, (1, 1, 8))
    return ([helper.make_node("MatMul", ["x", "w"], ["m"], name="layer"),
             helper.make_node("Add", ["m", "b"], ["y"], name="bias_add")],
            {"x": ["N", 3, 8]}, {"y": ["N", 3, 5]}, {"w": w, "b": rng.standard_normal(5)}, x, -1)


@pytest.mark.parametrize("kind", ["conv_group", "conv_transpose", "gemm", "matmul_add"])
def test_mean_output_error_vanishes_on_float_inputs(tmp_path, kind):
    rng = np.random.default_rng(7)
    nodes, ins, outs, inits, x, axis = _layer_case(kind, rng)
    inits = {k: np.asarray(v, np.float32) for k, v in inits.items()}
    x = x.astype(np.float32)
    infos_in = [helper.make_tensor_value_info(k, TensorProto.FLOAT, s) for k, s in ins.items()]
    infos_out = [helper.make_tensor_value_info(k, TensorProto.FLOAT, s) for k, s in outs.items()]
    path = _save(tmp_path, nodes, infos_in, infos_out, inits)
    graph, _ = _compile(path, {"x": x}, tmp_path, [("annotate", {}), ("calibrate", {}), ("correct_bias", {})])

    layer = _node(graph, "layer")
    bias_owner = _node(graph, "bias_add") if kind == "matmul_add" else layer
    bias_index = [i for i, v in enumerate(bias_owner.inputs)
                  if v is not None and v.is_const and v is not layer.input(1)]
    corrected_bias = bias_owner.input(bias_index[0]).const
    quantized_w = fake_quantize(layer.input(1).const, layer.input(1).qparams)

    original = onnx.load(str(path))
    reduce = tuple(i for i in range(len(outs["y"])) if i != axis % len(outs["y"]))

    def mean_error(weight, bias_name_value):
        model = onnx.load(str(path))
        for init in model.graph.initializer:
            if init.name == "w":
                init.CopyFrom(numpy_helper.from_array(weight.astype(np.float32), "w"))
            if init.name == "b" and bias_name_value is not None:
                init.CopyFrom(numpy_helper.from_array(bias_name_value.astype(np.float32), "b"))
        if bias_name_value is not None and "b" not in {i.name for i in model.graph.initializer}:  # bias added
            model.graph.initializer.append(numpy_helper.from_array(bias_name_value.astype(np.float32), "b"))
            model.graph.node[0].input.append("b")
        return (_run(model, {"x": x})[0].astype(np.float64) - reference).mean(axis=reduce)

    reference = _run(original, {"x": x})[0].astype(np.float64)
    uncorrected = mean_error(quantized_w, None)
    corrected = mean_error(quantized_w, corrected_bias)
    assert np.abs(uncorrected).max() > 1e-3, "the weight error must be visible for the test to mean anything"
    assert np.abs(corrected).max() < 1e-3 * np.abs(uncorrected).max() + 1e-5


# ---- analytic E[x]: clipped normal means against Monte Carlo -----------------------------------------
@pytest.mark.parametrize("beta,gamma", [(0.0, 1.0), (0.5, 2.0), (2.0, 1.5), (-0.5, 1.0), (5.0, 2.0), (1.0, -0.8)])
def test_clipped_normal_mean_matches_monte_carlo(beta, gamma):
    samples = np.random.default_rng(3).normal(beta, abs(gamma), 2_000_000)
    for lo, hi in ((0.0, np.inf), (0.0, 6.0)):  # ReLU, ReLU6
        monte_carlo = np.clip(samples, lo, hi).mean()
        analytic = float(clipped_normal_mean(np.array([beta]), np.array([gamma]), lo, hi)[0])
        assert analytic == pytest.approx(monte_carlo, rel=1e-2), (lo, hi)
    assert float(clipped_normal_mean(np.array([beta]), np.array([gamma]))[0]) == pytest.approx(beta)


def test_analytic_mode_uses_the_folded_batchnorm(tmp_path):
    rng = np.random.default_rng(11)
    channels = 5
    gamma = np.array([1.0, 2.0, 0.5, 1.5, 3.0], np.float32)
    beta = np.array([0.5, -1.0, 2.0, 5.5, 0.0], np.float32)
    w1 = (rng.standard_normal((channels, 3, 3, 3)) * 0.5).astype(np.float32)
    w2 = (rng.standard_normal((4, channels, 3, 3)) * 0.3).astype(np.float32)
    inits = {"w1": w1, "g": gamma, "be": beta, "mu": np.zeros(channels, np.float32),
             "var": np.ones(channels, np.float32), "w2": w2, "lo": np.float32(0.0), "hi": np.float32(6.0),
             "pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c1", "g", "be", "mu", "var"], ["bn"], epsilon=0.0),
             helper.make_node("Clip", ["bn", "lo", "hi"], ["r6"], name="relu6"),
             helper.make_node("Pad", ["r6", "pads"], ["p"], name="pad"),
             helper.make_node("Conv", ["p", "w2"], ["y"], name="conv2")]
    path = _save(tmp_path, nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])], inits)
    x = rng.standard_normal((16, 3, 8, 8)).astype(np.float32)
    graph, ctx = _compile(path, {"x": x}, tmp_path, [("fold_batchnorm", {}), ("annotate", {}), ("calibrate", {}),
                                                     ("correct_bias", {"mode": "analytic"})])
    conv2 = _node(graph, "conv2")
    scale = np.abs(w2).max() / 127.0
    error_sum = (np.round(w2.astype(np.float64) / scale) * scale - w2).sum(axis=(2, 3))
    samples = np.random.default_rng(5).standard_normal((1_000_000, 1))
    monte_carlo = np.clip(beta + gamma * samples, 0.0, 6.0).mean(axis=0)  # E[ReLU6(N(β, γ²))]
    expected = -error_sum @ monte_carlo
    np.testing.assert_allclose(conv2.input(2).const, expected, rtol=1e-2, atol=1e-2 * np.abs(expected).max())
    # conv1 reads the graph input: no BN statistics, skipped and noted
    (note,) = ctx.notes["correct_bias"]
    assert note["node"] == "conv1" and "no BatchNorm statistics" in note["skipped"]


def test_analytic_mode_looks_through_a_per_channel_min(tmp_path):
    """equalize_cross_layer writes ReLU6 as Clip(0, max) -> Min(bound per channel); E[x] is then
    the clipped normal mean with each channel's own upper bound (Monte Carlo here)."""
    rng = np.random.default_rng(12)
    channels = 5
    gamma = np.array([1.0, 2.0, 0.5, 1.5, 3.0], np.float32)
    beta = np.array([0.5, -1.0, 2.0, 5.5, 0.0], np.float32)
    bound = np.array([6.0, 3.0, 1.0, 4.0, 2.0], np.float32)
    w1 = (rng.standard_normal((channels, 3, 3, 3)) * 0.5).astype(np.float32)
    w2 = (rng.standard_normal((4, channels, 1, 1)) * 0.3).astype(np.float32)
    inits = {"w1": w1, "g": gamma, "be": beta, "mu": np.zeros(channels, np.float32),
             "var": np.ones(channels, np.float32), "w2": w2, "lo": np.float32(0.0), "hi": np.float32(6.0),
             "bound": bound.reshape(channels, 1, 1)}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c1", "g", "be", "mu", "var"], ["bn"], epsilon=0.0),
             helper.make_node("Clip", ["bn", "lo", "hi"], ["r6"], name="relu6"),
             helper.make_node("Min", ["r6", "bound"], ["m"], name="per_channel_min"),
             helper.make_node("Conv", ["m", "w2"], ["y"], name="conv2")]
    path = _save(tmp_path, nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])], inits)
    x = rng.standard_normal((16, 3, 8, 8)).astype(np.float32)
    graph, _ = _compile(path, {"x": x}, tmp_path, [("fold_batchnorm", {}), ("annotate", {}), ("calibrate", {}),
                                                   ("correct_bias", {"mode": "analytic"})])
    scale = np.abs(w2).max() / 127.0
    error_sum = (np.round(w2.astype(np.float64) / scale) * scale - w2).sum(axis=(2, 3))
    samples = np.random.default_rng(5).standard_normal((1_000_000, 1))
    monte_carlo = np.clip(beta + gamma * samples, 0.0, np.minimum(bound, 6.0)).mean(axis=0)
    expected = -error_sum @ monte_carlo
    np.testing.assert_allclose(_node(graph, "conv2").input(2).const, expected, rtol=1e-2,
                               atol=1e-2 * np.abs(expected).max())


# ---- bias overflow guard ------------------------------------------------------------------------------
def test_bias_overflow_guard_is_settled_before_insert_qdq(tmp_path):
    rng = np.random.default_rng(2)
    w = (rng.standard_normal((3, 2, 1, 1)) * 0.5).astype(np.float32)
    w[1] = 1e-9  # a dead channel after BN folding: tiny weights, large bias
    b = np.array([0.1, 50.0, -0.2], np.float32)
    path = _save(tmp_path, [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv")],
                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 4, 4])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 4, 4])], {"w": w, "b": b})
    x = (rng.standard_normal((16, 2, 4, 4)) + 2.0).astype(np.float32)
    per_channel = Quantization()
    graph, _ = _compile(path, {"x": x}, tmp_path, [("annotate", {}), ("calibrate", {}), ("correct_bias", {})],
                        scheme=per_channel)
    conv = _node(graph, "conv")
    weight_qp = conv.input(1).qparams
    assert weight_qp.scale[1] > 1e-9  # enlarged by the guard (max calibration alone gives ~1e-11)
    _, final = bias_qparams(conv.input(2).const, conv.input(0).qparams, weight_qp)
    assert final is weight_qp  # insert_qdq will not change the scales the correction used
    error = fake_quantize(w, weight_qp).astype(np.float64) - w
    expected = b - error.sum(axis=(2, 3)) @ x.astype(np.float64).mean(axis=(0, 2, 3))
    np.testing.assert_allclose(conv.input(2).const, expected, rtol=1e-5, atol=1e-6)


def test_empirical_mode_needs_calibration_data(tmp_path):
    path = _save(tmp_path, [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")],
                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 2, 2])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, 2, 2])],
                 {"w": np.ones((1, 1, 1, 1), np.float32)})
    graph, ctx = _compile(path, {"x": np.ones((4, 1, 2, 2), np.float32)}, tmp_path,
                          [("annotate", {}), ("calibrate", {})])
    ctx.calibration = None
    with pytest.raises(QCompileError, match="correct_bias.*--calib"):
        PASSES.get("correct_bias")().run(graph, ctx)


# ---- digits: empirical correction reduces each layer's mean output error ------------------------------
def test_empirical_correction_reduces_mean_layer_error_on_digits(tmp_path):
    model_path = EXAMPLE / "digits_mobilenet.onnx"
    calib = dict(np.load(EXAMPLE / "calib.npz"))
    graph, _ = _compile(model_path, {"input": calib["input"]}, tmp_path,
                        [("annotate", {}), ("calibrate", {}), ("correct_bias", {})], batch_size=50)
    original = onnx.load(str(model_path))
    inits = {t.name: numpy_helper.to_array(t) for t in original.graph.initializer}
    layers = [n for n in original.graph.node if n.op_type in ("Conv", "Gemm")]

    # float inputs of every layer on held-out images
    exposed = onnx.ModelProto()
    exposed.CopyFrom(original)
    exposed.graph.output.extend(helper.make_tensor_value_info(n.input[0], TensorProto.FLOAT, None) for n in layers)
    test_x = np.load(EXAMPLE / "test.npz")["input"][:100]
    values = dict(zip([o.name for o in exposed.graph.output], _run(exposed, {"input": test_x})))

    before, after = [], []
    for proto in layers:
        node = _node(graph, proto.name)
        x = values[proto.input[0]]
        x_info = helper.make_tensor_value_info(proto.input[0], TensorProto.FLOAT, None)
        y_info = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
        w, b = inits[proto.input[1]], inits[proto.input[2]]
        w_q = fake_quantize(w, node.input(1).qparams)
        feeds = {proto.input[0]: x}
        y_float = _run(_one_node_model(proto, x_info, y_info, w, b), feeds)[0].astype(np.float64)
        reduce = (0, 2, 3) if proto.op_type == "Conv" else (0,)
        for out, bias in ((before, b), (after, node.input(2).const)):
            y = _run(_one_node_model(proto, x_info, y_info, w_q, bias), feeds)[0].astype(np.float64)
            out.append(np.abs((y - y_float).mean(axis=reduce)).mean())
    before, after = np.array(before), np.array(after)
    assert len(before) == 26
    assert after.sum() < 0.5 * before.sum()
    assert np.mean(after < before) >= 0.8
