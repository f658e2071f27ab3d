"""Per-layer sensitivity and `fallback: auto`: which layers cost accuracy, and moving them to float.

Both re-run the recipe's own pipeline (the passes compile_model built, on a fresh import of the
model) with extra recipe overrides ``{match: <node name>, quantize: false}``, so a variant is
exactly what a user would get by writing those overrides:

- quantize one: every layer float except this one (``{match: ".*", quantize: false}`` then
  ``{match: <layer>, quantize: true}``);
- drop one: every layer quantized except this one.

A *layer* is a quantized node plus the Relu/Clip fused into its output (floating a Conv but not its
ReLU6 would add a new quantizer on the wider pre-clip tensor). Ops that only move codes (Reshape,
MaxPool, ...) are not layers.

Calibration statistics do not depend on which layers are quantized (they come from the float
model), so a CalibrationCache instrument stores every tensor's calibrated parameters after the
first run and puts them back before `calibrate` in later runs; `calibrate` then only observes
tensors it has not seen (e.g. a Conv output that stops being fused into its Clip).

Ranking (on `eval_samples` evenly spaced evaluation samples): each variant's output SQNR gives a
relative noise power n = 10^(−SQNR/10). Quantize-one measures a layer's own noise n_L; drop-one
measures what floating it saves, N_all − n_without_L. Under additive noise both estimate the same
share; a layer's score is their mean (or the one method run), and layers are ranked by it
(noise_share: score / the sum of all scores). The
gate's metric on the subset is reported beside it (it is too coarse on ~100 samples to rank by).

Fallback: float the k best-ranked layers, evaluated on the full evaluation data, for k = 1, 2, 4,
... (up to max_layers) until the gate passes, then bisect k between the last failing and the first
passing count: the fewest layers in O(log k) full evaluations.
"""
from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import onnx

from .data import Dataset
from .exporter import to_proto
from .ir import Graph
from .metrics import Reference, metric, sqnr_db
from .numerics import fake_quantize
from .op_rules import rule_for
from .pipeline import Pass, PassContext, PassManager, PassRecord, PassResult, Phase
from .recipe import Override, Quantization

__all__ = ["Build", "CalibrationCache", "Layer", "LayerScore", "Ranking", "Recorder", "VariantBuilder",
           "find_layers", "rank_layers", "search_fallback"]
logger = logging.getLogger(__name__)

Progress = Callable


@dataclass(frozen=True)
class Layer:
    """A quantized node and the activation nodes fused into it (names as in the annotated graph)."""

    name: str
    op: str
    nodes: tuple[str, ...]

    def float_overrides(self) -> list[Override]:
        return [Override(match=re.escape(n), quantize=False) for n in self.nodes]

    def as_dict(self) -> dict:
        return {"name": self.name, "op": self.op, "nodes": list(self.nodes)}


def find_layers(graph: Graph) -> list[Layer]:
    """The layers of an annotated graph, in graph order."""
    layers = []
    for node in graph.nodes:
        rule = rule_for(node)
        if not node.meta.get("quantized") or rule is None or rule.share_input_scale:
            continue
        if rule.fusable_activation and node.inputs and node.inputs[0] is not None \
                and node.inputs[0].meta.get("fused_into") == node.name:
            continue  # part of its producer's layer
        fused = tuple(out.meta["fused_into"] for out in node.outputs if out.meta.get("fused_into"))
        layers.append(Layer(node.name, node.op_type, (node.name, *fused)))
    return layers


def _options_key(spec) -> str:
    return repr(sorted(spec.calibrator_options.items()))


class CalibrationCache:
    """Calibrated QParams by tensor name, shared by every run of one model and recipe."""

    def __init__(self):
        self._entries: dict[str, tuple] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def store(self, graph: Graph) -> None:
        for value in graph.values.values():
            if value.quant is None or value.qparams is None or value.meta.get("shares_scale_with"):
                continue
            self._entries[value.name] = (value.quant, _options_key(value.quant), value.qparams,
                                         value.meta.get("calibrator"))

    def preload(self, graph: Graph) -> list[str]:
        """Set QParams on annotated tensors seen before with the same spec; returns their names."""
        loaded = []
        for value in graph.values.values():
            if value.quant is None or value.qparams is not None or value.meta.get("shares_scale_with"):
                continue
            entry = self._entries.get(value.name)
            if entry is None or entry[0] != value.quant or entry[1] != _options_key(value.quant):
                continue
            value.qparams = entry[2]
            if entry[3] is not None:
                value.meta["calibrator"] = entry[3]
            loaded.append(value.name)
        return loaded


def _weight_sqnr(graph: Graph) -> list[dict]:
    """SQNR of each quantized constant against its float values (before lowering drops them)."""
    rows = []
    for value in graph.values.values():
        if not value.is_const or value.qparams is None or value.const.dtype.kind != "f" or value.const.size < 2:
            continue
        consumers = value.consumers()
        rows.append({"tensor": value.name, "node": consumers[0].name if consumers else "",
                     "op": consumers[0].op_type if consumers else "",
                     "sqnr_db": sqnr_db(value.const, fake_quantize(value.const, value.qparams)),
                     "per_channel": value.qparams.axis is not None})
    return rows


class _ProbeDone(Exception):
    """Raised by a probing Recorder once calibration is cached: the rest of that run is not needed."""


class Recorder:
    """Instrument for one pipeline run: records the layers after annotation, uses and fills the
    calibration cache around `calibrate`, and measures weight SQNR before lowering.

    probe=True: also calibrate the outputs of ops that share their input's scale (Pad, MaxPool,
    Reshape ...) on their own, then stop the run. A variant that quantizes the layer after such an
    op but not the layer before it needs that tensor's own range; one probe run gets all of them."""

    def __init__(self, passes: Sequence[Pass], ctx: PassContext, cache: CalibrationCache | None,
                 probe: bool = False):
        phases = [p.phase for p in passes]
        self._annotated = max((i for i, ph in enumerate(phases) if ph <= Phase.ANNOTATE), default=None)
        self._calibrated = max((i for i, ph in enumerate(phases) if ph == Phase.CALIBRATE), default=None)
        self._before_lower = min((i for i, ph in enumerate(phases) if ph >= Phase.LOWER), default=len(passes)) - 1
        self.ctx = ctx
        self.cache = cache
        self.layers: list[Layer] = []
        self.weights: list[dict] = []
        self.reused: list[str] = []
        self.shared: list[str] = []  # tensors that take their input's scale
        self.probe = probe

    def after_pass(self, index: int, pass_: Pass, graph: Graph, result: PassResult) -> None:
        if index == self._annotated:
            self.layers = find_layers(graph)
            self.shared = [v.name for v in graph.values.values() if v.quant is not None
                           and v.meta.get("shares_scale_with")]
            if self.cache is not None:
                self.reused = self.cache.preload(graph)
            if self.probe:
                for name in self.shared:
                    graph.values[name].meta.pop("shares_scale_with")
        if index == self._calibrated and self.cache is not None:
            self.cache.store(graph)
            if self.probe:
                raise _ProbeDone
            for name in self.reused:  # calibrate notes only what it calibrated itself
                value = graph.values[name]
                self.ctx.note("ranges", {"tensor": name, "kind": "weight" if value.is_const else "activation",
                                         **value.qparams.summary()})
        if index == self._before_lower:
            self.weights = _weight_sqnr(graph)


@dataclass
class Build:
    """One run of the pipeline: the exported model and what the report needs from the run."""

    proto: onnx.ModelProto
    records: list[PassRecord]
    notes: dict
    layers: list[Layer]
    weights: list[dict]
    seconds: float


class VariantBuilder:
    """Re-runs the recipe's pipeline with extra overrides (compile_model's own pieces)."""

    def __init__(self, passes: Sequence[Pass], scheme: Quantization, load_graph: Callable[[], Graph],
                 make_context: Callable[[Quantization], PassContext]):
        self.passes = list(passes)
        self.scheme = scheme
        self.load_graph = load_graph
        self.make_context = make_context
        self.cache = CalibrationCache()
        self.builds = 0

    def recorder(self, ctx: PassContext) -> Recorder:
        return Recorder(self.passes, ctx, self.cache)

    def probe(self, shared: Sequence[str]) -> None:
        """Calibrate the shared-scale tensors (names from the first run's Recorder.shared) on their
        own, once, so that no variant needs a calibration run of its own."""
        if not shared or all(name in self.cache for name in shared):
            return
        ctx = self.make_context(self.scheme)
        try:
            PassManager(self.passes, [Recorder(self.passes, ctx, self.cache, probe=True)]).run(self.load_graph(), ctx)
        except _ProbeDone:
            pass

    def build(self, overrides: Sequence[Override] = (), reasons: dict[str, str] | None = None) -> Build:
        """The model with `overrides` appended to the recipe's (a layer they float also loses its output
        quantizer, in annotate); `reasons` replaces the float_nodes reason of nodes in the notes
        (e.g. 'fallback: auto ...')."""
        start = time.perf_counter()
        scheme = self.scheme.model_copy(update={"overrides": [*self.scheme.overrides, *overrides]})
        ctx = self.make_context(scheme)
        recorder = Recorder(self.passes, ctx, self.cache)
        manager = PassManager(self.passes, [recorder])
        graph = manager.run(self.load_graph(), ctx)
        self.builds += 1
        for item in ctx.notes.get("float_nodes", []):
            if reasons and item["node"] in reasons:
                item["reason"] = reasons[item["node"]]
        return Build(to_proto(graph), manager.records, ctx.notes, recorder.layers, recorder.weights,
                     time.perf_counter() - start)


# -- ranking -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class VariantScore:
    sqnr_db: float
    metric: float | None  # the ranking metric on the subset

    def as_dict(self) -> dict:
        return {"sqnr_db": self.sqnr_db, "metric": self.metric}


@dataclass
class LayerScore:
    layer: Layer
    quantize_one: VariantScore | None = None
    drop_one: VariantScore | None = None
    score: float = 0.0  # estimated relative output noise power this layer causes
    noise_share: float = 0.0  # score / the sum of every layer's score

    def as_dict(self, rank: int) -> dict:
        return {"rank": rank, **self.layer.as_dict(),
                "quantize_one": self.quantize_one.as_dict() if self.quantize_one else None,
                "drop_one": self.drop_one.as_dict() if self.drop_one else None,
                "score": self.score, "noise_share": self.noise_share}


@dataclass
class Ranking:
    layers: list[LayerScore]  # most damaging first
    samples: int
    metric: str | None
    methods: list[str]
    baseline: VariantScore  # the fully quantized model on the subset
    evaluations: int  # variants run on the subset
    seconds: float

    def as_dict(self) -> dict:
        return {"samples": self.samples, "metric": self.metric, "methods": self.methods,
                "baseline": self.baseline.as_dict(), "evaluations": self.evaluations,
                "seconds": round(self.seconds, 3),
                "layers": [s.as_dict(i + 1) for i, s in enumerate(self.layers)]}


def _noise(sqnr: float) -> float:
    """Relative noise power Σ(f−q)²/Σf² from SQNR in dB."""
    return 0.0 if sqnr == math.inf else math.inf if sqnr == -math.inf else 10 ** (-sqnr / 10)


def _score(outputs: list[np.ndarray], ref: Reference, metric_name: str | None) -> VariantScore:
    sqnr = min(sqnr_db(f, q) for f, q in zip(ref.outputs, outputs))
    value = float(metric(metric_name).compute(outputs, ref)) if metric_name else None
    return VariantScore(sqnr, value)


def rank_layers(builder: VariantBuilder, layers: Sequence[Layer], data: Dataset, ref: Reference,
                quantized_outputs: list[np.ndarray], batch_size: int, *, metric_name: str | None,
                methods: Sequence[str] = ("quantize_one", "drop_one"),
                progress: Progress = lambda it, total, desc: it) -> Ranking:
    """Score every layer on `data` (ref: the float model's outputs on it; quantized_outputs: the
    fully quantized model's). Runs len(layers) variants per method."""
    from .evaluate import run_outputs

    start = time.perf_counter()
    baseline = _score(quantized_outputs, ref, metric_name)
    scores = [LayerScore(layer) for layer in layers]
    everything_float = [Override(match=".*", quantize=False)]
    jobs = [(s, m) for m in methods for s in scores]
    for score, method in progress(jobs, len(jobs), "sensitivity"):
        if method == "quantize_one":
            overrides = everything_float + [Override(match=re.escape(n), quantize=True) for n in score.layer.nodes]
            build = builder.build(overrides)
        else:
            build = builder.build(score.layer.float_overrides())
        result = _score(run_outputs(build.proto, data, batch_size), ref, metric_name)
        setattr(score, method, result)
    total = _noise(baseline.sqnr_db)
    for s in scores:
        estimates = []
        if s.quantize_one is not None:
            estimates.append(_noise(s.quantize_one.sqnr_db))
        if s.drop_one is not None:
            estimates.append(max(0.0, total - _noise(s.drop_one.sqnr_db)))
        s.score = float(np.mean(estimates)) if estimates else 0.0
    overall = sum(s.score for s in scores if math.isfinite(s.score))
    for s in scores:
        s.noise_share = s.score / overall if overall > 0 and math.isfinite(s.score) else (1.0 if s.score else 0.0)
    scores.sort(key=lambda s: -s.score)
    return Ranking(scores, len(data), metric_name, list(methods), baseline, len(jobs), time.perf_counter() - start)


# -- fallback ----------------------------------------------------------------------------------

@dataclass
class Attempt:
    """One fallback candidate evaluated on the full evaluation data."""

    count: int  # how many of the best-ranked layers are float
    passed: bool
    margin: float  # the tightest gate check's slack (>= 0 passes), for choosing when none passes
    metrics: dict  # metric name -> quantized value
    seconds: float
    outcome: object = field(default=None, repr=False)  # what the evaluator returned (kept for the winner)
    build: Build | None = field(default=None, repr=False)

    def as_dict(self) -> dict:
        return {"layers": self.count, "passed": self.passed, "margin": self.margin, "metrics": self.metrics,
                "seconds": round(self.seconds, 3)}


@dataclass
class FallbackResult:
    chosen: Attempt | None  # None: nothing better than the fully quantized model
    attempts: list[Attempt]
    layers: list[Layer]  # the layers moved to float (best-ranked first)

    @property
    def passed(self) -> bool:
        return self.chosen is not None and self.chosen.passed


def fallback_reasons(layers: Sequence[Layer]) -> dict[str, str]:
    return {node: f"fallback: auto moved layer '{layer.name}' to float (sensitivity rank {rank})"
            for rank, layer in enumerate(layers, 1) for node in layer.nodes}


def search_fallback(builder: VariantBuilder, ranked: Sequence[Layer], evaluate: Callable[[Build], Attempt],
                    max_layers: int, progress_note: Callable[[str], None] = lambda text: None) -> FallbackResult:
    """The fewest best-ranked layers to float so that the gate passes: k = 1, 2, 4, ... then bisection.

    evaluate(build) runs the full evaluation and returns an Attempt (count filled in here)."""
    limit = min(max_layers, len(ranked))
    tried: dict[int, Attempt] = {}

    def attempt(k: int) -> Attempt:
        if k not in tried:
            layers = list(ranked[:k])
            build = builder.build([o for layer in layers for o in layer.float_overrides()], fallback_reasons(layers))
            result = evaluate(build)
            result.count, result.build = k, build
            tried[k] = result
            progress_note(f"fallback: {k} layer(s) float -> {'pass' if result.passed else 'fail'}")
        return tried[k]

    failing, passing = 0, None
    k = 1
    while k <= limit:
        if attempt(k).passed:
            passing = k
            break
        failing = k
        if k == limit:
            break
        k = min(2 * k, limit)
    if passing is not None:
        while passing - failing > 1:
            mid = (failing + passing) // 2
            if attempt(mid).passed:
                passing = mid
            else:
                failing = mid
        chosen = tried[passing]
    else:
        chosen = max(tried.values(), key=lambda a: a.margin, default=None)
    attempts = sorted(tried.values(), key=lambda a: a.count)
    return FallbackResult(chosen, attempts, list(ranked[:chosen.count]) if chosen else [])
