"""End to end: compile real models, run them in onnxruntime, compare with the float model."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import EXAMPLE, RECIPES, SHARED, ort_run, plain_recipe, sha256, write_recipe
from qcompile.cli import main
from qcompile.compiler import compile_model


def _accuracy(model, data) -> tuple[np.ndarray, float]:
    logits = ort_run(model, {"input": data["input"]})[0]
    return logits.argmax(1), float((logits.argmax(1) == data["labels"]).mean())


@pytest.mark.parametrize("recipe", ["int8_sym.yaml", "int8_asym.yaml"])
def test_digits_example_keeps_accuracy(tmp_path, recipe, digits_model, digits_calib, digits_test):
    before = sha256(digits_model)
    out = tmp_path / "d.int8.onnx"
    report = compile_model(digits_model, RECIPES / recipe, out, calib=digits_calib, eval_data=digits_test)
    assert sha256(digits_model) == before
    onnx.checker.check_model(str(out), full_check=True)
    test = np.load(digits_test)
    float_pred, float_acc = _accuracy(digits_model, test)
    quant_pred, quant_acc = _accuracy(out, test)
    assert quant_acc >= float_acc - 0.01
    assert (quant_pred == float_pred).mean() >= 0.98
    # the report says what onnxruntime says
    assert report["evaluation"]["quantized"]["top1"] == pytest.approx(quant_acc)
    assert report["evaluation"]["float"]["top1"] == pytest.approx(float_acc)
    assert json.loads((tmp_path / "d.int8.report.json").read_text())["evaluation"] == report["evaluation"]


def test_qdq_structure(tmp_path, digits_model, digits_calib):
    out = tmp_path / "d.onnx"
    compile_model(digits_model, RECIPES / "int8_sym.yaml", out, calib=digits_calib)
    model = onnx.load(str(out))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    nodes = list(model.graph.node)
    producers = {o: n for n in nodes for o in n.output}
    convs = [n for n in nodes if n.op_type == "Conv"]
    assert len(convs) == 25
    for conv in convs:
        weight_dq = producers[conv.input[1]]
        assert weight_dq.op_type == "DequantizeLinear"
        codes = inits[weight_dq.input[0]]
        assert codes.dtype == np.int8 and codes.min() >= -127
        assert inits[weight_dq.input[1]].shape == (codes.shape[0],)  # per output channel
        assert helper.get_attribute_value(weight_dq.attribute[0]) == 0
        bias_dq = producers[conv.input[2]]
        assert inits[bias_dq.input[0]].dtype == np.int32
        input_dq = producers[conv.input[0]]
        expected_bias_scale = inits[input_dq.input[1]] * inits[weight_dq.input[1]]
        np.testing.assert_allclose(inits[bias_dq.input[1]], expected_bias_scale, rtol=1e-6)
    # Clip(0, 6) after a Conv is absorbed: the Conv feeds a uint8 QuantizeLinear with zero point 0
    assert not [n for n in nodes if n.op_type == "Clip"]
    uint8_q = [n for n in nodes if n.op_type == "QuantizeLinear" and inits[n.input[2]].dtype == np.uint8]
    assert uint8_q and all(inits[n.input[2]] == 0 for n in uint8_q)
    assert model.graph.output[0].name == "logits"


def test_per_channel_requires_opset_13_and_old_models_are_converted(tmp_path):
    source = SHARED / "models" / "ch_ppocr_mobile_v2.0_cls_infer.onnx"
    calib = tmp_path / "calib.npz"
    rng = np.random.default_rng(0)
    np.savez(calib, x=rng.uniform(-1, 1, (8, 3, 48, 192)).astype(np.float32))
    out = tmp_path / "cls.onnx"
    report = compile_model(source, RECIPES / "int8_sym.yaml", out, calib=calib, eval_data=calib)
    model = onnx.load(str(out))
    assert report["opset"] == {"source": 11, "output": 13}
    assert {o.domain: o.version for o in model.opset_import}[""] == 13
    onnx.checker.check_model(model, full_check=True)
    x = np.load(calib)["x"]
    float_out, quant_out = ort_run(source, {"x": x})[0], ort_run(out, {"x": x})[0]
    assert float_out.shape == quant_out.shape
    assert report["evaluation"]["outputs"][0]["sqnr_db"] > 15


def _save(graph, path):
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8  # what torch writes; onnx's newest IR is beyond onnxruntime's
    onnx.save(model, str(path))


def _gemm_relu_model(path, w, b):
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", w.shape[1]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", w.shape[0]])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    _save(graph, path)


def test_gemm_relu_matches_hand_computed_quantization(tmp_path):
    """Independent numpy reference of symmetric int8: per-channel weights, int32 bias, uint8 after Relu."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((5, 7)).astype(np.float32)
    b = rng.standard_normal(5).astype(np.float32)
    x = rng.standard_normal((32, 7)).astype(np.float32)
    model = tmp_path / "gemm.onnx"
    _gemm_relu_model(model, w, b)
    np.savez(tmp_path / "calib.npz", x=x)
    out = tmp_path / "gemm.q.onnx"
    compile_model(model, plain_recipe(tmp_path), out, calib=tmp_path / "calib.npz")

    s_x = np.float32(np.abs(x).max() / 127)
    xq = np.clip(np.rint(x / s_x), -128, 127) * s_x
    s_w = (np.abs(w).max(axis=1) / 127).astype(np.float32)
    wq = np.clip(np.rint(w / s_w[:, None]), -127, 127) * s_w[:, None]
    s_b = s_x.astype(np.float64) * s_w
    bq = np.rint(b / s_b) * s_b
    h = xq.astype(np.float64) @ wq.T.astype(np.float64) + bq
    y_float = np.maximum(x @ w.T + b, 0)
    s_y = np.float32(y_float.max() / 255)
    expected = np.clip(np.rint(np.maximum(h, 0) / s_y), 0, 255) * s_y

    got = ort_run(out, {"x": x})[0]
    assert np.abs(got - expected).max() <= s_y * 1.0001  # at most one code apart (float32 vs float64 rounding)
    assert np.mean(np.isclose(got, expected, atol=s_y * 1e-3)) > 0.97


def test_dump_ir_writes_one_file_per_pass(tmp_path, capsys, digits_model, digits_calib):
    code = main([str(digits_model), "--recipe", str(RECIPES / "int8_sym.yaml"), "--calib", str(digits_calib),
                 "-o", str(tmp_path / "o.onnx"), "--dump-ir", str(tmp_path / "ir"), "-q"])
    assert code == 0
    files = sorted(p.name for p in (tmp_path / "ir").iterdir())
    from qcompile.recipe import build_passes, load_recipe

    names = [p.name for p in build_passes(load_recipe(RECIPES / "int8_sym.yaml"), "int8_sym.yaml")]
    assert files == ["00_input.txt"] + [f"{i:02d}_{name}.txt" for i, name in enumerate(names, start=1)]
    assert "QuantizeLinear" in (tmp_path / "ir" / files[-1]).read_text()
    assert "scale=" in (tmp_path / "ir" / f"{names.index('calibrate') + 1:02d}_calibrate.txt").read_text()


def test_unsupported_ops_stay_float_and_are_reported(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Softmax", ["c"], ["s"], axis=1),
         helper.make_node("Conv", ["s", "w2"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 4, 4])],
        [numpy_helper.from_array(np.ones((2, 2, 1, 1), np.float32), "w"),
         numpy_helper.from_array(np.ones((3, 2, 1, 1), np.float32), "w2")])
    model = tmp_path / "soft.onnx"
    _save(graph, model)
    np.save(tmp_path / "c.npy", np.random.default_rng(0).standard_normal((4, 2, 4, 4)).astype(np.float32))
    report = compile_model(model, RECIPES / "int8_sym.yaml", tmp_path / "o.onnx", calib=tmp_path / "c.npy")
    assert report["float_nodes"] == [{"node": "Softmax_1", "op": "Softmax", "reason": "no quantization rule for op 'Softmax'"}]
    ops = [n.op_type for n in onnx.load(str(tmp_path / "o.onnx")).graph.node]
    assert "Softmax" in ops


def test_override_keeps_a_node_float(tmp_path, digits_model, digits_calib):
    recipe = write_recipe(tmp_path / "r.yaml", (RECIPES / "int8_sym.yaml").read_text().replace(
        "calibration:", "  overrides:\n    - match: '/fc/.*'\n      quantize: false\ncalibration:"))
    report = compile_model(digits_model, recipe, tmp_path / "o.onnx", calib=digits_calib)
    assert [f["op"] for f in report["float_nodes"]] == ["Gemm"]


def test_overrides_by_tensor_name_pick_calibrator_bits_and_signedness(tmp_path, digits_model, digits_calib):
    recipe = write_recipe(tmp_path / "r.yaml", (RECIPES / "int8_sym.yaml").read_text().replace(
        "calibration:",
        "  overrides:\n"
        "    - match: 'fc\\.weight.*'\n      weights: {bits: 4, granularity: per_tensor}\n"
        "    - match: '/head/.*'\n      activations: {calibrator: percentile, calibrator_options: {percentile: 99.0}}\n"
        "calibration:"))
    report = compile_model(digits_model, recipe, tmp_path / "o.onnx", calib=digits_calib)
    ranges = {r["tensor"]: r for r in report["ranges"]}
    fc = next(r for name, r in ranges.items() if name.startswith("fc.weight"))
    assert fc["bits"] == 4 and fc["axis"] is None
    head = [r for name, r in ranges.items() if name.startswith("/head/")]
    assert head and all(r["calibrator"] == "percentile" for r in head)
    others = [r for name, r in ranges.items() if r["kind"] == "activation" and not name.startswith("/head/")]
    assert others and all(r["calibrator"] == "max" for r in others)
    model = onnx.load(str(tmp_path / "o.onnx"))
    codes = next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name.startswith("fc.weight") and t.name.endswith("_quantized"))
    assert codes.min() >= -7 and codes.max() <= 7 and max(-int(codes.min()), int(codes.max())) == 7


def test_a_layer_kept_float_stays_float_in_onnxruntime(tmp_path, digits_model, digits_calib):
    """onnxruntime quantizes a float Conv between DQ and Q by itself; annotate must not create that pattern."""
    import onnxruntime as ort

    recipe = write_recipe(tmp_path / "r.yaml", plain_recipe(tmp_path).read_text().replace(
        "calibration:", "  overrides:\n    - match: '/blocks/blocks.1/expand/expand.0/Conv'\n      quantize: false\ncalibration:"))
    out = tmp_path / "o.onnx"
    compile_model(digits_model, recipe, out, calib=digits_calib)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx"))
    kept = [n for n in optimized.graph.node if "blocks.1/expand/" in n.name]
    assert kept and all(not n.op_type.startswith("QLinear") for n in kept), [n.op_type for n in kept]


def test_float_layer_followed_by_equalized_relu6_clamp(tmp_path, digits_calib):
    """After equalization a ReLU6 is Clip + per-channel Min; when the layer before is kept float, the
    Clip and the Min (which would share the Clip's scale) stay float too instead of failing."""
    recipe = write_recipe(tmp_path / "r.yaml", plain_recipe(tmp_path).read_text().replace(
        "  - annotate\n", "  - equalize_cross_layer\n  - {exclude_layers: {names: ['/blocks/blocks.0/expand/expand.0/Conv']}}\n"
                          "  - annotate\n"))
    report = compile_model(EXAMPLE / "digits_mobilenet_bn.onnx", recipe, tmp_path / "o.onnx", calib=digits_calib)
    floats = {f["node"]: f["reason"] for f in report["float_nodes"]}
    assert "/blocks/blocks.0/expand/expand.0/Conv" in floats
    assert any(op["op"] == "Min" and "stays float" in op["reason"] for op in report["float_nodes"])
