"""Sensitivity ranking and fallback: auto on a small CNN with one deliberately broken layer.

conv2 holds one weight of 500 on an input channel that is always 0 after conv1's ReLU: the float
model never sees it, but a per-tensor weight scale of 500/127 rounds every other conv2 weight to 0.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import write_recipe
from qcompile.compiler import compile_model
from qcompile.errors import QCompileError
from qcompile.sensitivity import Attempt, Layer, search_fallback

PER_TENSOR = """
version: 1
quantization:
  weights: {granularity: per_tensor}
calibration: {batch_size: 32}
passes: [annotate, calibrate, insert_qdq]
"""


def make_broken_model(directory: Path) -> tuple[Path, Path, Path]:
    """broken.onnx, calib.npz (64 samples) and eval.npz (128 samples, labels = float predictions)."""
    rng = np.random.default_rng(0)

    def conv_w(cout: int, cin: int) -> np.ndarray:
        return (rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2.0 / (cin * 9))).astype(np.float32)

    w1, b1 = conv_w(8, 3), (rng.standard_normal(8) * 0.1).astype(np.float32)
    b1[7] = -1000.0  # channel 7 is always 0 after the ReLU
    w2, b2 = conv_w(8, 8), (rng.standard_normal(8) * 0.1).astype(np.float32)
    w2[0, 7, 1, 1] = 500.0  # invisible in float, ruins a per-tensor weight scale
    w3, b3 = conv_w(8, 8), (rng.standard_normal(8) * 0.1).astype(np.float32)
    wf = (rng.standard_normal((10, 8)) * 0.5).astype(np.float32)

    def build(bf: np.ndarray) -> onnx.ModelProto:
        arrays = {"w1": w1, "b1": b1, "w2": w2, "b2": b2, "w3": w3, "b3": b3, "wf": wf, "bf": bf}
        nodes = [
            helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
            helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
            helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"], name="conv3", pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c3"], ["r3"], name="relu3"),
            helper.make_node("GlobalAveragePool", ["r3"], ["g"], name="gap"),
            helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
            helper.make_node("Gemm", ["f", "wf", "bf"], ["logits"], name="fc", transB=1),
        ]
        graph = helper.make_graph(nodes, "broken",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 12, 12])],
                                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
                                  [numpy_helper.from_array(a, n) for n, a in arrays.items()])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        return model

    x = rng.standard_normal((256, 3, 12, 12)).astype(np.float32)
    probe = build(np.zeros(10, np.float32))
    probe.graph.output.append(helper.make_tensor_value_info("f", TensorProto.FLOAT, None))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    features = session.run(["f"], {"x": x})[0]
    model = build((-wf @ features.mean(0)).astype(np.float32))  # centred logits: every class occurs
    path = directory / "broken.onnx"
    onnx.save(model, str(path))
    labels = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0].argmax(1)
    np.savez(directory / "calib.npz", x=x[:64])
    np.savez(directory / "eval.npz", x=x[128:], labels=labels[128:])
    return path, directory / "calib.npz", directory / "eval.npz"


@pytest.fixture
def broken(tmp_path) -> tuple[Path, Path, Path]:
    return make_broken_model(tmp_path)


def test_sensitivity_ranks_the_broken_layer_first(tmp_path, broken):
    model, calib, data = broken
    recipe = write_recipe(tmp_path / "r.yaml", PER_TENSOR + "sensitivity: {eval_samples: 32}\n")
    report = compile_model(model, recipe, tmp_path / "out.onnx", calib=calib, eval_data=data, sensitivity=True)
    ranking = report["sensitivity"]
    assert ranking["samples"] == 32 and ranking["metric"] == "top1"
    assert ranking["evaluations"] == 2 * len(ranking["layers"])  # quantize-one and drop-one per layer
    assert [layer["name"] for layer in ranking["layers"]][0] == "conv2"
    worst = ranking["layers"][0]
    assert worst["nodes"] == ["conv2", "relu2"]  # the fused ReLU belongs to the layer
    assert worst["noise_share"] > 0.9
    assert worst["quantize_one"]["sqnr_db"] < 0 < worst["drop_one"]["sqnr_db"] - ranking["baseline"]["sqnr_db"] - 20
    # the fully quantized model is destroyed, the gate has nothing to do with the ranking
    assert report["evaluation"]["metrics"]["top1"]["quantized"] < 30 and report["gate"] is None


def test_fallback_auto_moves_the_broken_layer_to_float_and_passes(tmp_path, broken):
    model, calib, data = broken
    recipe = write_recipe(tmp_path / "r.yaml", PER_TENSOR + "gate: {metric: top1, max_drop: 10.0}\n"
                                                            "fallback: {mode: auto, max_layers: 4, eval_samples: 32}\n")
    out = tmp_path / "out.onnx"
    report = compile_model(model, recipe, out, calib=calib, eval_data=data)
    fallback = report["fallback"]
    assert fallback["needed"] and fallback["passed"] and fallback["replaced"]
    assert fallback["layers"] == ["conv2"] and fallback["nodes"] == ["conv2", "relu2"]
    # full: the first model, then k = 1; subset: quantize-one for each of the 5 layers (fallback's default)
    assert fallback["evaluations"] == {"full": 2, "subset": 5}
    assert report["sensitivity"]["methods"] == ["quantize_one"]
    assert fallback["first"]["top1"] < 30 and fallback["first_margin"] < 0
    assert [a["layers"] for a in fallback["attempts"]] == [1]
    assert report["gate"]["passed"]
    assert report["evaluation"]["metrics"]["top1"]["drop"] <= 10.0
    floats = {f["node"]: f["reason"] for f in report["float_nodes"]}
    assert "fallback: auto" in floats["conv2"] and "conv1" not in floats
    # the written model is the fallback's: conv2 reads its float weights, conv1 and conv3 int8 ones
    written = onnx.load(str(out))
    producers = {o: n for n in written.graph.node for o in n.output}
    convs = {n.name: n for n in written.graph.node if n.op_type == "Conv"}
    assert convs["conv2"].input[1] == "w2" and convs["conv2"].input[1] not in producers
    assert producers[convs["conv1"].input[1]].op_type == "DequantizeLinear"
    assert producers[convs["conv3"].input[1]].op_type == "DequantizeLinear"
    # onnxruntime would quantize a float Conv between DequantizeLinear and QuantizeLinear (per tensor):
    # conv2's output is left unquantized so that it stays float (annotate does it for every float layer)
    assert not [n for n in written.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in ("c2", "r2")]


def test_fallback_needs_a_gate(tmp_path, broken):
    model, calib, data = broken
    recipe = write_recipe(tmp_path / "r.yaml", PER_TENSOR + "fallback: {mode: auto}\n")
    with pytest.raises(QCompileError, match="fallback: auto needs a gate"):
        compile_model(model, recipe, tmp_path / "out.onnx", calib=calib, eval_data=data)
    assert not (tmp_path / "out.onnx").exists()


def test_reruns_reuse_the_calibration(tmp_path, broken):
    """A drop-one variant calibrates nothing: every range comes from the first run's cache."""
    from qcompile.compiler import _pass_context
    from qcompile.data import load_dataset, model_inputs
    from qcompile.importer import import_model
    from qcompile.recipe import build_passes, load_recipe
    from qcompile.registry import load_builtins_and_entry_points
    from qcompile.sensitivity import VariantBuilder

    model, calib, _ = broken
    load_builtins_and_entry_points()
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", PER_TENSOR))
    passes = build_passes(recipe, "r.yaml")
    inputs = model_inputs(import_model(model))
    context = dict(inputs=inputs, calib=calib, calib_count=len(load_dataset(calib, inputs)), jobs=1,
                   progress=lambda it, n, d: it)
    builder = VariantBuilder(passes, recipe.quantization, lambda: import_model(model, min_opset=13),
                             lambda scheme: _pass_context(recipe, scheme, **context))
    first = builder.build()
    assert next(r for r in first.records if r.name == "calibrate").stats["activations"] > 0
    conv2 = next(layer for layer in first.layers if layer.name == "conv2")
    variant = builder.build(conv2.float_overrides())
    calibrate = next(r for r in variant.records if r.name == "calibrate")
    assert calibrate.stats["activations"] == 0 and calibrate.stats.get("samples", 0) == 0
    ranges = {r["tensor"] for r in variant.notes["ranges"]}
    assert {"x", "r1", "w1", "w3"} <= ranges and "w2" not in ranges  # reused ranges are still reported


class _FakeBuilder:
    def build(self, overrides, reasons=None):
        return len(overrides)  # one node per test layer, so one override per floated layer


@pytest.mark.parametrize("needed, expected", [(1, [1]), (3, [1, 2, 3, 4]), (5, [1, 2, 4, 5, 6, 8]),
                                              (10, [1, 2, 4, 8, 9, 10]), (11, [1, 2, 4, 8, 10])])
def test_search_gallops_then_bisects(needed, expected):
    """Fewest layers in O(log k) evaluations: k = 1, 2, 4, ... then bisection (limit 10)."""
    layers = [Layer(f"l{i}", "Conv", (f"l{i}",)) for i in range(12)]

    def evaluate(build) -> Attempt:
        return Attempt(0, build >= needed, float(build - needed), {}, 0.0)

    result = search_fallback(_FakeBuilder(), layers, evaluate, max_layers=10)
    assert sorted(a.count for a in result.attempts) == expected
    if needed <= 10:
        assert result.passed and result.chosen.count == needed and len(result.layers) == needed
    else:
        assert not result.passed and result.chosen.count == 10  # the closest attempt
