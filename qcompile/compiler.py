"""compile_model(): the whole flow behind the `qcompile` command, usable from Python.

import -> passes (recipe) -> export (atomic, validated) -> evaluate -> report.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Iterable

from .assess import Quality
from .data import DataSource, batch_size_for, load_dataset, model_inputs
from .errors import QCompileError
from .exporter import to_proto, write_model
from .importer import import_model
from .pipeline import DumpIR, PassContext, PassManager
from .recipe import Recipe, build_passes, load_recipe
from .registry import load_builtins_and_entry_points, load_plugin
from .report import build_report, write_json, write_views
from .sensitivity import VariantBuilder

# Per-axis QuantizeLinear/DequantizeLinear need opset 13; older models are converted on import.
QDQ_MIN_OPSET = 13

Progress = Callable[[Iterable, int, str], Iterable]


def default_output(model: Path) -> Path:
    return model.with_name(model.stem + ".int8.onnx")


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _pass_context(recipe_doc: Recipe, scheme, *, inputs: list, calib: str | Path | None, calib_count: int,
                  progress: Progress, jobs: int) -> PassContext:
    """The context of one pipeline run; scheme is the recipe's quantization block or a variant of it."""
    batch_size = batch_size_for(inputs, recipe_doc.calibration.batch_size)
    limit = recipe_doc.calibration.max_samples
    samples = min(calib_count, limit or calib_count)
    return PassContext(
        scheme=scheme,
        calibration=DataSource(str(calib), tuple(inputs), recipe_doc.preprocessing, batch_size, limit) if calib else None,
        calibration_batches=-(-samples // batch_size),
        jobs=jobs,
        memory_budget_mb=recipe_doc.calibration.memory_budget_mb,
        progress=progress,
    )


def compile_model(model: str | Path, recipe: str | Path, output: str | Path | None = None, *,
                  calib: str | Path | None = None, eval_data: str | Path | None = None,
                  report: str | Path | None = None, dump_ir: str | Path | None = None,
                  plugins: Iterable[str] = (), progress: Progress | None = None, jobs: int = 1,
                  verify: bool = False, metrics: Iterable[str] | None = None, gate: Iterable = (),
                  sensitivity: bool = False, html: str | Path | bool = False,
                  markdown: str | Path | bool = False) -> dict:
    """Quantize `model` as `recipe` says and write it to `output`; returns the report dict.

    metrics: metric names to evaluate (default: the recipe's, else the built-ins that apply);
    gate: extra recipe.GateCheck objects (qcompile.gate.checks_from_cli); sensitivity: rank the
    layers; html / markdown: True (beside the report) or a path. A failing gate is in
    report["gate"]["passed"]; the model and the report are written either way."""
    start = time.perf_counter()
    model, recipe = Path(model), Path(recipe)
    output = Path(output) if output else default_output(model)
    if model.exists() and _same_file(model, output):
        raise QCompileError(f"{output}: refusing to overwrite the input model; choose another -o path")
    for plugin in plugins:
        load_plugin(plugin)
    load_builtins_and_entry_points()
    recipe_doc = load_recipe(recipe)
    passes = build_passes(recipe_doc, str(recipe))
    progress = progress or (lambda it, total, desc: it)

    graph = import_model(model, min_opset=QDQ_MIN_OPSET)
    inputs = model_inputs(graph)
    calib_set = load_dataset(calib, inputs, recipe_doc.preprocessing) if calib else None
    eval_set = load_dataset(eval_data, inputs, recipe_doc.preprocessing) if eval_data else None
    quality = Quality(recipe_doc, str(recipe), graph, eval_set, calib_set, metrics=metrics, gate=gate,
                      sensitivity=sensitivity)  # refuses what the data cannot measure, before any pass runs

    batch_size = batch_size_for(inputs, recipe_doc.calibration.batch_size)
    context = dict(inputs=inputs, calib=calib, calib_count=len(calib_set) if calib_set else 0, jobs=jobs)
    ctx = _pass_context(recipe_doc, recipe_doc.quantization, progress=progress, **context)
    builder = VariantBuilder(passes, recipe_doc.quantization, lambda: import_model(model, min_opset=QDQ_MIN_OPSET),
                             lambda scheme: _pass_context(recipe_doc, scheme, progress=lambda it, n, d: it, **context))
    instruments = [quality.attach(builder, ctx)]  # reruns (sensitivity, fallback) reuse its calibration
    if dump_ir:
        dumper = DumpIR(dump_ir)
        dumper.before(graph)
        instruments.append(dumper)
    manager = PassManager(passes, instruments)
    manager.run(graph, ctx)

    external = True if graph.model_props.get("external_data") else None
    write_model(to_proto(graph), output, external_data=external)
    # metrics, gate, sensitivity, fallback (may write a better model in place), per-layer SQNR
    outcome = quality.assess(model, output, ctx.notes, batch_size,
                             lambda proto: write_model(proto, output, external_data=external), progress)

    verification = None
    if verify:  # integer reference executor vs onnxruntime (and vs the float model) on the output
        from .verify import verify as verify_model

        data = eval_data or calib
        if data is None:
            raise QCompileError("--verify needs --eval or --calib data to run the models on")
        verification = verify_model(output, data, float_model=model, preprocessing=recipe_doc.preprocessing)

    result = build_report(model=str(model), output=str(output), recipe=str(recipe), passes=manager.records,
                          notes=outcome.notes, opsets={"source": graph.model_props.get("source_opset"),
                                                       "output": graph.opset("")},
                          evaluation=outcome.evaluation, seconds=time.perf_counter() - start, **outcome.sections)
    if verification is not None:
        result["verification"] = verification.as_dict()
    report_path = Path(report) if report else output.with_name(output.stem + ".report.json")
    write_json(result, report_path)
    write_views(result, report_path, html=html, markdown=markdown)
    return result
