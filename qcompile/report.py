"""The compile report: a JSON document with a versioned schema, a printed summary, and the
Markdown / HTML views rendered from it.

Every key is documented in REPORT_SCHEMA (a JSON Schema, draft 2020-12; README "Report" lists the
keys). schema_version changes when a key is renamed, removed or changes meaning; new optional
keys do not change it. JSON has no infinity: +inf / -inf / nan numbers (SQNR of identical tensors)
are written as the strings "inf" / "-inf" / "nan".

History: 1 — first version; 2 — evaluation.metrics (named metrics in their own unit), gate,
sensitivity, fallback, layers; evaluation.outputs[].cosine.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from . import __version__

SCHEMA_VERSION = 2

# -- schema ----------------------------------------------------------------------------------------

_NUM = {"type": ["number", "string"], "description": "a number; +-inf and nan as the strings 'inf', '-inf', 'nan'"}
_NUM_OR_NULL = {"type": ["number", "string", "null"]}
_STR = {"type": "string"}
_BOOL = {"type": "boolean"}
_INT = {"type": "integer"}


def _object(properties: dict, optional: tuple[str, ...] = (), nullable: bool = False) -> dict:
    return {"type": ["object", "null"] if nullable else "object", "properties": properties,
            "required": [k for k in properties if k not in optional]}


def _array(items: dict) -> dict:
    return {"type": "array", "items": items}


_METRIC_VALUE = _object({"unit": _STR, "higher_is_better": _BOOL, "float": _NUM, "quantized": _NUM,
                         "drop": _NUM_OR_NULL})
_VARIANT = _object({"sqnr_db": _NUM, "metric": _NUM_OR_NULL}, nullable=True)
_HISTOGRAM = _object({"edges": _array({"type": "number"}), "counts": _array(_INT)}, nullable=True)

REPORT_SCHEMA: dict = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": f"qcompile compile report, schema_version {SCHEMA_VERSION}",
    **_object({
        "schema_version": {"type": "integer", "enum": [SCHEMA_VERSION]},
        "qcompile_version": _STR,
        "model": _STR,
        "output": _STR,
        "recipe": _STR,
        "opset": _object({"source": {"type": ["integer", "null"]}, "output": _INT}),
        "passes": _array(_object({"name": _STR, "seconds": {"type": "number"}, "modified": _BOOL,
                                  "stats": {"type": "object"}})),
        "float_nodes": _array(_object({"node": _STR, "op": _STR, "reason": _STR})),
        "ranges": _array(_object({"tensor": _STR, "kind": {"type": "string", "enum": ["weight", "activation"]},
                                  "bits": _INT, "signed": _BOOL, "symmetric": _BOOL,
                                  "axis": {"type": ["integer", "null"]}, "calibrator": _STR,
                                  "scale": {"type": ["number", "object"]},
                                  "zero_point": {"type": ["number", "object"]}, "range": _array({})})),
        "notes": {"type": "object"},
        "evaluation": _object({
            "samples": _INT,
            "float": {"type": "object", "description": "schema-1 fractions: top1, top5"},
            "quantized": {"type": "object", "description": "schema-1 fractions: top1, top5, agreement_top1"},
            "outputs": _array(_object({"name": _STR, "sqnr_db": _NUM, "max_abs_diff": _NUM, "cosine": _NUM})),
            "metrics": {"type": "object", "additionalProperties": _METRIC_VALUE},
        }, nullable=True),
        "gate": _object({
            "passed": _BOOL,
            "checks": _array(_object({"metric": _STR, "unit": _STR, "float": _NUM, "quantized": _NUM,
                                      "bound": {"type": "string", "enum": ["max_drop", "min", "max"]},
                                      "limit": _NUM, "relative": _BOOL, "drop": _NUM_OR_NULL, "passed": _BOOL,
                                      "message": _STR})),
        }, nullable=True),
        "sensitivity": _object({
            "samples": _INT, "metric": {"type": ["string", "null"]}, "methods": _array(_STR),
            "baseline": _VARIANT, "evaluations": _INT, "seconds": {"type": "number"},
            "layers": _array(_object({"rank": _INT, "name": _STR, "op": _STR, "nodes": _array(_STR),
                                      "quantize_one": _VARIANT, "drop_one": _VARIANT, "score": _NUM,
                                      "noise_share": _NUM})),
        }, nullable=True),
        "fallback": _object({
            "mode": _STR, "needed": _BOOL, "passed": _BOOL, "replaced": _BOOL, "layers": _array(_STR),
            "nodes": _array(_STR),
            "first": {"type": "object", "description": "the first (fully quantized) model's metrics"},
            "first_margin": _NUM,
            "attempts": _array(_object({"layers": _INT, "passed": _BOOL, "margin": _NUM,
                                        "metrics": {"type": "object"}, "seconds": {"type": "number"}})),
            "evaluations": _object({"full": _INT, "subset": _INT}), "calibration_cache": _INT,
            "seconds": {"type": "number"},
        }, nullable=True),
        "layers": _object({
            "samples": _INT,
            "activations": _array(_object({"tensor": _STR, "node": _STR, "op": _STR, "sqnr_db": _NUM,
                                           "local_sqnr_db": _NUM, "clip": _array(_NUM), "observed": _array(_NUM),
                                           "clipped": {"type": "number"}, "histogram": _HISTOGRAM})),
            "weights": _array(_object({"tensor": _STR, "node": _STR, "op": _STR, "sqnr_db": _NUM,
                                       "per_channel": _BOOL})),
            "skipped": _array(_STR),
        }, nullable=True),
        "seconds_total": {"type": "number"},
        "verification": {"type": "object", "description": "written by --verify (see qcompile.verify)"},
    }, optional=("verification",)),
}

_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def _type_ok(value: Any, name: str) -> bool:
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, _TYPES[name])


def validate_report(report: Any, schema: dict = REPORT_SCHEMA, where: str = "report") -> list[str]:
    """Problems of `report` against the schema (type, enum, required, properties, items,
    additionalProperties: the subset of JSON Schema that REPORT_SCHEMA uses); [] when valid."""
    problems: list[str] = []
    types = schema.get("type")
    if types is not None:
        names = [types] if isinstance(types, str) else types
        if not any(_type_ok(report, n) for n in names):
            return [f"{where}: expected {' or '.join(names)}, got {type(report).__name__}"]
    if "enum" in schema and report not in schema["enum"]:
        problems.append(f"{where}: {report!r} is not one of {schema['enum']}")
    if isinstance(report, dict):
        for key in schema.get("required", []):
            if key not in report:
                problems.append(f"{where}: missing key '{key}'")
        for key, sub in schema.get("properties", {}).items():
            if key in report:
                problems += validate_report(report[key], sub, f"{where}.{key}")
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key, value in report.items():
                if key not in schema.get("properties", {}):
                    problems += validate_report(value, extra, f"{where}.{key}")
    if isinstance(report, list) and "items" in schema:
        for index, item in enumerate(report):
            problems += validate_report(item, schema["items"], f"{where}[{index}]")
    return problems


# -- building and writing --------------------------------------------------------------------------

def _clean(obj: Any) -> Any:
    """JSON-safe: inf/nan become strings, numpy scalars become Python numbers."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj


def number(value: Any) -> float:
    """A report number back as float ('inf' strings included)."""
    return float(value) if value is not None else math.nan


def build_report(*, model: str, output: str, recipe: str, passes: list, notes: dict, opsets: dict,
                 evaluation: dict | None, seconds: float, gate: dict | None = None, sensitivity: dict | None = None,
                 fallback: dict | None = None, layers: dict | None = None) -> dict:
    return _clean({
        "schema_version": SCHEMA_VERSION,
        "qcompile_version": __version__,
        "model": model,
        "output": output,
        "recipe": recipe,
        "opset": opsets,
        "passes": [{"name": p.name, "seconds": round(p.seconds, 4), "modified": p.modified, "stats": p.stats}
                   for p in passes],
        "float_nodes": notes.get("float_nodes", []),
        "ranges": notes.get("ranges", []),
        "notes": {k: v for k, v in notes.items() if k not in ("float_nodes", "ranges")},
        "evaluation": evaluation,
        "gate": gate,
        "sensitivity": sensitivity,
        "fallback": fallback,
        "layers": layers,
        "seconds_total": round(seconds, 3),
    })


def write_text_atomic(text: str, path: str | Path) -> None:
    """Write via a temporary file beside the target and a rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(report: dict, path: str | Path) -> None:
    write_text_atomic(json.dumps(report, indent=2) + "\n", path)


def view_path(report_path: Path, choice: str | Path | bool, suffix: str) -> Path | None:
    """Where a view goes: None (not written), beside the report (True), or the given path."""
    if choice is False or choice is None:
        return None
    if choice is True:
        name = report_path.name[:-len(".json")] if report_path.name.endswith(".json") else report_path.name
        return report_path.with_name(name + suffix)
    return Path(choice)


def write_views(report: dict, report_path: str | Path, *, html: str | Path | bool = False,
                markdown: str | Path | bool = False) -> None:
    """The HTML and Markdown renderings of `report` (True: beside the JSON, .html / .md)."""
    report_path = Path(report_path)
    markdown_path = view_path(report_path, markdown, ".md")
    if markdown_path is not None:
        write_text_atomic(render_markdown(report), markdown_path)
    html_path = view_path(report_path, html, ".html")
    if html_path is not None:
        from .html_report import render_html

        write_text_atomic(render_html(report), html_path)


# -- text views ------------------------------------------------------------------------------------

def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    return f"{value:.{digits}f}"


def metric_text(value: Any, unit: str) -> str:
    """A metric value in its unit: 2 decimals for % and dB, 4 significant digits otherwise."""
    if value is None:
        return "—"
    if isinstance(value, str):  # 'inf'
        return ("∞" if value == "inf" else value) + _unit(unit)
    return (f"{value:.2f}" if unit in ("%", "dB") else f"{value:.4g}") + _unit(unit)


def drop_text(value: Any, unit: str) -> str:
    """A drop in the metric's unit; percentages drop by points."""
    if value is None:
        return "—"
    return f"{value:.2f} points" if unit == "%" else metric_text(value, unit)


def _unit(unit: str) -> str:
    return "%" if unit == "%" else f" {unit}" if unit else ""


def summary(report: dict) -> str:
    lines = [f"qcompile {report['qcompile_version']}: {report['model']} -> {report['output']}"]
    timing = ", ".join(f"{p['name']} {p['seconds']:.2f}s" for p in report["passes"])
    lines.append(f"  passes: {timing}")
    floats = report["float_nodes"]
    if floats:
        by_op: dict[str, int] = {}
        for item in floats:
            by_op[item["op"]] = by_op.get(item["op"], 0) + 1
        lines.append("  kept float: " + ", ".join(f"{op} x{n}" for op, n in sorted(by_op.items())))
    evaluation = report.get("evaluation")
    if evaluation:
        f, q = evaluation["float"], evaluation["quantized"]
        parts = [f"{evaluation['samples']} samples"]
        if "top1" in f:
            parts.append(f"top-1 float {100 * f['top1']:.2f}% -> quantized {100 * q['top1']:.2f}% "
                         f"({100 * (q['top1'] - f['top1']):+.2f} points)")
        if "agreement_top1" in q:
            parts.append(f"agreement with float {100 * q['agreement_top1']:.2f}%")
        for out in evaluation["outputs"]:
            sqnr = out["sqnr_db"]
            parts.append(f"{out['name']} SQNR {sqnr if isinstance(sqnr, str) else f'{sqnr:.1f}'} dB")
        lines.append("  eval: " + "; ".join(parts))
        shown = {"top1", "agreement", "sqnr"}
        others = [f"{name} {metric_text(m['quantized'], m['unit'])}"
                  for name, m in evaluation.get("metrics", {}).items() if name not in shown]
        if others:
            lines.append("  metrics (quantized): " + ", ".join(others))
    sensitivity = report.get("sensitivity")
    if sensitivity:
        top = ", ".join(f"{s['name']} ({100 * s['noise_share']:.0f}%)" for s in sensitivity["layers"][:3])
        lines.append(f"  sensitivity ({sensitivity['samples']} samples, {sensitivity['evaluations']} variants): "
                     f"most damaging {top or 'none'}")
    fallback = report.get("fallback")
    if fallback and fallback["needed"]:
        moved = ", ".join(fallback["layers"]) or "nothing"
        lines.append(f"  fallback: moved {len(fallback['layers'])} layer(s) to float ({moved}); "
                     f"{fallback['evaluations']['full']} full + {fallback['evaluations']['subset']} subset "
                     f"evaluations, {fallback['seconds']:.1f}s")
    gate = report.get("gate")
    if gate:
        for check in gate["checks"]:
            lines.append(f"  gate: {'PASS' if check['passed'] else 'FAIL'} {check['message']}")
    lines.append(f"  total {report['seconds_total']:.1f}s")
    return "\n".join(lines)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|")

    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return out + [""]


def render_markdown(report: dict, rows: int = 10) -> str:
    """A short Markdown summary (e.g. for a CI job summary): verdict, metrics, pipeline, fallback,
    most sensitive and worst layers."""
    out = [f"# qcompile report: `{Path(report['model']).name}`", "",
           f"`{report['model']}` → `{report['output']}` with recipe `{report['recipe']}` "
           f"(qcompile {report['qcompile_version']}, {report['seconds_total']:.1f} s)", ""]
    gate = report.get("gate")
    if gate:
        out += [f"**Gate: {'PASSED' if gate['passed'] else 'FAILED'}**", ""]
        out += [f"- {'✅' if c['passed'] else '❌'} {c['message']}" for c in gate["checks"]] + [""]
    else:
        out += ["Gate: none declared", ""]
    evaluation = report.get("evaluation")
    if evaluation and evaluation.get("metrics"):
        out += [f"## Evaluation ({evaluation['samples']} samples)", ""]
        out += _table(["metric", "float", "quantized", "drop"],
                      [[name, metric_text(m["float"], m["unit"]), metric_text(m["quantized"], m["unit"]),
                        drop_text(m["drop"], m["unit"])]
                       for name, m in evaluation["metrics"].items()])
    out += ["## Pipeline", ""]
    out += _table(["pass", "seconds", "modified", "stats"],
                  [[p["name"], f"{p['seconds']:.3f}", "yes" if p["modified"] else "no",
                    ", ".join(f"{k}={v}" for k, v in p["stats"].items())] for p in report["passes"]])
    fallback = report.get("fallback")
    if fallback and fallback["needed"]:
        first = fallback.get("first", {})
        change = "; ".join(f"{c['metric']} {metric_text(first[c['metric']], c['unit'])} → "
                           f"{metric_text(c['quantized'], c['unit'])}"
                           for c in (gate or {"checks": []})["checks"] if c["metric"] in first)
        out += ["## Fallback", "",
                f"Moved {len(fallback['layers'])} layer(s) to float ({change or 'gate metrics unchanged'}): "
                + (", ".join(f"`{n}`" for n in fallback["layers"]) or "none")
                + f"; {fallback['evaluations']['full']} full and {fallback['evaluations']['subset']} subset "
                  f"evaluations, {fallback['seconds']:.1f} s; gate "
                  f"{'passed' if fallback['passed'] else 'still fails'}.", ""]
    sensitivity = report.get("sensitivity")
    if sensitivity and sensitivity["layers"]:
        out += [f"## Most sensitive layers ({sensitivity['samples']} samples)", ""]
        methods = [m for m in ("quantize_one", "drop_one") if m in sensitivity["methods"]]
        out += _table(["rank", "layer", "op", "noise share"] + [f"{m.replace('_', '-')} SQNR dB" for m in methods],
                      [[str(s["rank"]), f"`{s['name']}`", s["op"], f"{100 * number(s['noise_share']):.1f}%"]
                       + [_fmt((s[m] or {}).get("sqnr_db"), 1) for m in methods]
                       for s in sensitivity["layers"][:rows]])
    layers = report.get("layers")
    if layers and layers["activations"]:
        worst = sorted(layers["activations"], key=lambda r: number(r["local_sqnr_db"]))[:rows]
        out += [f"## Worst quantized tensors ({layers['samples']} samples)", ""]
        out += _table(["tensor", "op", "local SQNR dB", "SQNR dB", "clipped"],
                      [[f"`{r['tensor']}`", r["op"], _fmt(r["local_sqnr_db"], 1), _fmt(r["sqnr_db"], 1),
                        f"{100 * r['clipped']:.3f}%"] for r in worst])
    return "\n".join(out)
