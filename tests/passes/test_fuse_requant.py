"""fuse_requant: QOperator output runs in onnxruntime, matches the QDQ model, and the integer
executor reproduces onnxruntime bit for bit."""
from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import EXAMPLE, RECIPES, ort_run, write_recipe  # noqa: E402

from qcompile.compiler import compile_model  # noqa: E402
from qcompile.errors import RecipeError  # noqa: E402
from qcompile.executor import IntegerExecutor  # noqa: E402


@pytest.fixture(scope="module")
def lowered(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qop")
    qdq, qop = tmp / "qdq.onnx", tmp / "qop.onnx"
    compile_model(EXAMPLE / "digits_mobilenet.onnx", RECIPES / "int8_sym.yaml", qdq, calib=EXAMPLE / "calib.npz")
    report = compile_model(EXAMPLE / "digits_mobilenet.onnx", RECIPES / "int8_qoperator.yaml", qop,
                           calib=EXAMPLE / "calib.npz")
    return qdq, qop, report


def test_every_op_is_lowered(lowered):
    _, qop, report = lowered
    ops = Counter(n.op_type for n in onnx.load(str(qop)).graph.node)
    assert ops["QLinearConv"] == 25 and ops["QGemm"] == 1 and ops["QLinearAdd"] == 3 and ops["QLinearMul"] == 4
    assert ops["Gather"] == 9  # HardSwish x5, HardSigmoid x4 as 256-entry tables
    assert not {"Conv", "Gemm", "Add", "Mul", "HardSwish", "HardSigmoid"} & set(ops)
    assert ops["QuantizeLinear"] == 1 and ops["DequantizeLinear"] == 1  # the model's input and output only
    stats = report["passes"][-1]["stats"]
    assert stats["left_in_qdq_form"] == 0
    requant = report["notes"]["requant"]
    assert len(requant) == 26 and all(0 < r["multiplier"]["max"] if isinstance(r["multiplier"], dict)
                                      else 0 < r["multiplier"] for r in requant)


def test_qoperator_matches_qdq_predictions(lowered):
    qdq, qop, _ = lowered
    test = np.load(EXAMPLE / "test.npz")
    a = ort_run(qdq, {"input": test["input"]})[0]
    b = ort_run(qop, {"input": test["input"]})[0]
    assert np.array_equal(a.argmax(1), b.argmax(1))
    assert (b.argmax(1) == test["labels"]).mean() >= 0.97


@pytest.mark.parametrize("mode", ["onnx", "fixed-point"])
def test_integer_executor_against_onnxruntime(lowered, mode):
    _, qop, _ = lowered
    x = np.load(EXAMPLE / "test.npz")["input"][:32]
    expected = ort_run(qop, {"input": x})[0]
    got = IntegerExecutor(onnx.load(str(qop)), mode=mode).run({"input": x})["logits"]
    if mode == "onnx":
        assert np.array_equal(got, expected)
    else:  # one requantization rounds differently now and then; the prediction must not care
        assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.95


def test_generic_profile_keeps_int8(tmp_path):
    recipe = write_recipe(tmp_path / "g.yaml", (RECIPES / "int8_qoperator.yaml").read_text()
                          .replace("unsigned_when_nonnegative: true", "unsigned_when_nonnegative: false")
                          .replace("profile: onnxruntime-x86", "profile: generic"))
    out = tmp_path / "g.onnx"
    report = compile_model(EXAMPLE / "digits_mobilenet.onnx", recipe, out, calib=EXAMPLE / "calib.npz")
    assert report["passes"][-1]["stats"]["left_in_qdq_form"] == 0
    model = onnx.load(str(out))
    conv = next(n for n in model.graph.node if n.op_type == "QLinearConv")
    zero_points = {t.name: t for t in model.graph.initializer}
    assert zero_points[conv.input[2]].data_type == onnx.TensorProto.INT8


def test_target_and_passes_must_agree(tmp_path):
    recipe = write_recipe(tmp_path / "bad.yaml", (RECIPES / "int8_qoperator.yaml").read_text()
                          .replace("target: qoperator", "target: qdq"))
    with pytest.raises(RecipeError, match="set target: qoperator"):
        compile_model(EXAMPLE / "digits_mobilenet.onnx", recipe, tmp_path / "o.onnx", calib=EXAMPLE / "calib.npz")
