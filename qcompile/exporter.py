"""IR Graph -> ONNX, and the one way qcompile writes a model file.

write_model() writes to a temporary file beside the destination, checks it with
onnx.checker (full check) and loads it in onnxruntime, and only then renames it into place:
a failure leaves no partial output and never a model the runtime refuses.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import ExportError
from .ir import Graph, Value

logger = logging.getLogger(__name__)

# Features of quantization ops and the default-domain opset that first allows them.
_PER_AXIS_QDQ_OPSET = 13
_QDQ_TYPE_OPSET = {onnx.TensorProto.INT16: 21, onnx.TensorProto.UINT16: 21,
                   onnx.TensorProto.INT4: 21, onnx.TensorProto.UINT4: 21}
_MAX_IR_VERSION = 10
EXTERNAL_DATA_THRESHOLD = 1 << 30  # bytes of weights above which the output stores them externally


def _value_info(value: Value) -> onnx.ValueInfoProto:
    shape = None if value.shape is None else [d if d is not None else None for d in value.shape]
    return helper.make_tensor_value_info(value.name, value.dtype or onnx.TensorProto.UNDEFINED, shape)


def required_opset(graph: Graph) -> int:
    """The lowest default-domain opset the graph's quantization ops are valid in."""
    need = 0
    for node in graph.nodes:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and node.domain == "":
            scale = node.inputs[1]
            if node.attr("axis") is not None or (scale is not None and scale.shape and len(scale.shape) == 1):
                need = max(need, _PER_AXIS_QDQ_OPSET)
            codes = node.outputs[0] if node.op_type == "QuantizeLinear" else node.inputs[0]
            need = max(need, _QDQ_TYPE_OPSET.get(codes.dtype, 0))
    return need


def to_proto(graph: Graph) -> onnx.ModelProto:
    need = required_opset(graph)
    if graph.opset("") < need:
        raise ExportError(f"the quantized graph needs opset {need} (per-channel or 16/4-bit QuantizeLinear) but "
                          f"the model is opset {graph.opset('')}; import it with min_opset={need}")
    nodes = []
    for node in graph.nodes:
        proto = helper.make_node(node.op_type, [v.name if v is not None else "" for v in node.inputs],
                                 [v.name for v in node.outputs], name=node.name, domain=node.domain or None)
        proto.attribute.extend(node.attributes.values())
        if "doc_string" in node.meta:
            proto.doc_string = node.meta["doc_string"]
        nodes.append(proto)
    input_names = {v.name for v in graph.inputs}
    initializers = [numpy_helper.from_array(np.asarray(v.const), v.name)
                    for v in graph.values.values() if v.is_const and v.name not in input_names]
    graph_proto = helper.make_graph(nodes, graph.name, [_value_info(v) for v in graph.inputs],
                                    [_value_info(v) for v in graph.outputs], initializers,
                                    doc_string=graph.model_props.get("graph_doc_string") or None)
    opsets = [helper.make_opsetid(domain, version) for domain, version in sorted(graph.opset_imports.items())]
    props = graph.model_props
    model = helper.make_model(graph_proto, opset_imports=opsets, producer_name=props.get("producer_name") or "qcompile",
                              producer_version=props.get("producer_version") or "")
    # Keep the source's IR version, but not above 10: onnx writes versions newer than the runtimes read
    # (onnx 1.23 writes 14, onnxruntime 1.31 reads up to 13), and nothing qcompile emits needs more.
    model.ir_version = max(min(props.get("ir_version", 0), _MAX_IR_VERSION),
                           helper.find_min_ir_version_for(opsets, ignore_unknown=True))
    model.model_version = props.get("model_version", 0)
    if props.get("doc_string"):
        model.doc_string = props["doc_string"]
    for key, value in props.get("metadata_props", {}).items():
        model.metadata_props.add(key=key, value=value)
    model.functions.extend(props.get("functions", []))
    return model


def _weights_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer)


def validate_file(path: Path) -> None:
    """onnx.checker full check plus an onnxruntime session: what every written model must pass."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise ExportError(f"the exported model fails onnx.checker: {' '.join(str(exc).split())[:400]}") from exc
    from .runtime import session

    try:
        session(path)
    except Exception as exc:
        raise ExportError(f"onnxruntime refuses the exported model: {' '.join(str(exc).split())[:400]}") from exc


def write_model(model: onnx.ModelProto, path: str | Path, *, external_data: bool | None = None,
                validate: bool = True) -> Path:
    """Write atomically: temp dir beside the target, validate, then rename into place.

    external_data=None chooses external storage (<name>.data beside the model) for weights
    above 1 GiB, as protobuf cannot hold more than 2 GiB.
    """
    path = Path(path)
    if external_data is None:
        external_data = _weights_bytes(model) > EXTERNAL_DATA_THRESHOLD
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        tmp_model = tmp_dir / path.name
        data_name = path.name + ".data"
        if external_data:
            onnx.save_model(model, str(tmp_model), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
        else:
            onnx.save_model(model, str(tmp_model))
        if validate:
            validate_file(tmp_model)
        if external_data:
            os.replace(tmp_dir / data_name, path.parent / data_name)
        os.replace(tmp_model, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return path
