"""`aciq_clip`: shrink calibrated ranges to ACIQ's analytic clipping value.

Before:  x[q8 range -12.1 .. 12.1]   (e.g. max calibration: the range reaches the rarest outlier)
After:   x[q8 range -9.9 .. 9.9]     (α = k(8)·b for Laplace(μ, b) data with b = 1)

Banner, Nahshan & Soudry 2019 (ACIQ), papers.md §2.1: modelling a tensor as Laplace(μ, b) or
Gaussian(μ, σ) (option ``prior``), the clip α* = k(M)·b (or k(M)·σ) minimises the expected
clipping + rounding MSE of an M-bit quantizer. A real tensor is often neither: the linear
bottleneck outputs and residual sums of EfficientNet-Lite0 have a narrow body (small b) and
outliers the next layers need, and clipping them at k(8)·b cost 22 points of top-1 (88.50% ->
66.25%, per-tensor W8A8, 400 images). ``prior: mix`` (the default) is the ACIQ reference code's
mix mode (papers.md §2.1): per tensor, the Laplace window, the Gaussian window and the calibrated
range are each scored by the quantization MSE they give the tensor's own histogram (clipping +
rounding; calibrators/aciq.py's quantization_error, as the aciq calibrator's own mix does), and
the lowest wins, ties going to the calibrated range; the report notes which. On the same model
and images mix clips 29 of 60 tensors (28 with the Laplace window, 1 with the Gaussian) and
gives 88.25% / 97.50% agreement, KL to FP32 0.0125 against 0.0129 without aciq_clip (88.50%;
one image). ``laplace`` / ``gaussian`` apply that prior everywhere. The window is placed
exactly as the ``aciq`` calibrator places it (calibrators/aciq.py): two-sided [−(|μ| + α), |μ| + α] for symmetric
signed codes, [lo, lo + 2α] with lo = max(min, μ − α) for affine codes, and for unsigned or
non-negative tensors the one-sided [0, max(μ, 0) + α] with the next bit up, α = k(M + 1)·b.

This pass is that decision applied after calibration, as a refinement of whatever calibrator
ran: the new range is the intersection of the calibrated range and ACIQ's window, so a range
only ever shrinks, never widens. value.qparams is recomputed with qparams_from_range under the
same spec; outputs that share their input's scale (value.meta["shares_scale_with"]: MaxPool,
Reshape, Pad, ...) follow their source again, as calibrate made them.

Statistics: if the tensor's calibrator (value.meta["calibrator"], left there by calibrate)
kept a histogram with moments (percentile, entropy, mse, aciq: any HistogramCalibrator), μ, σ
and b come from it at no cost. Otherwise (max, ema_max, plugins) the pass runs the float model
once more over ctx.calibration, streaming every such tensor into a histogram + moments
(qcompile.collect: memory-bounded groups, ``--jobs`` shards).

Graph outputs are left alone unless option ``outputs`` is true: a model's outputs are its
answers, and their tails are what matters (clipping EfficientNet-Lite0's logits at α cut the top
logit from 14.1 to 7.3 and merged the leading classes).

Option ``weights`` (default false) also clips constant weights the same way, from the tensor
itself; per-tensor weights only (per-channel weights are noted and left alone). Run aciq_clip
before correct_bias when both are used, so that the bias correction sees the clipped weights.
Per-channel activation ranges are left alone too.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from qcompile.calibration import Range
from qcompile.calibrators.aciq import AciqCalibrator, least_error
from qcompile.collect import collect_statistics
from qcompile.exporter import to_proto
from qcompile.histogram import HistogramCalibrator, range_for_spec
from qcompile.ir import Graph, Value
from qcompile.numerics import qparams_from_range
from qcompile.pipeline import Pass, PassContext, PassResult, Phase
from qcompile.qtypes import QuantSpec
from qcompile.registry import register_pass

__all__ = ["AciqClipOptions", "AciqClipPass"]
logger = logging.getLogger(__name__)


class AciqClipOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prior: Literal["mix", "laplace", "gaussian"] = "mix"
    weights: bool = False  # also clip per-tensor constant weights
    outputs: bool = False  # also clip the graph's outputs


def _aciq_spec(spec: QuantSpec) -> QuantSpec:
    """spec with the aciq calibrator, whose histogram + moments serve every prior."""
    return dataclasses.replace(spec, calibrator="aciq", calibrator_options={})


def _window(statistics: HistogramCalibrator, spec: QuantSpec, prior: str) -> Range:
    """ACIQ's window for one per-tensor row of statistics, shaped to the spec."""
    chosen = AciqCalibrator(_aciq_spec(spec)).window(statistics.histogram(0), statistics.statistics.moments(0), prior)
    return range_for_spec(chosen.lo, chosen.hi, spec)


def _choose(statistics: HistogramCalibrator, qparams, prior: str) -> tuple[str, float, float]:
    """(prior chosen, lo, hi): ACIQ's window intersected with the calibrated range; in mix mode
    the calibrated range itself competes ("none"), and the lowest quantization MSE wins."""
    spec = qparams.spec
    lo, hi = float(qparams.lo), float(qparams.hi)
    candidates = {"none": Range(lo, hi)} if prior == "mix" else {}
    for name in (("laplace", "gaussian") if prior == "mix" else (prior,)):
        window = _window(statistics, spec, name)
        candidates[name] = Range(max(lo, float(window.lo)), min(hi, float(window.hi)))
    name = least_error(statistics.histogram(0), spec, candidates) if prior == "mix" else prior
    return name, float(candidates[name].lo), float(candidates[name].hi)


def _has_statistics(value: Value) -> bool:
    calibrator = value.meta.get("calibrator")
    return isinstance(calibrator, HistogramCalibrator) and calibrator.statistics.rows == 1


def _collect(graph: Graph, values: list[Value], ctx: PassContext, pass_name: str) -> dict:
    """Histogram + moments of `values` from one extra float run over the calibration data."""
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    values = sorted(values, key=lambda v: order.get(id(v.producer), -1))
    # Stand-in values carry the name, shape and an aciq spec to the collector; never added to the graph.
    carriers = [Value(v.name, dtype=v.dtype, shape=v.shape, quant=_aciq_spec(v.qparams.spec)) for v in values]
    observed, _ = collect_statistics(to_proto(graph), carriers, ctx.require_calibration(pass_name), jobs=ctx.jobs,
                                     budget_bytes=ctx.memory_budget_mb << 20, progress=ctx.progress,
                                     batch_count=ctx.calibration_batches)
    return observed


def _weight_statistics(value: Value) -> HistogramCalibrator:
    calibrator = AciqCalibrator(_aciq_spec(value.qparams.spec))
    calibrator.observe(value.const)
    return calibrator


@register_pass("aciq_clip")
class AciqClipPass(Pass):
    """Clip every calibrated per-tensor range at ACIQ's analytic optimum, never widening it."""

    phase = Phase.REFINE
    Options = AciqClipOptions
    requires = frozenset({"calibrated"})
    establishes = frozenset({"ranges_clipped"})

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        prior = self.options.prior
        targets: list[Value] = []
        per_channel = outputs = 0
        graph_outputs = {id(v) for v in graph.outputs}
        for value in graph.values.values():
            if value.qparams is None or value.meta.get("shares_scale_with") or value.meta.get("lowered"):
                continue
            if value.is_const and not self.options.weights:
                continue
            if id(value) in graph_outputs and not self.options.outputs:
                outputs += 1
                continue
            if value.qparams.axis is not None:
                per_channel += 1
                continue
            targets.append(value)

        statistics: dict[str, HistogramCalibrator] = {}
        missing = []
        for value in targets:
            if value.is_const:
                statistics[value.name] = _weight_statistics(value)
            elif _has_statistics(value):
                statistics[value.name] = value.meta["calibrator"]
            else:
                missing.append(value)
        if missing:
            statistics.update(_collect(graph, missing, ctx, self.name))

        clipped = 0
        chosen = {"laplace": 0, "gaussian": 0, "none": 0}
        for value in targets:
            old = value.qparams
            name, lo, hi = _choose(statistics[value.name], old, prior)
            chosen[name] += 1
            new = qparams_from_range(lo, hi, old.spec)
            if np.array_equal(new.scale, old.scale) and np.array_equal(new.zero_point, old.zero_point):
                continue
            value.qparams = new
            clipped += 1
            ctx.note("aciq_clip", {"tensor": value.name, "kind": "weight" if value.is_const else "activation",
                                   "prior": name, "before": [float(old.lo), float(old.hi)],
                                   "after": [float(new.lo), float(new.hi)]})

        followers = 0
        for node in graph.nodes:  # topological: a chain of shared scales follows its start
            for out in node.outputs:
                source_name = out.meta.get("shares_scale_with")
                if source_name is None or out.qparams is None:
                    continue
                source = graph.values[source_name]
                if out.qparams is not source.qparams:
                    out.quant, out.qparams = source.quant, source.qparams
                    followers += 1
        if per_channel:
            ctx.note("aciq_clip", {"skipped_per_channel": per_channel})
        if outputs:
            ctx.note("aciq_clip", {"skipped_graph_outputs": outputs})
        return PassResult(modified=clipped > 0, stats={"prior": prior, "clipped": clipped, "chosen": chosen,
                                                       "unchanged": len(targets) - clipped,
                                                       "collected": len(missing), "shared_scales_updated": followers,
                                                       "per_channel_skipped": per_channel,
                                                       "graph_outputs_skipped": outputs})
