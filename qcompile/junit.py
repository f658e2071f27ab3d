"""`--junit FILE`: the gate as JUnit XML, one <testcase> per gate check, so CI shows it as tests.

A failing check carries a <failure> whose message is the check's sentence (metric, float value,
quantized value, allowed drop). Without a gate there is one passing testcase, "compile". The
metric values are also <property> elements of the suite (GitLab, Jenkins and the GitHub test
reporters read this layout).
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from .report import write_text_atomic

__all__ = ["junit_xml", "write_junit"]


def _number(value) -> str:
    return str(value)


def junit_xml(report: dict) -> str:
    model = Path(report["model"]).name
    gate = report.get("gate") or {"passed": True, "checks": []}
    checks = gate["checks"]
    failures = sum(1 for c in checks if not c["passed"])
    suite = ET.Element("testsuite", name=f"qcompile gate: {model}", tests=str(max(len(checks), 1)),
                       failures=str(failures), errors="0", skipped="0", time=f"{report['seconds_total']:.3f}")
    props = ET.SubElement(suite, "properties")
    for key in ("model", "output", "recipe", "qcompile_version"):
        ET.SubElement(props, "property", name=key, value=str(report[key]))
    metrics = (report.get("evaluation") or {}).get("metrics", {})
    for name, value in metrics.items():
        ET.SubElement(props, "property", name=f"{name}.float", value=_number(value["float"]))
        ET.SubElement(props, "property", name=f"{name}.quantized", value=_number(value["quantized"]))
    fallback = report.get("fallback")
    if fallback and fallback.get("needed"):
        ET.SubElement(props, "property", name="fallback.layers", value=",".join(fallback["layers"]))
    if not checks:
        ET.SubElement(suite, "testcase", classname=f"qcompile.{model}", name="compile",
                      time=f"{report['seconds_total']:.3f}")
    for check in checks:
        bound = "max_drop" if check["bound"] == "max_drop" else check["bound"]
        case = ET.SubElement(suite, "testcase", classname=f"qcompile.gate.{model}",
                             name=f"{check['metric']} {bound} {check['limit']}", time="0")
        if not check["passed"]:
            failure = ET.SubElement(case, "failure", message=check["message"], type="GateFailure")
            failure.text = check["message"]
        out = ET.SubElement(case, "system-out")
        out.text = check["message"]
    ET.indent(suite)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suite, encoding="unicode") + "\n"


def write_junit(report: dict, path: str | Path) -> None:
    write_text_atomic(junit_xml(report), path)
