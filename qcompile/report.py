"""The compile report: a JSON document (versioned keys) and a short printed summary."""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from . import __version__

SCHEMA_VERSION = 1


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


def build_report(*, model: str, output: str, recipe: str, passes: list, notes: dict, opsets: dict,
                 evaluation: dict | None, seconds: float) -> dict:
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
        "seconds_total": round(seconds, 3),
    })


def write_json(report: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(report, handle, indent=2)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    lines.append(f"  total {report['seconds_total']:.1f}s")
    return "\n".join(lines)
