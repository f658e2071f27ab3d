"""The report: JSON schema round trip, the Markdown summary and the single-file HTML page."""
from __future__ import annotations

import base64
import copy
import json
from html.parser import HTMLParser

import pytest

from conftest import RECIPES, write_recipe
from qcompile.compiler import compile_model
from qcompile.html_report import render_html
from qcompile.report import REPORT_SCHEMA, SCHEMA_VERSION, render_markdown, validate_report
from test_sensitivity import PER_TENSOR, make_broken_model


@pytest.fixture(scope="module")
def broken_report(tmp_path_factory) -> tuple[dict, object]:
    """A report with every section: gate, evaluation, sensitivity, fallback, layers."""
    tmp = tmp_path_factory.mktemp("broken")
    model, calib, data = make_broken_model(tmp)
    recipe = write_recipe(tmp / "r.yaml", PER_TENSOR + "gate: {metric: top1, max_drop: 10.0}\n"
                                                      "fallback: {mode: auto, max_layers: 4, eval_samples: 32}\n")
    out = tmp / "out.onnx"
    report = compile_model(model, recipe, out, calib=calib, eval_data=data, html=True, markdown=True)
    return report, out


def test_json_round_trip_matches_the_schema(broken_report):
    report, out = broken_report
    loaded = json.loads(out.with_name("out.report.json").read_text())
    assert loaded == report
    assert loaded["schema_version"] == SCHEMA_VERSION == 2
    assert validate_report(loaded) == []
    # every documented top-level key is there, and nothing undocumented
    assert set(loaded) <= set(REPORT_SCHEMA["properties"])
    assert set(REPORT_SCHEMA["required"]) <= set(loaded)
    for section in ("gate", "sensitivity", "fallback", "layers", "evaluation"):
        assert isinstance(loaded[section], dict), section
    # the schema is itself JSON (publishable as a .json file)
    assert json.loads(json.dumps(REPORT_SCHEMA)) == REPORT_SCHEMA


def test_schema_catches_missing_keys_and_wrong_types(broken_report):
    report = copy.deepcopy(broken_report[0])
    del report["gate"]["checks"][0]["passed"]
    report["layers"]["activations"][0]["sqnr_db"] = [1.0]
    report["schema_version"] = 1
    problems = validate_report(report)
    assert "report.gate.checks[0]: missing key 'passed'" in problems
    assert any(p.startswith("report.layers.activations[0].sqnr_db: expected number or string") for p in problems)
    assert any(p.startswith("report.schema_version:") for p in problems)


def test_report_without_evaluation_is_valid(tmp_path, digits_model, digits_calib):
    report = compile_model(digits_model, RECIPES / "int8_sym.yaml", tmp_path / "d.onnx", calib=digits_calib)
    assert validate_report(json.loads((tmp_path / "d.report.json").read_text())) == []
    assert report["evaluation"] is None and report["gate"] is None and report["sensitivity"] is None
    # per-layer SQNR falls back to calibration samples
    layers = report["layers"]
    assert layers["samples"] == 8 and len(layers["activations"]) > 40
    assert all(w["per_channel"] for w in layers["weights"])


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids: list[str] = []
        self.images: list[dict] = []
        self.tables = 0
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.append(attrs["id"])
        if tag == "img":
            self.images.append(attrs)
        if tag == "table":
            self.tables += 1

    def handle_data(self, data):
        self.text.append(data)


def test_html_report_renders_every_section_with_embedded_plots(broken_report):
    report, out = broken_report
    page = out.with_name("out.report.html").read_text()
    assert page == render_html(report)  # the file is a pure rendering of the JSON
    parser = _Collector()
    parser.feed(page)
    parser.close()
    assert parser.ids == ["gate", "evaluation", "pipeline", "fallback", "sensitivity", "layers", "histograms",
                          "details"]
    alts = [img["alt"] for img in parser.images]
    assert alts == ["per-pass timing chart", "sensitivity ranking chart", "per-layer SQNR bar chart",
                    "activation histograms of the worst layers", "weight SQNR bar chart"]
    for img in parser.images:
        assert img["src"].startswith("data:image/png;base64,")
        assert base64.b64decode(img["src"].split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    text = "".join(parser.text)
    assert "gate PASSED" in text and "conv2" in text and "Moved 1 layer(s) to float" in text
    assert "http" not in page.replace("https://json-schema", "")  # nothing loaded from outside


def test_markdown_summary(broken_report):
    report, out = broken_report
    text = out.with_name("out.report.md").read_text()
    assert text == render_markdown(report)
    assert text.startswith("# qcompile report: `broken.onnx`")
    for heading in ("**Gate: PASSED**", "## Evaluation (128 samples)", "## Pipeline", "## Fallback",
                    "## Most sensitive layers (32 samples)", "## Worst quantized tensors (8 samples)"):
        assert heading in text, heading
    assert "| 1 | `conv2` | Conv |" in text
