"""Bad input: one-line message naming the file/field, exit code 2, no output written, input untouched."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import RECIPES, sha256, write_recipe
from qcompile.cli import main


def _run(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def _assert_one_line_error(err: str, *fragments: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("qcompile: error: ")
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture
def out(tmp_path):
    return tmp_path / "out.onnx"


def _no_output(out) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".out.onnx")], "temporary files left behind"


def test_missing_model(capsys, out, tmp_path, digits_calib):
    code, err = _run(capsys, tmp_path / "nope.onnx", "--recipe", RECIPES / "int8_sym.yaml", "--calib", digits_calib, "-o", out)
    assert code == 2
    _assert_one_line_error(err, "nope.onnx", "no such file")
    _no_output(out)


def test_directory_instead_of_model(capsys, out, tmp_path):
    code, err = _run(capsys, tmp_path, "--recipe", RECIPES / "int8_sym.yaml", "-o", out)
    assert code == 2
    _assert_one_line_error(err, "is a directory")


def test_not_onnx(capsys, out, tmp_path, digits_calib):
    bogus = tmp_path / "model.onnx"
    bogus.write_text("this is not a protobuf at all\n" * 10)
    before = sha256(bogus)
    code, err = _run(capsys, bogus, "--recipe", RECIPES / "int8_sym.yaml", "--calib", digits_calib, "-o", out)
    assert code == 2
    _assert_one_line_error(err, "model.onnx")
    _no_output(out)
    assert sha256(bogus) == before


@pytest.mark.parametrize("fraction", [0.5, 0.97])
def test_truncated_protobuf(capsys, out, tmp_path, digits_model, digits_calib, fraction):
    data = digits_model.read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: int(len(data) * fraction)])
    code, err = _run(capsys, cut, "--recipe", RECIPES / "int8_sym.yaml", "--calib", digits_calib, "-o", out)
    assert code == 2
    _assert_one_line_error(err, "cut.onnx")
    _no_output(out)


def test_missing_calibration_file(capsys, out, tmp_path, digits_model):
    before = sha256(digits_model)
    code, err = _run(capsys, digits_model, "--recipe", RECIPES / "int8_sym.yaml", "--calib", tmp_path / "calib.npz", "-o", out)
    assert code == 2
    _assert_one_line_error(err, "calib.npz", "no such file")
    _no_output(out)
    assert sha256(digits_model) == before


def test_calibration_wrong_shape(capsys, out, tmp_path, digits_model):
    bad = tmp_path / "bad.npz"
    np.savez(bad, input=np.zeros((4, 1, 28, 28), np.float32))
    code, err = _run(capsys, digits_model, "--recipe", RECIPES / "int8_sym.yaml", "--calib", bad, "-o", out)
    assert code == 2
    _assert_one_line_error(err, "bad.npz", "'input'", "[N,1,32,32]", "[4,1,28,28]")
    _no_output(out)


def test_calibration_wrong_dtype(capsys, out, tmp_path, digits_model):
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((4, 1, 32, 32), np.int32))
    code, err = _run(capsys, digits_model, "--recipe", RECIPES / "int8_sym.yaml", "--calib", bad, "-o", out)
    assert code == 2
    _assert_one_line_error(err, "bad.npy", "'input'", "float32", "int32")
    _no_output(out)


def test_calibration_wrong_input_name(capsys, out, tmp_path, digits_model):
    bad = tmp_path / "bad.npz"
    np.savez(bad, image=np.zeros((4, 1, 32, 32), np.float32), other=np.zeros((4, 3), np.float32))
    code, err = _run(capsys, digits_model, "--recipe", RECIPES / "int8_sym.yaml", "--calib", bad, "-o", out)
    assert code == 2
    _assert_one_line_error(err, "bad.npz", "'input'", "image")


def test_uint8_images_without_preprocessing(capsys, out, tmp_path, digits_model):
    bad = tmp_path / "u8.npy"
    np.save(bad, np.zeros((4, 32, 32, 1), np.uint8))
    code, err = _run(capsys, digits_model, "--recipe", RECIPES / "int8_sym.yaml", "--calib", bad, "-o", out)
    assert code == 2
    _assert_one_line_error(err, "u8.npy", "preprocessing")


def test_recipe_typo(capsys, out, tmp_path, digits_model, digits_calib):
    recipe = write_recipe(tmp_path / "r.yaml", (RECIPES / "int8_sym.yaml").read_text().replace("granularity", "granularty"))
    code, err = _run(capsys, digits_model, "--recipe", recipe, "--calib", digits_calib, "-o", out)
    assert code == 2
    _assert_one_line_error(err, "r.yaml", "quantization.weights.granularty", "unknown key", "granularity")
    _no_output(out)


def test_refuses_to_overwrite_input(capsys, tmp_path, digits_model, digits_calib):
    copy = tmp_path / "m.onnx"
    copy.write_bytes(digits_model.read_bytes())
    before = sha256(copy)
    code, err = _run(capsys, copy, "--recipe", RECIPES / "int8_sym.yaml", "--calib", digits_calib, "-o", tmp_path / "." / "m.onnx")
    assert code == 2
    _assert_one_line_error(err, "refusing to overwrite")
    assert sha256(copy) == before


def test_existing_output_survives_a_failed_run(capsys, out, tmp_path, digits_model):
    out.write_bytes(b"previous result")
    bad = tmp_path / "bad.npz"
    np.savez(bad, input=np.zeros((4, 1, 28, 28), np.float32))
    code, _ = _run(capsys, digits_model, "--recipe", RECIPES / "int8_sym.yaml", "--calib", bad, "-o", out)
    assert code == 2
    assert out.read_bytes() == b"previous result"


def test_console_script_exit_code_and_usage(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "qcompile.cli", str(tmp_path / "x.onnx"), "--recipe",
                           str(RECIPES / "int8_sym.yaml")], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "x.onnx" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "qcompile.cli"], capture_output=True, text=True)
    assert proc.returncode == 2 and "usage" in proc.stderr
