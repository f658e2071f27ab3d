"""Collect calibration statistics: onnxruntime runs the float model, calibrators observe.

Memory: only the tensors of one group are exposed as outputs of a session, and only one batch
of them is alive at a time; groups are formed so that a batch of a group's tensors stays under
a byte budget (a model whose activations exceed it is run once per group). Memory therefore
depends on the batch size and the budget, never on the number of calibration samples.

Parallelism: with jobs > 1 each group's batches are split round-robin into `jobs` shards, each
shard is observed in its own process, and the shards' calibrators are merged
(Calibrator.merge), which is exact for max, histogram and moment statistics.
"""
from __future__ import annotations

import logging
import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

import numpy as np
import onnx

from .calibration import Calibrator, make_calibrator
from .data import DataSource
from .errors import CalibrationError
from .exporter import to_proto
from .ir import Graph, Value
from .qtypes import QuantSpec
from .runtime import observe_outputs

if TYPE_CHECKING:
    from .pipeline import PassContext

logger = logging.getLogger(__name__)
Progress = Callable[[Iterable, int, str], Iterable]


def _bytes_per_batch(value: Value, batch_size: int) -> int:
    if not value.shape:
        return 4 * batch_size
    dims = [d if isinstance(d, int) and d > 0 else batch_size for d in value.shape]
    return 4 * math.prod(dims)


def group_by_budget(values: list[Value], batch_size: int, budget_bytes: int) -> list[list[Value]]:
    """Consecutive groups whose tensors of one batch stay under the budget (one tensor may exceed it alone)."""
    groups: list[list[Value]] = [[]]
    used = 0
    for value in values:
        size = _bytes_per_batch(value, batch_size)
        if groups[-1] and used + size > budget_bytes:
            groups.append([])
            used = 0
        groups[-1].append(value)
        used += size
    return [g for g in groups if g]


def observe_batches(model: onnx.ModelProto, calibrators: dict[str, Calibrator], batches: Iterable[dict],
                    types: dict[str, int] | None = None) -> int:
    """Run each batch; hand every requested tensor to its calibrator. Returns samples seen."""
    return observe_outputs(model, list(calibrators), batches, lambda name, array: calibrators[name].observe(array),
                           types)


def _shard_worker(model: onnx.ModelProto, types: dict[str, int], specs: dict[str, tuple[type, QuantSpec]], source: DataSource,
                  shard: int, shards: int) -> tuple[dict[str, Calibrator], int]:
    calibrators = {name: cls(spec, cls.Options(**spec.calibrator_options)) for name, (cls, spec) in specs.items()}
    seen = observe_batches(model, calibrators, source.batches(shard, shards), types)
    return calibrators, seen


def collect_statistics(model: onnx.ModelProto, values: list[Value], source: DataSource, *, jobs: int = 1,
                       budget_bytes: int = 512 << 20, progress: Progress | None = None,
                       batch_count: int = 0) -> tuple[dict[str, Calibrator], dict]:
    """Calibrators for `values` after observing the whole data source; and run statistics."""
    progress = progress or (lambda it, total, desc: it)
    groups = group_by_budget(values, source.batch_size, budget_bytes)
    result: dict[str, Calibrator] = {}
    samples = 0
    dataset = source.open() if jobs == 1 else None
    for index, group in enumerate(groups):
        calibrators = {v.name: make_calibrator(v.quant) for v in group}
        types = {v.name: v.dtype for v in group if v.dtype}
        desc = "calibrating" if len(groups) == 1 else f"calibrating group {index + 1}/{len(groups)}"
        if jobs == 1:
            samples = observe_batches(model, calibrators, progress(source.batches(dataset=dataset), batch_count, desc),
                                      types)
        else:
            specs = {name: (type(c), c.spec) for name, c in calibrators.items()}
            context = multiprocessing.get_context("spawn")  # onnxruntime's threads do not survive fork
            with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
                futures = [pool.submit(_shard_worker, model, types, specs, source, shard, jobs) for shard in range(jobs)]
                samples = 0
                for future in progress(futures, jobs, desc):
                    shard_calibrators, seen = future.result()
                    samples += seen
                    for name, calibrator in shard_calibrators.items():
                        if calibrator.samples:
                            calibrators[name].merge(calibrator)
        if samples == 0:
            raise CalibrationError(f"the calibration data '{source.path}' yielded no samples")
        result.update(calibrators)
    return result, {"samples": samples, "groups": len(groups), "jobs": jobs}


def _tap(batches: Iterable[dict], names: list[str], observe: Callable[[str, np.ndarray], None]) -> Iterator[dict]:
    """Pass the batches through, observing the graph inputs among them."""
    for feeds in batches:
        for name in names:
            observe(name, feeds[name])
        yield feeds


def observe_float_values(graph: Graph, values: list[Value], observe: Callable[[str, np.ndarray], None],
                         ctx: PassContext, pass_name: str, label: str) -> None:
    """Hand every batch of each float value in `values` to observe(name, array), over ctx.calibration.

    For passes that need statistics of the float model other than calibrators' (bias correction's
    means, GPTQ's second moments): the graph runs in onnxruntime as written, the values exposed in
    groups under ctx.memory_budget_mb, so only one batch of one group is alive at a time.
    Graph inputs among the values are observed from the feeds.
    """
    source = ctx.require_calibration(pass_name)
    from_inputs = [v.name for v in values if v in graph.inputs]
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    exposed = sorted((v for v in values if v not in graph.inputs), key=lambda v: order.get(id(v.producer), -1))
    groups = group_by_budget(exposed, source.batch_size, ctx.memory_budget_mb << 20) or [[]]
    model = to_proto(graph)
    dataset = source.open()
    for index, group in enumerate(groups):
        desc = label if len(groups) == 1 else f"{label} group {index + 1}/{len(groups)}"
        batches = ctx.progress(source.batches(dataset=dataset), ctx.calibration_batches, desc)
        if index == 0 and from_inputs:
            batches = _tap(batches, from_inputs, observe)
        if group:
            observe_outputs(model, [v.name for v in group], batches, observe, {v.name: v.dtype for v in group if v.dtype})
        else:
            for _ in batches:
                pass
