"""The quality gate: exit codes, the one stderr line, files left behind, JUnit XML, metrics by name."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import numpy as np
import onnx
import pytest

from conftest import RECIPES, write_recipe
from qcompile.cli import EXIT_GATE, main
from qcompile.compiler import compile_model
from qcompile.metrics import Metric
from qcompile.registry import register_metric

# 4-bit per-tensor weights cost the digits model a few points of top-1 (98.75 -> ~95.5 %)
W4_PER_TENSOR = """
version: 1
quantization:
  weights: {bits: 4, granularity: per_tensor}
passes: [fold_batchnorm, annotate, calibrate, insert_qdq]
"""


def _cli(tmp_path, digits_model, digits_calib, digits_test, recipe, *extra: str) -> list[str]:
    return [str(digits_model), "--recipe", str(recipe), "--calib", str(digits_calib), "--eval", str(digits_test),
            "-o", str(tmp_path / "out" / "d.onnx"), "-q", *extra]


def test_gate_passes_exit_0_with_junit(tmp_path, capsys, digits_model, digits_calib, digits_test):
    junit = tmp_path / "junit.xml"
    code = main(_cli(tmp_path, digits_model, digits_calib, digits_test, RECIPES / "int8_sym.yaml",
                     "--max-drop", "1.0", "--junit", str(junit)))
    assert code == 0
    assert capsys.readouterr().err == ""
    report = json.loads((tmp_path / "out" / "d.report.json").read_text())
    assert report["gate"]["passed"] and report["gate"]["checks"][0]["metric"] == "top1"  # default with labels
    suite = ET.parse(junit).getroot()
    assert suite.tag == "testsuite" and suite.get("tests") == "1" and suite.get("failures") == "0"
    case = suite.find("testcase")
    assert case is not None and case.find("failure") is None and "top1" in case.get("name")
    # the views are written beside the report by default
    assert (tmp_path / "out" / "d.report.html").stat().st_size > 1000
    assert (tmp_path / "out" / "d.report.md").read_text().startswith("# qcompile report")


def test_gate_failure_exit_3_one_line_and_everything_written(tmp_path, capsys, digits_model, digits_calib,
                                                              digits_test):
    recipe = write_recipe(tmp_path / "w4.yaml", W4_PER_TENSOR)
    junit = tmp_path / "ci" / "junit.xml"
    code = main(_cli(tmp_path, digits_model, digits_calib, digits_test, recipe, "--max-drop", "top1=1.0",
                     "--max-drop", "top5=5", "--junit", str(junit), "--html", str(tmp_path / "view.html")))
    assert code == EXIT_GATE == 3
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    report = json.loads((tmp_path / "out" / "d.report.json").read_text())
    top1 = report["evaluation"]["metrics"]["top1"]
    assert line.startswith("qcompile: gate failed: top1 ")
    assert f"float {top1['float']:.2f}%" in line and f"quantized {top1['quantized']:.2f}%" in line
    assert "allowed 1.00 points" in line and "top5" not in line  # only the failing check
    # the model and the report are still written, so a failing CI run leaves something to look at
    onnx.checker.check_model(str(tmp_path / "out" / "d.onnx"))
    assert report["gate"]["passed"] is False
    assert [c["passed"] for c in report["gate"]["checks"]] == [False, True]
    assert (tmp_path / "view.html").exists() and (tmp_path / "out" / "d.report.md").exists()
    suite = ET.parse(junit).getroot()
    assert suite.get("tests") == "2" and suite.get("failures") == "1"
    cases = suite.findall("testcase")
    failure = cases[0].find("failure")
    assert failure is not None and "allowed 1.00 points" in failure.get("message")
    assert cases[1].find("failure") is None


def test_recipe_gate_relative_and_min(tmp_path, digits_model, digits_calib, digits_test):
    recipe = write_recipe(tmp_path / "r.yaml", (RECIPES / "int8_sym.yaml").read_text() + """
gate:
  - {metric: top1, max_drop: 1.0, relative: true}
  - {metric: sqnr, min: 80}
  - {metric: kl, max: 0.5}
""")
    report = compile_model(digits_model, recipe, tmp_path / "d.onnx", calib=digits_calib, eval_data=digits_test)
    relative, sqnr, kl = report["gate"]["checks"]
    assert relative["relative"] and relative["limit"] == pytest.approx(relative["float"] / 100)
    assert relative["passed"]
    assert sqnr["bound"] == "min" and not sqnr["passed"] and "< min 80.00 dB" in sqnr["message"]
    assert kl["bound"] == "max" and kl["passed"]
    assert report["gate"]["passed"] is False


@pytest.mark.parametrize("args, message", [
    (["--max-drop", "1"], "needs evaluation data; pass --eval"),
    (["--max-drop", "sqnr=1", "--eval", "{test}"], "no drop from it is measurable; gate it with min"),
    (["--max-drop", "topp1=1", "--eval", "{test}"], "unknown metric 'topp1'"),
    (["--max-drop", "top1=one", "--eval", "{test}"], "expected [METRIC=]NUMBER"),
    (["--max-drop", "top1=1", "--eval", "{unlabelled}"], "metric 'top1' needs labels"),
    (["--metrics", "top1,cosine", "--eval", "{unlabelled}"], "metric 'top1' needs labels"),
])
def test_gate_usage_errors_exit_2_and_write_nothing(tmp_path, capsys, digits_model, digits_calib, digits_test,
                                                    args, message):
    unlabelled = tmp_path / "unlabelled.npz"
    np.savez(unlabelled, input=np.load(digits_test)["input"])
    args = [a.format(test=digits_test, unlabelled=unlabelled) for a in args]
    out = tmp_path / "d.onnx"
    code = main([str(digits_model), "--recipe", str(RECIPES / "int8_sym.yaml"), "--calib", str(digits_calib),
                 "-o", str(out), "-q", *args])
    assert code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert not out.exists() and not out.with_name("d.report.json").exists()


def test_agreement_is_the_default_gate_metric_without_labels(tmp_path, digits_model, digits_calib, digits_test):
    unlabelled = tmp_path / "unlabelled.npz"
    np.savez(unlabelled, input=np.load(digits_test)["input"])
    from qcompile.gate import checks_from_cli

    report = compile_model(digits_model, RECIPES / "int8_sym.yaml", tmp_path / "d.onnx", calib=digits_calib,
                           eval_data=unlabelled, gate=checks_from_cli(["2.0"]))
    metrics = report["evaluation"]["metrics"]
    assert "top1" not in metrics and set(metrics) == {"agreement", "sqnr", "cosine", "kl"}
    assert report["gate"]["checks"][0]["metric"] == "agreement" and report["gate"]["passed"]
    assert metrics["agreement"]["float"] == 100.0 and metrics["sqnr"]["float"] == "inf"


@register_metric("test_mean_abs_logit_ratio")
class MeanAbsLogitRatio(Metric):
    """A plugin metric: mean |logit| of the model over the float model's (1.0 for the float model)."""

    def compute(self, outputs, ref):
        return float(np.mean(np.abs(outputs[0])) / np.mean(np.abs(ref.outputs[0])))


def test_plugin_metric_by_name_and_gate(tmp_path, digits_model, digits_calib, digits_test):
    from qcompile.gate import checks_from_cli

    report = compile_model(digits_model, RECIPES / "int8_sym.yaml", tmp_path / "d.onnx", calib=digits_calib,
                           eval_data=digits_test, metrics=["top1", "cosine"],
                           gate=checks_from_cli(["test_mean_abs_logit_ratio=0.2"]))
    metrics = report["evaluation"]["metrics"]
    assert list(metrics) == ["top1", "cosine", "test_mean_abs_logit_ratio"]
    assert metrics["test_mean_abs_logit_ratio"]["float"] == 1.0
    assert metrics["test_mean_abs_logit_ratio"]["quantized"] == pytest.approx(1.0, abs=0.1)
    assert report["gate"]["passed"]
    assert metrics["top1"]["quantized"] == pytest.approx(100 * report["evaluation"]["quantized"]["top1"])
