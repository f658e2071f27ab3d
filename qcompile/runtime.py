"""onnxruntime glue shared by calibration, evaluation, verification and the passes that run models.

session() opens a quiet CPU session from a file, bytes or an in-memory ModelProto (models past
protobuf's 2 GiB limit go through a temporary file); with_outputs() exposes intermediate tensors
as extra graph outputs so one run can hand them to calibrators, comparisons or statistics.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np
import onnx
from onnx import helper

# Larger models go to onnxruntime through a temporary file with external data.
_IN_MEMORY_LIMIT = 1 << 30


def session(model: str | Path | bytes | onnx.ModelProto, threads: int = 0, optimize: bool = True):
    """An onnxruntime CPU session. optimize=False keeps the graph as written (no fusions), which
    statistics of the float graph need."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    providers = ["CPUExecutionProvider"]
    if isinstance(model, onnx.ModelProto):
        if model.ByteSize() < _IN_MEMORY_LIMIT:
            return ort.InferenceSession(model.SerializeToString(), options, providers=providers)
        with tempfile.TemporaryDirectory(prefix="qcompile-session-") as tmp:
            path = Path(tmp) / "model.onnx"
            onnx.save_model(model, str(path), save_as_external_data=True, location="model.onnx.data")
            return ort.InferenceSession(str(path), options, providers=providers)
    if isinstance(model, bytes):
        return ort.InferenceSession(model, options, providers=providers)
    return ort.InferenceSession(str(model), options, providers=providers)


def with_outputs(model: onnx.ModelProto, names: Iterable[str], types: Mapping[str, int] | None = None,
                 default: int = onnx.TensorProto.FLOAT) -> onnx.ModelProto:
    """A copy of model that also outputs the named tensors (element type from types, else default)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    existing = {o.name for o in copy.graph.output}
    types = types or {}
    for name in names:
        if name not in existing:
            copy.graph.output.append(helper.make_tensor_value_info(name, types.get(name) or default, None))
            existing.add(name)
    return copy


def observe_outputs(model: onnx.ModelProto, names: list[str], batches: Iterable[dict],
                    observe: Callable[[str, np.ndarray], None], types: Mapping[str, int] | None = None) -> int:
    """Run the float graph as written batch by batch, handing each named tensor to observe(name, array).

    Only one batch's tensors are alive at a time. Returns the number of samples seen."""
    sess = session(with_outputs(model, names, types), optimize=False)
    seen = 0
    for feeds in batches:
        for name, array in zip(names, sess.run(names, feeds)):
            observe(name, array)
        seen += len(next(iter(feeds.values())))
    return seen
