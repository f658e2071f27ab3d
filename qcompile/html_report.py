"""The report as one self-contained HTML file (plots are base64 PNG made with matplotlib's Agg canvas).

render_html(report) is a pure function of the report JSON, so a saved report can be rendered
again: ``python -m qcompile.html_report out/model.report.json -o report.html``.

Sections: verdict, gate checks, evaluation metrics, pipeline with per-pass timing, fallback,
sensitivity ranking, per-layer SQNR chart, histograms of the worst tensors with their clip range,
weights, float nodes, ranges.
"""
from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any, Sequence

from .report import drop_text, metric_text, number

__all__ = ["render_html"]

_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, Segoe UI, Roboto, sans-serif; color: #1f2328; margin: 0;
       background: #f6f8fa; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 48px; background: #fff; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 18px; margin: 28px 0 8px; padding-top: 8px;
border-top: 1px solid #d0d7de; } h3 { font-size: 15px; margin: 16px 0 6px; }
.meta { color: #57606a; margin: 0 0 12px; word-break: break-all; }
.badge { display: inline-block; padding: 4px 12px; border-radius: 14px; font-weight: 600; color: #fff; }
.pass { background: #1a7f37; } .fail { background: #cf222e; } .none { background: #6e7781; }
table { border-collapse: collapse; margin: 6px 0 10px; font-size: 13px; }
th, td { border: 1px solid #d0d7de; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f6f8fa; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.name { max-width: 520px; overflow-wrap: anywhere; }
tr.bad td { background: #ffebe9; } tr.good td { background: #dafbe1; }
img { max-width: 100%; height: auto; display: block; margin: 6px 0; }
nav a { margin-right: 12px; } details { margin: 8px 0; } summary { cursor: pointer; color: #0969da; }
code { font-size: 12px; background: #f6f8fa; padding: 0 3px; border-radius: 3px; }
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _num(value: Any, digits: int = 2) -> str:
    if value is None:
        return "—"
    value = number(value)
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "∞" if value > 0 else "−∞"
    return f"{value:.{digits}f}"


def _short(name: str, width: int = 48) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]


def _unit(unit: str) -> str:
    return "%" if unit == "%" else f" {unit}" if unit else ""


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], classes: Sequence[str] = (),
           numeric: Sequence[int] = ()) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = []
    for index, row in enumerate(rows):
        css = f' class="{classes[index]}"' if index < len(classes) and classes[index] else ""
        cells = "".join(f'<td class="{"num" if i in numeric else "name"}">{c}</td>' for i, c in enumerate(row))
        body.append(f"<tr{css}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


# -- plots -------------------------------------------------------------------------------------------

def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _png(fig, alt: str) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")  # margins are set by hand: bbox_inches="tight" draws everything twice
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _label_margin(fig, labels: Sequence[str], fontsize: float, right: float = 0.3) -> None:
    """Room on the left for the longest y tick label (≈ 0.6 em per character), and small margins."""
    width = fig.get_figwidth()
    label_inches = max((len(t) for t in labels), default=0) * fontsize * 0.6 / 72 + 0.35
    height = fig.get_figheight()
    fig.subplots_adjust(left=min(0.6, label_inches / width), right=1 - right / width, top=1 - 0.45 / height,
                        bottom=0.55 / height)


def _finite(values: list[float], cap: float) -> list[float]:
    return [cap if v == math.inf else (0.0 if math.isnan(v) or v == -math.inf else min(v, cap)) for v in values]


def _plot_passes(passes: list[dict]) -> str:
    fig = _figure(9, 0.45 * len(passes) + 0.9)
    ax = fig.add_subplot()
    names = [p["name"] for p in passes][::-1]
    seconds = [p["seconds"] for p in passes][::-1]
    ax.barh(names, seconds, color="#0969da")
    for y, s in enumerate(seconds):
        ax.text(s, y, f" {s:.3f} s", va="center", fontsize=9)
    ax.set_xlabel("seconds")
    ax.set_xlim(0, max(seconds + [1e-3]) * 1.18)
    ax.set_title("Per-pass time")
    _label_margin(fig, names, 10)
    return _png(fig, "per-pass timing chart")


def _plot_layer_sqnr(rows: list[dict]) -> str:
    sqnr = [number(r["sqnr_db"]) for r in rows]
    local = [number(r["local_sqnr_db"]) for r in rows]
    finite = [v for v in sqnr + local if math.isfinite(v)]
    cap = (max(finite) if finite else 60.0) + 5
    fig = _figure(11, 0.17 * len(rows) + 2.0)
    ax = fig.add_subplot()
    ys = list(range(len(rows)))
    labels = [f"{_short(r['tensor'], 46)} ({r['op']})" for r in rows]
    ax.barh(ys, _finite(sqnr, cap), color="#54aeff", label="SQNR of the quantized model's tensor (end to end)")
    ax.scatter(_finite(local, cap), ys, color="#cf222e", s=12, zorder=3,
               label="local SQNR (this quantizer alone: clip + rounding)")
    ax.set_yticks(ys)
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlabel("SQNR (dB, higher is better)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, fontsize=8, frameon=False)
    ax.set_title("Per-layer SQNR against the float model, in graph order", pad=22)
    _label_margin(fig, labels, 7)
    fig.subplots_adjust(top=1 - 0.95 / fig.get_figheight())
    return _png(fig, "per-layer SQNR bar chart")


def _plot_weights(rows: list[dict]) -> str:
    values = [number(r["sqnr_db"]) for r in rows]
    finite = [v for v in values if math.isfinite(v)]
    cap = (max(finite) if finite else 60.0) + 5
    fig = _figure(11, 0.15 * len(rows) + 1.4)
    ax = fig.add_subplot()
    ys = list(range(len(rows)))
    labels = [f"{_short(r['node'] or r['tensor'], 46)} ({r['op']})" for r in rows]
    ax.barh(ys, _finite(values, cap), color="#8250df")
    ax.set_yticks(ys)
    ax.set_yticklabels(labels, fontsize=7)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlabel("weight SQNR (dB)")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title("Weight quantization SQNR per layer (weights alone)")
    _label_margin(fig, labels, 7)
    return _png(fig, "weight SQNR bar chart")


def _plot_histograms(rows: list[dict]) -> str:
    from matplotlib.ticker import NullLocator

    cols = 2
    lines = math.ceil(len(rows) / cols)
    fig = _figure(11, 2.8 * lines + 0.6)
    for index, row in enumerate(rows):
        ax = fig.add_subplot(lines, cols, index + 1)
        hist = row["histogram"]
        edges, counts = hist["edges"], hist["counts"]
        ax.stairs(counts, edges, fill=True, color="#54aeff")
        ax.stairs(counts, edges, color="#0969da", linewidth=0.6)
        ax.set_yscale("log")
        ax.yaxis.set_minor_locator(NullLocator())  # log minor ticks cost most of the drawing time
        ax.set_ylim(0.8, max(counts + [1]) * 2)
        lo, hi = (number(v) for v in row["clip"])
        for x in (lo, hi):
            ax.axvline(x, color="#cf222e", linestyle="--", linewidth=1.2)
        pad = 0.05 * (edges[-1] - edges[0])  # the clip lines often are the histogram's ends
        ax.axvspan(edges[0] - pad, lo, color="#cf222e", alpha=0.08)
        ax.axvspan(hi, edges[-1] + pad, color="#cf222e", alpha=0.08)
        ax.set_xlim(edges[0] - pad, edges[-1] + pad)
        ax.set_title(f"{_short(row['tensor'], 44)} ({row['op']})", fontsize=9)
        ax.text(0.99, 0.97, f"clip [{lo:.3g}, {hi:.3g}]\nlocal SQNR {_num(row['local_sqnr_db'], 1)} dB\n"
                            f"clipped {100 * row['clipped']:.3f}%",
                transform=ax.transAxes, ha="right", va="top", fontsize=8,
                bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "#d0d7de"})
        ax.tick_params(labelsize=8)
    fig.suptitle("Float activation histograms of the worst tensors (red: chosen clip range)", fontsize=11)
    fig.subplots_adjust(left=0.07, right=0.98, top=1 - 0.6 / fig.get_figheight(), bottom=0.35 / fig.get_figheight(),
                        hspace=0.45, wspace=0.15)
    return _png(fig, "activation histograms of the worst layers")


def _plot_sensitivity(layers: list[dict], count: int = 20) -> str:
    top = layers[:count]
    fig = _figure(11, 0.3 * len(top) + 1.4)
    ax = fig.add_subplot()
    ys = list(range(len(top)))
    shares = [100 * number(s["noise_share"]) for s in top]
    ax.barh(ys, shares, color="#bf3989")
    for y, v in zip(ys, shares):
        ax.text(v, y, f" {v:.1f}%", va="center", fontsize=8)
    labels = [f"{s['rank']}. {_short(s['name'], 44)} ({s['op']})" for s in top]
    ax.set_yticks(ys)
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_ylim(len(top) - 0.5, -0.5)
    ax.set_xlim(0, max(shares + [1.0]) * 1.15)
    ax.set_xlabel("estimated share of the output noise (%)")
    ax.set_title("Most damaging layers")
    _label_margin(fig, labels, 8)
    return _png(fig, "sensitivity ranking chart")


# -- sections ----------------------------------------------------------------------------------------

def _gate_section(report: dict) -> str:
    gate = report.get("gate")
    if not gate:
        return "<h2 id='gate'>Gate</h2><p>No gate declared (recipe <code>gate:</code> or <code>--max-drop</code>).</p>"
    rows = [[_e(c["metric"]), _num(c["float"]) + _e(_unit(c["unit"])), _num(c["quantized"]) + _e(_unit(c["unit"])),
             _num(c["drop"]), _e(f"{c['bound']} {_num(c['limit'])}" + (" (relative)" if c["relative"] else "")),
             "PASS" if c["passed"] else "FAIL"] for c in gate["checks"]]
    classes = ["good" if c["passed"] else "bad" for c in gate["checks"]]
    return ("<h2 id='gate'>Gate</h2>" + _table(["metric", "float", "quantized", "drop", "allowed", "result"], rows,
                                               classes, numeric=(1, 2, 3)))


def _evaluation_section(report: dict) -> str:
    evaluation = report.get("evaluation")
    if not evaluation:
        return "<h2 id='evaluation'>Evaluation</h2><p>No evaluation data (<code>--eval</code>).</p>"
    parts = [f"<h2 id='evaluation'>Evaluation</h2><p>{evaluation['samples']} samples.</p>"]
    metrics = evaluation.get("metrics", {})
    if metrics:
        rows = [[_e(name), _e(metric_text(m["float"], m["unit"])), _e(metric_text(m["quantized"], m["unit"])),
                 _e(drop_text(m["drop"], m["unit"])), "higher" if m["higher_is_better"] else "lower"]
                for name, m in metrics.items()]
        parts.append(_table(["metric", "float model", "quantized model", "drop", "better"], rows, numeric=(1, 2, 3)))
    rows = [[_e(o["name"]), _num(o["sqnr_db"]), _num(o.get("cosine"), 5), _num(o["max_abs_diff"], 4)]
            for o in evaluation["outputs"]]
    parts.append(_table(["output", "SQNR dB", "cosine", "max |diff|"], rows, numeric=(1, 2, 3)))
    return "".join(parts)


def _pipeline_section(report: dict) -> str:
    passes = report["passes"]
    rows = [[_e(p["name"]), f"{p['seconds']:.3f}", "yes" if p["modified"] else "no",
             _e(", ".join(f"{k}={v}" for k, v in p["stats"].items()))] for p in passes]
    plot = _plot_passes(passes) if passes else ""
    in_passes = sum(p["seconds"] for p in passes)
    rest = [name for name, key in (("evaluation", "evaluation"), ("sensitivity", "sensitivity"),
                                   ("fallback", "fallback"), ("per-layer SQNR", "layers")) if report.get(key)]
    where = f" (the rest: import, export, {', '.join(rest)})" if rest else " (the rest: import and export)"
    return ("<h2 id='pipeline'>Pipeline</h2><p>Passes in recipe order: "
            f"{in_passes:.2f} s of the {report['seconds_total']:.2f} s total{where}.</p>" +
            _table(["pass", "seconds", "modified", "stats"], rows, numeric=(1,)) + plot)


def _fallback_section(report: dict) -> str:
    fallback = report.get("fallback")
    if not fallback:
        return ""
    if not fallback["needed"]:
        return "<h2 id='fallback'>Fallback</h2><p><code>fallback: auto</code>: the gate passed; nothing changed.</p>"
    ev = fallback["evaluations"]
    gate = report.get("gate") or {"checks": []}
    first = fallback.get("first", {})
    change = "; ".join(f"{c['metric']} {_num(first.get(c['metric']))}{_e(_unit(c['unit']))} → "
                       f"{_num(c['quantized'])}{_e(_unit(c['unit']))}" for c in gate["checks"] if c["metric"] in first)
    text = (f"<p>Moved <b>{len(fallback['layers'])}</b> layer(s) to float "
            f"({', '.join(f'<code>{_e(n)}</code>' for n in fallback['layers']) or 'none'}): {change}; "
            f"{ev['full']} full evaluations (including the first model's) and {ev['subset']} subset evaluations "
            f"in {fallback['seconds']:.1f} s; the gate {'passes' if fallback['passed'] else 'still fails'}.</p>")

    def metrics(values: dict) -> str:
        return _e(", ".join(f"{k} {_num(v)}" for k, v in values.items()))

    rows = [["0 (first model)", "FAIL", _num(fallback.get("first_margin"), 3), metrics(first), "—"]]
    rows += [[str(a["layers"]), "PASS" if a["passed"] else "FAIL", _num(a["margin"], 3), metrics(a["metrics"]),
              f"{a['seconds']:.1f}"] for a in fallback["attempts"]]
    classes = ["bad"] + ["good" if a["passed"] else "bad" for a in fallback["attempts"]]
    return ("<h2 id='fallback'>Fallback</h2>" + text +
            _table(["layers float", "gate", "margin", "quantized metrics", "seconds"], rows, classes,
                   numeric=(0, 2, 4)))


def _sensitivity_section(report: dict) -> str:
    sens = report.get("sensitivity")
    if not sens:
        return ""
    metric = sens["metric"]
    methods = [m for m in ("quantize_one", "drop_one") if m in sens["methods"]]
    header = ["rank", "layer", "op", "noise share"] + [f"{m.replace('_', '-')} SQNR dB" for m in methods]
    if metric:
        header += [f"{m.replace('_', '-')} {metric}" for m in methods]
    rows = []
    for s in sens["layers"]:
        runs = [s[m] or {} for m in methods]
        row = [str(s["rank"]), _e(s["name"]), _e(s["op"]), f"{100 * number(s['noise_share']):.1f}%"]
        row += [_num(r.get("sqnr_db"), 1) for r in runs]
        if metric:
            row += [_num(r.get("metric")) for r in runs]
        rows.append(row)
    base = sens["baseline"]
    intro = (f"<p>{len(sens['layers'])} layers, {sens['evaluations']} variants on {sens['samples']} samples "
             f"({', '.join(sens['methods'])}), {sens['seconds']:.1f} s. Fully quantized model on these samples: "
             f"SQNR {_num(base['sqnr_db'], 1)} dB" + (f", {metric} {_num(base['metric'])}" if metric else "") + ".</p>")
    numeric = (0, *range(3, len(header)))
    table = _table(header, rows[:30], numeric=numeric)
    more = (f"<details><summary>all {len(rows)} layers</summary>{_table(header, rows[30:], numeric=numeric)}"
            "</details>") if len(rows) > 30 else ""
    return "<h2 id='sensitivity'>Sensitivity</h2>" + intro + _plot_sensitivity(sens["layers"]) + table + more


def _layers_section(report: dict) -> str:
    layers = report.get("layers")
    if not layers:
        return ""
    parts = [f"<h2 id='layers'>Per-layer SQNR</h2><p>Each quantized tensor's DequantizeLinear output against the "
             f"float model's tensor of the same name on {layers['samples']} samples. "
             "Bars: end to end (includes every upstream error); dots: this quantizer alone.</p>"]
    rows = layers["activations"]
    if rows:
        parts.append(_plot_layer_sqnr(rows))
    worst = [r for r in sorted(rows, key=lambda r: number(r["local_sqnr_db"])) if r.get("histogram")]
    if worst:
        parts.append("<h2 id='histograms'>Activation histograms of the worst tensors</h2>")
        parts.append(_plot_histograms(worst))
        parts.append(_table(["tensor", "op", "local SQNR dB", "SQNR dB", "clip range", "observed", "clipped"],
                            [[_e(r["tensor"]), _e(r["op"]), _num(r["local_sqnr_db"], 1), _num(r["sqnr_db"], 1),
                              f"[{_num(r['clip'][0], 4)}, {_num(r['clip'][1], 4)}]",
                              f"[{_num(r['observed'][0], 4)}, {_num(r['observed'][1], 4)}]",
                              f"{100 * r['clipped']:.3f}%"] for r in worst], numeric=(2, 3, 6)))
    if layers["weights"]:
        parts.append("<h3>Weights</h3>" + _plot_weights(layers["weights"]))
    if layers["skipped"]:
        parts.append(f"<p>{len(layers['skipped'])} quantized tensor(s) have no tensor of the same name in the float "
                     "model (renamed by a transform) and are not shown.</p>")
    return "".join(parts)


def _floats_section(report: dict) -> str:
    floats = report["float_nodes"]
    ranges = report["ranges"]
    parts = ["<h2 id='details'>Float nodes and ranges</h2>"]
    if floats:
        parts.append(f"<details{' open' if len(floats) <= 12 else ''}><summary>{len(floats)} node(s) kept float"
                     "</summary>" + _table(["node", "op", "reason"],
                                           [[_e(f["node"]), _e(f["op"]), _e(f["reason"])] for f in floats]) +
                     "</details>")
    else:
        parts.append("<p>Every node with a quantization rule is quantized.</p>")

    def span(value):
        return f"{_num(value['min'], 4)} … {_num(value['max'], 4)} ({value['channels']} ch)" \
            if isinstance(value, dict) else _num(value, 5)

    rows = [[_e(r["tensor"]), r["kind"], f"{r['bits']}{'s' if r['signed'] else 'u'}", _e(r["calibrator"]),
             span(r["scale"]), f"[{span(r['range'][0])}, {span(r['range'][1])}]"] for r in ranges]
    parts.append(f"<details><summary>{len(ranges)} calibrated range(s)</summary>" +
                 _table(["tensor", "kind", "bits", "calibrator", "scale", "range"], rows) + "</details>")
    return "".join(parts)


def render_html(report: dict) -> str:
    """The whole report as one HTML page (no external resources)."""
    gate = report.get("gate")
    verdict = ("<span class='badge none'>no gate</span>" if not gate else
               f"<span class='badge {'pass' if gate['passed'] else 'fail'}'>gate "
               f"{'PASSED' if gate['passed'] else 'FAILED'}</span>")
    headline = ""
    if gate:
        headline = "<ul>" + "".join(f"<li>{_e(c['message'])}</li>" for c in gate["checks"]) + "</ul>"
    sections = [_gate_section(report), _evaluation_section(report), _pipeline_section(report),
                _fallback_section(report), _sensitivity_section(report), _layers_section(report),
                _floats_section(report)]
    anchors = [("gate", "Gate"), ("evaluation", "Evaluation"), ("pipeline", "Pipeline"), ("fallback", "Fallback"),
               ("sensitivity", "Sensitivity"), ("layers", "Per-layer SQNR"), ("histograms", "Histograms"),
               ("details", "Details")]
    body = "".join(sections)
    nav = " ".join(f"<a href='#{a}'>{t}</a>" for a, t in anchors if f"id='{a}'" in body)
    title = f"qcompile report: {Path(report['model']).name}"
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{_e(title)}</title>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<style>{_CSS}</style></head><body><main>"
            f"<h1>{_e(title)}</h1><p class='meta'>{_e(report['model'])} → {_e(report['output'])}<br>recipe "
            f"{_e(report['recipe'])} · qcompile {_e(report['qcompile_version'])} · report schema "
            f"{report['schema_version']}</p>{verdict}{headline}<nav>{nav}</nav>{body}</main></body></html>\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qcompile.html_report",
                                     description="Render a qcompile report JSON as one HTML file.")
    parser.add_argument("report", help="report JSON written by qcompile")
    parser.add_argument("-o", "--output", help="HTML path (default: beside the JSON, .html)")
    args = parser.parse_args(argv)
    path = Path(args.report)
    out = Path(args.output) if args.output else path.with_suffix(".html")
    out.write_text(render_html(json.loads(path.read_text())), encoding="utf-8")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
