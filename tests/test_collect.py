"""Statistics collection: shards and groups give the same ranges; memory does not grow with samples."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
from onnx import numpy_helper

from conftest import EXAMPLE, RECIPES, write_recipe
from qcompile.compiler import compile_model


def _qparams(path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name.endswith(("_scale", "_zero_point"))}


def _assert_same_model(a, b):
    qa, qb = _qparams(a), _qparams(b)
    assert qa.keys() == qb.keys()
    for name in qa:
        assert np.array_equal(qa[name], qb[name]), name


def test_two_jobs_merge_to_the_same_ranges(tmp_path, digits_model, digits_calib):
    one = tmp_path / "one.onnx"
    two = tmp_path / "two.onnx"
    compile_model(digits_model, RECIPES / "int8_sym.yaml", one, calib=digits_calib)
    report = compile_model(digits_model, RECIPES / "int8_sym.yaml", two, calib=digits_calib, jobs=2)
    calibrate = next(p for p in report["passes"] if p["name"] == "calibrate")
    assert calibrate["stats"]["jobs"] == 2 and calibrate["stats"]["samples"] == 200
    _assert_same_model(one, two)


def test_small_memory_budget_splits_into_groups_with_the_same_ranges(tmp_path, digits_model, digits_calib):
    recipe = write_recipe(tmp_path / "r.yaml", (RECIPES / "int8_sym.yaml").read_text().replace(
        "  batch_size: 16", "  batch_size: 16\n  memory_budget_mb: 1"))
    grouped = tmp_path / "grouped.onnx"
    report = compile_model(digits_model, recipe, grouped, calib=digits_calib)
    assert next(p for p in report["passes"] if p["name"] == "calibrate")["stats"]["groups"] > 2
    compile_model(digits_model, RECIPES / "int8_sym.yaml", tmp_path / "plain.onnx", calib=digits_calib)
    _assert_same_model(tmp_path / "plain.onnx", grouped)


PEAK_RSS = """
import json, resource, sys
from qcompile.compiler import compile_model
compile_model(sys.argv[1], sys.argv[2], sys.argv[3], calib=sys.argv[4])
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
"""


def test_peak_memory_does_not_grow_with_samples(tmp_path, digits_model):
    """50 vs 400 calibration samples (the 400 repeat the test split): peak RSS within 10%."""
    x = np.load(EXAMPLE / "test.npz")["input"]
    peaks = {}
    for count in (50, 400):
        np.save(tmp_path / f"c{count}.npy", x[:count])
        proc = subprocess.run([sys.executable, "-c", PEAK_RSS, str(digits_model), str(RECIPES / "int8_sym.yaml"),
                               str(tmp_path / f"o{count}.onnx"), str(tmp_path / f"c{count}.npy")],
                              capture_output=True, text=True, check=True)
        peaks[count] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert peaks[400] <= peaks[50] * 1.10, peaks
