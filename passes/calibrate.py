"""`calibrate`: turn statistics into quantization parameters for every annotated tensor.

Constants (weights) are observed directly. Activations are observed by running the float
model in onnxruntime batch by batch with the annotated tensors exposed as extra outputs; only
one batch's activations are alive at a time. Each tensor's calibrator (QuantSpec.calibrator,
from the recipe) decides its range, and qcompile.numerics.qparams_from_range turns the range into
scale and zero point. Tensors marked `shares_scale_with` (outputs of Reshape, MaxPool, ...)
take their input's parameters, so the runtime moves codes without requantizing.
"""
from __future__ import annotations

import logging

from qcompile.calibration import Calibrator, make_calibrator
from qcompile.collect import collect_statistics
from qcompile.errors import CalibrationError
from qcompile.exporter import to_proto
from qcompile.ir import Graph, Value
from qcompile.numerics import qparams_from_range
from qcompile.pipeline import Pass, PassContext, PassResult, Phase
from qcompile.registry import register_pass

__all__ = ["CalibratePass"]
logger = logging.getLogger(__name__)


@register_pass("calibrate")
class CalibratePass(Pass):
    """Observe annotated tensors and set their QParams (scale, zero point)."""

    phase = Phase.CALIBRATE
    requires = frozenset({"annotated"})
    establishes = frozenset({"calibrated"})

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        calibrators: dict[str, Calibrator] = {}
        activations: list[Value] = []
        for value in graph.values.values():
            if value.quant is None or value.qparams is not None or value.meta.get("shares_scale_with"):
                continue
            if value.is_const:
                calibrators[value.name] = make_calibrator(value.quant)
                calibrators[value.name].observe(value.const)
            else:
                activations.append(value)

        run_stats = {"samples": 0}
        if activations:
            order = {id(n): i for i, n in enumerate(graph.nodes)}  # groups follow the graph's order
            activations.sort(key=lambda v: order.get(id(v.producer), -1))
            observed, run_stats = collect_statistics(
                to_proto(graph), activations, ctx.require_calibration(self.name), jobs=ctx.jobs,
                budget_bytes=ctx.memory_budget_mb << 20, progress=ctx.progress, batch_count=ctx.calibration_batches)
            calibrators.update(observed)

        for name, calibrator in calibrators.items():
            value = graph.values[name]
            try:
                chosen = calibrator.compute_range()
            except CalibrationError as exc:
                raise CalibrationError(f"tensor '{name}': {exc}") from None
            value.qparams = qparams_from_range(chosen.lo, chosen.hi, value.quant)
            value.meta["calibrator"] = calibrator  # its statistics, for refine passes (never exported)

        shared = 0
        for node in graph.nodes:  # topological: a chain of Reshape/MaxPool inherits from its start
            for out in node.outputs:
                source_name = out.meta.get("shares_scale_with")
                if source_name is None:
                    continue
                source = graph.values[source_name]
                if source.qparams is None:
                    raise CalibrationError(f"{node.describe()}: its input '{source_name}' has no quantization "
                                           "parameters to share")
                out.quant, out.qparams = source.quant, source.qparams
                shared += 1
        for name in calibrators:
            value = graph.values[name]
            ctx.note("ranges", {"tensor": name, "kind": "weight" if value.is_const else "activation",
                                **value.qparams.summary()})
        return PassResult(modified=bool(calibrators), stats={"calibrated_tensors": len(calibrators),
                                                            "activations": len(activations),
                                                            "shared_scales": shared, **run_stats})
