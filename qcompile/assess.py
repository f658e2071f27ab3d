"""What compile_model does after the pipeline: evaluate, gate, sensitivity, fallback, per-layer SQNR.

Quality is built before any pass runs, so a gate or a metric that the data cannot measure (top1
without labels, a gate without --eval) is a usage error with nothing written. Quality.assess()
runs after the model is written and returns the report sections; when `fallback: auto` finds a
model that passes the gate (or one closer to passing), it writes that model in place of the first.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx

from .data import Dataset
from .errors import QCompileError
from .evaluate import evaluate, run_outputs, subset, subset_indices
from .gate import GateVerdict, evaluate_gate, merge_checks, resolve_auto, validate_checks
from .ir import Graph
from .metrics import Reference, resolve_metrics
from .recipe import GateCheck, Recipe
from .sensitivity import Attempt, Build, Ranking, Recorder, VariantBuilder, rank_layers, search_fallback

__all__ = ["Outcome", "Quality"]
logger = logging.getLogger(__name__)


@dataclass
class Outcome:
    """Report sections, and the notes of the model finally written (the fallback's, if it won)."""

    evaluation: dict | None
    notes: dict
    sections: dict = field(default_factory=dict)  # gate, sensitivity, fallback, layers
    verdict: GateVerdict | None = None


def _margin(verdict: GateVerdict) -> float:
    """The tightest check's slack in its own unit: >= 0 when every check passes."""
    slack = []
    for c in verdict.checks:
        if c.bound == "max_drop":
            slack.append(c.limit - c.drop if c.drop is not None else -math.inf)
        elif c.bound == "min":
            slack.append(c.quantized_value - c.limit)
        else:
            slack.append(c.limit - c.quantized_value)
    return min(slack, default=0.0)


class Quality:
    """Metrics, gate, sensitivity and fallback for one compile_model call."""

    def __init__(self, recipe: Recipe, source: str, graph: Graph, eval_set: Dataset | None,
                 calib_set: Dataset | None, *, metrics: Sequence[str] | None = None,
                 gate: Sequence[GateCheck] = (), sensitivity: bool = False):
        self.recipe = recipe
        self.eval_set = eval_set
        self.calib_set = calib_set
        self.names = [v.name for v in graph.outputs]
        has_labels = eval_set is not None and eval_set.labels is not None
        self.checks = merge_checks(resolve_auto(recipe.gate, has_labels),
                                   resolve_auto(validate_checks(gate), has_labels))
        self.sensitivity = sensitivity or recipe.sensitivity.enabled
        self.fallback = recipe.fallback.mode == "auto"
        self.builder: VariantBuilder | None = None
        self.first: Recorder | None = None  # the first run's instrument: layers, weight SQNR, shared tensors
        self._first_metrics: dict[str, float] = {}
        self._final_weights: list[dict] = []
        wants = [w for w, on in (("a gate (recipe 'gate:' or --max-drop/--min/--max)", self.checks),
                                 ("--metrics", metrics), ("sensitivity", self.sensitivity),
                                 ("fallback: auto", self.fallback)) if on]
        if eval_set is None:
            if wants:
                raise QCompileError(f"{source}: {wants[0]} needs evaluation data; pass --eval DATA")
            self.metric_names: list[str] = []
            return
        if self.fallback and not self.checks:
            raise QCompileError(f"{source}: fallback: auto needs a gate to reach; add 'gate: {{metric: top1, "
                                "max_drop: 1.0}' to the recipe or pass --max-drop")
        shapes = [v.shape for v in graph.outputs]
        requested = list(metrics) if metrics else list(recipe.evaluation.metrics)
        label = "--metrics" if metrics else f"{source}: evaluation.metrics"
        self.metric_names = resolve_metrics(requested, [c.metric for c in self.checks], shapes, has_labels, label)

    # -- wiring ----------------------------------------------------------------------------------
    def attach(self, builder: VariantBuilder, ctx) -> Recorder:
        """The instrument for the first pipeline run (it fills the builder's calibration cache)."""
        self.builder = builder
        self.first = builder.recorder(ctx)
        return self.first

    def _ranking_metric(self) -> str | None:
        if self.checks:
            return self.checks[0].metric
        return next((n for n in ("top1", "agreement") if n in self.metric_names), None)

    # -- after the model is written --------------------------------------------------------------
    def assess(self, model: Path, output: Path, notes: dict, batch_size: int,
               write: Callable[[onnx.ModelProto], None], progress=lambda it, total, desc: it) -> Outcome:
        """Evaluate the written model; gate, rank, fall back as the recipe says (write() replaces the
        model on disk); per-layer SQNR of the final model."""
        outcome = Outcome(None, notes)
        layer_data = self.eval_set if self.eval_set is not None else self.calib_set
        weights = self.first.weights if self.first else []
        if self.eval_set is not None:
            batches = lambda it, total, desc: progress(it, -(-total // batch_size), desc)  # noqa: E731
            float_out = run_outputs(str(model), self.eval_set, batch_size, batches, "float model")
            quant_out = run_outputs(str(output), self.eval_set, batch_size, batches, "quantized model")
            ref = Reference(tuple(self.names), float_out, self.eval_set.labels)
            outcome.evaluation, values = evaluate(float_out, quant_out, self.names, self.eval_set.labels,
                                                  self.metric_names)
            self._first_metrics = {n: v.quantized_value for n, v in values.items()}
            if self.checks:
                outcome.verdict = evaluate_gate(self.checks, values)
            ranking = None
            needs_fallback = self.fallback and not outcome.verdict.passed
            if self.sensitivity or needs_fallback:
                settings = self.recipe.fallback if needs_fallback else self.recipe.sensitivity
                ranking = self._rank(ref, quant_out, batch_size, settings.eval_samples, settings.methods, progress)
                outcome.sections["sensitivity"] = ranking.as_dict()
            if self.fallback:
                fallback = self._fallback(outcome, ranking, float_out, batch_size, write)
                outcome.sections["fallback"] = fallback
                if fallback["replaced"]:
                    weights = self._final_weights
            if outcome.verdict is not None:
                outcome.sections["gate"] = outcome.verdict.as_dict()
        samples = self.recipe.evaluation.layer_samples
        if layer_data is not None and samples > 0:
            from .layerwise import layer_report

            outcome.sections["layers"] = layer_report(model, onnx.load(str(output)), subset(layer_data, samples),
                                                      batch_size, weights)
        return outcome

    def _rank(self, ref: Reference, quant_out: list[np.ndarray], batch_size: int, samples: int,
              methods: Sequence[str], progress) -> Ranking:
        self.builder.probe(self.first.shared)
        indices = subset_indices(len(self.eval_set), samples)
        data = subset(self.eval_set, samples)
        sub_quant = [o[indices] for o in quant_out]
        return rank_layers(self.builder, self.first.layers, data, ref.subset(indices), sub_quant, batch_size,
                           metric_name=self._ranking_metric(), methods=methods, progress=progress)

    def _fallback(self, outcome: Outcome, ranking: Ranking | None, float_out: list[np.ndarray], batch_size: int,
                  write: Callable[[onnx.ModelProto], None]) -> dict:
        """Float the best-ranked layers until the gate passes; writes the chosen model."""
        start = time.perf_counter()
        first = outcome.verdict
        report = {"mode": "auto", "needed": not first.passed, "passed": first.passed, "replaced": False,
                  "layers": [], "nodes": [], "attempts": [],
                  "first": self._first_metrics, "first_margin": _margin(first),
                  "evaluations": {"full": 1, "subset": ranking.evaluations if ranking else 0},
                  "calibration_cache": len(self.builder.cache), "seconds": 0.0}
        if first.passed:
            return report

        def evaluate_build(build: Build) -> Attempt:
            t0 = time.perf_counter()
            quant_out = run_outputs(build.proto, self.eval_set, batch_size)
            evaluation, values = evaluate(float_out, quant_out, self.names, self.eval_set.labels, self.metric_names)
            verdict = evaluate_gate(self.checks, values)
            return Attempt(0, verdict.passed, _margin(verdict), {n: v.quantized_value for n, v in values.items()},
                           time.perf_counter() - t0, outcome=(evaluation, verdict))

        result = search_fallback(self.builder, [s.layer for s in ranking.layers], evaluate_build,
                                 self.recipe.fallback.max_layers, lambda text: logger.info("%s", text))
        report["attempts"] = [a.as_dict() for a in result.attempts]
        report["evaluations"]["full"] += len(result.attempts)
        chosen = result.chosen
        if chosen is not None and (chosen.passed or chosen.margin > _margin(first)):
            write(chosen.build.proto)
            outcome.evaluation, outcome.verdict = chosen.outcome
            outcome.notes = chosen.build.notes
            self._final_weights = chosen.build.weights
            report.update(replaced=True, passed=chosen.passed, layers=[layer.name for layer in result.layers],
                          nodes=[n for layer in result.layers for n in layer.nodes])
        report["seconds"] = round(time.perf_counter() - start + (ranking.seconds if ranking else 0.0), 3)
        return report
