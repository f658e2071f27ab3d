"""qcompile verify / --verify: the integer executor against onnxruntime on compiled models."""
from __future__ import annotations

import json

import pytest

from conftest import EXAMPLE, RECIPES
from qcompile.cli import main
from qcompile.verify import TensorCheck, Verification


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("verify")
    args = ["--calib", str(EXAMPLE / "calib.npz"), "-q"]
    assert main([str(EXAMPLE / "digits_mobilenet.onnx"), "--recipe", str(RECIPES / "int8_qoperator.yaml"),
                 "-o", str(tmp / "qop.onnx"), *args]) == 0
    assert main([str(EXAMPLE / "digits_mobilenet.onnx"), "--recipe", str(RECIPES / "int8_sym.yaml"),
                 "-o", str(tmp / "qdq.onnx"), *args]) == 0
    return tmp


@pytest.mark.parametrize("name", ["qop.onnx", "qdq.onnx"])
def test_verify_command_passes_and_reports_every_tensor(compiled, capsys, name):
    out = compiled / f"{name}.json"
    code = main(["verify", str(compiled / name), "--data", str(EXAMPLE / "test.npz"), "--float",
                 str(EXAMPLE / "digits_mobilenet.onnx"), "--samples", "16", "--json", str(out)])
    text = capsys.readouterr().out
    assert code == 0 and "PASS" in text
    result = json.loads(out.read_text())
    assert result["lowered_from_qdq"] == (name == "qdq.onnx")
    assert result["samples"] == 16
    assert len(result["layers"]) >= 40
    assert all(layer["identical"] == 1.0 and layer["max_lsb"] == 0 for layer in result["layers"])
    assert result["outputs"][0]["sqnr_db"] > 20  # against the float model


def test_fixed_point_mode_checks_each_op_on_onnxruntime_inputs(compiled, capsys):
    code = main(["verify", str(compiled / "qop.onnx"), "--data", str(EXAMPLE / "test.npz"), "--mode", "fixed-point",
                 "--samples", "8", "--json", str(compiled / "fp.json")])
    assert "drift LSB" in capsys.readouterr().out
    result = json.loads((compiled / "fp.json").read_text())
    checks = result["layers"] + result["outputs"]
    assert code == 0 and result["passed"]
    assert all(c["max_lsb"] <= 1 for c in checks)  # one requantization apart: within 1 LSB
    assert any(c["identical"] < 1.0 for c in checks)  # and fixed point does round differently
    assert max(c["drift_lsb"] for c in checks) > 1  # run end to end, the differences compound


def test_compile_with_verify_records_the_result(tmp_path, capsys):
    code = main([str(EXAMPLE / "digits_mobilenet.onnx"), "--recipe", str(RECIPES / "int8_qoperator.yaml"),
                 "--calib", str(EXAMPLE / "calib.npz"), "--eval", str(EXAMPLE / "test.npz"), "-o",
                 str(tmp_path / "v.onnx"), "--verify"])
    assert code == 0
    assert "verify (onnx mode, 50 samples): PASS" in capsys.readouterr().out
    report = json.loads((tmp_path / "v.report.json").read_text())
    assert report["verification"]["passed"] is True


def test_more_than_one_lsb_fails():
    ok = TensorCheck("a", "QLinearConv", elements=4, identical=3, max_lsb=1)
    bad = TensorCheck("b", "QLinearAdd", elements=4, identical=2, max_lsb=2)
    assert Verification("m", "onnx", 1, False, [ok], [ok]).passed
    assert not Verification("m", "onnx", 1, False, [ok], [bad]).passed


def test_float_model_is_not_verifiable(capsys):
    code = main(["verify", str(EXAMPLE / "digits_mobilenet.onnx"), "--data", str(EXAMPLE / "test.npz")])
    assert code == 2 and "no integer operators" in capsys.readouterr().err
