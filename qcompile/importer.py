"""ONNX file -> IR Graph.

Steps: load (external data included) and validate, fold constants and turn Constant nodes into
initializers (onnx-graphsurgeon, which evaluates constant subgraphs with onnxruntime), optional
opset conversion (onnx.version_converter), shape inference, then build the IR.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import ModelError
from .ir import Graph, Node, Value

logger = logging.getLogger(__name__)

SUPPORTED_OPSETS = range(11, 22)


def load_model_proto(path: str | Path) -> tuple[onnx.ModelProto, bool]:
    """Read and validate an ONNX file; returns the model and whether its weights were external.

    Every failure is a one-line ModelError naming the file.
    """
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: no such file")
    if path.is_dir():
        raise ModelError(f"{path}: is a directory, expected an .onnx file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends
        raise ModelError(f"{path}: not a readable ONNX model (protobuf parse failed: {_one_line(exc)})") from exc
    if not model.HasField("graph") or len(model.graph.node) == 0:
        raise ModelError(f"{path}: not an ONNX model (no graph or no nodes; the file may be truncated)")
    external = _uses_external_data(model)
    if external:
        try:
            onnx.load_external_data_for_model(model, str(path.parent))
        except Exception as exc:
            raise ModelError(f"{path}: external data could not be loaded: {_one_line(exc)}") from exc
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise ModelError(f"{path}: invalid ONNX model: {_one_line(exc)}") from exc
    return model, external


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] + ("..." if len(text) > 300 else "")


def _uses_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 0


def prepare(model: onnx.ModelProto, *, fold_constants: bool = True, min_opset: int | None = None,
            source: str = "model") -> onnx.ModelProto:
    """Constant folding, opset conversion and shape inference on a loaded model."""
    opset = default_opset(model)
    if opset not in SUPPORTED_OPSETS:
        raise ModelError(f"{source}: opset {opset} is not supported (supported: "
                         f"{SUPPORTED_OPSETS.start}-{SUPPORTED_OPSETS.stop - 1}); convert it with onnx.version_converter")
    if fold_constants:
        model = _fold_constants(model, source)
    if min_opset is not None and opset < min_opset:
        try:
            model = onnx.version_converter.convert_version(model, min_opset)
        except Exception as exc:
            raise ModelError(f"{source}: cannot convert opset {opset} to {min_opset}, which the quantized "
                             f"output needs: {_one_line(exc)}") from exc
        logger.info("converted %s from opset %d to %d", source, opset, min_opset)
    try:
        model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as exc:
        logger.warning("%s: shape inference failed (%s); continuing with the shapes the file declares",
                       source, _one_line(exc))
    return model


def _fold_constants(model: onnx.ModelProto, source: str) -> onnx.ModelProto:
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(model)
    try:
        graph.fold_constants(error_ok=True)
    except Exception as exc:  # folding is an optimisation; never lose the model to it
        logger.warning("%s: constant folding skipped: %s", source, _one_line(exc))
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    folded = gs.export_onnx(graph, do_type_check=False)
    folded.ir_version = model.ir_version
    folded.producer_name = model.producer_name
    folded.producer_version = model.producer_version
    folded.doc_string = model.doc_string
    del folded.metadata_props[:]
    folded.metadata_props.extend(model.metadata_props)
    return folded


def _shape_of(type_proto: onnx.TypeProto) -> tuple[int | None, tuple | None]:
    if not type_proto.HasField("tensor_type"):
        return None, None
    tensor = type_proto.tensor_type
    dtype = tensor.elem_type or None
    if not tensor.HasField("shape"):
        return dtype, None
    dims = []
    for d in tensor.shape.dim:
        if d.HasField("dim_value"):
            dims.append(d.dim_value)
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return dtype, tuple(dims)


def _outer_names_read_by(graph_proto: onnx.GraphProto) -> set[str]:
    """Names a subgraph reads from enclosing scopes (recursively)."""
    defined = {i.name for i in graph_proto.input} | {i.name for i in graph_proto.initializer}
    read: set[str] = set()
    for node in graph_proto.node:
        read.update(n for n in node.input if n)
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                read |= _outer_names_read_by(sub)
        defined.update(node.output)
    return read - defined


def graph_from_proto(model: onnx.ModelProto) -> Graph:
    """Build the IR from a (prepared) ModelProto."""
    proto = model.graph
    graph = Graph(proto.name or "graph")
    graph.opset_imports = {("" if imp.domain == "ai.onnx" else imp.domain): imp.version for imp in model.opset_import}
    graph.model_props = {
        "ir_version": model.ir_version,
        "producer_name": model.producer_name,
        "producer_version": model.producer_version,
        "doc_string": model.doc_string,
        "model_version": model.model_version,
        "metadata_props": {p.key: p.value for p in model.metadata_props},
        "functions": list(model.functions),
        "graph_doc_string": proto.doc_string,
    }
    if len(proto.sparse_initializer):
        raise ModelError("model has sparse initializers, which qcompile does not support; densify them first")

    typed: dict[str, onnx.ValueInfoProto] = {}
    for info in list(proto.value_info) + list(proto.input) + list(proto.output):
        typed[info.name] = info

    def value(name: str) -> Value:
        if name in graph.values:
            return graph.values[name]
        dtype, shape = _shape_of(typed[name].type) if name in typed else (None, None)
        return graph.add_value(name, dtype=dtype, shape=shape, exact_name=True)

    for init in proto.initializer:
        array = numpy_helper.to_array(init)
        graph.add_value(init.name, dtype=init.data_type, shape=tuple(array.shape), const=array, exact_name=True)
    for info in proto.input:
        if info.name not in graph.values:  # initializers listed as inputs stay initializers
            graph.inputs.append(value(info.name))

    used_names: set[str] = set()
    for index, node_proto in enumerate(proto.node):
        name = node_proto.name if node_proto.name and node_proto.name not in used_names else \
            f"{node_proto.op_type}_{index}"
        used_names.add(name)
        inputs = [value(n) if n else None for n in node_proto.input]
        outputs = [value(n) for n in node_proto.output]
        implicit: list[Value] = []
        for attr in node_proto.attribute:
            if attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
                for sub in subs:
                    implicit += [graph.values[n] for n in sorted(_outer_names_read_by(sub)) if n in graph.values]
        node = Node(node_proto.op_type, inputs, outputs, node_proto.attribute, name=name,
                    domain=node_proto.domain, implicit_inputs=dict.fromkeys(implicit))
        if node_proto.doc_string:
            node.meta["doc_string"] = node_proto.doc_string
        graph.nodes.append(node)
    graph.outputs = [value(o.name) for o in proto.output]
    for out in proto.output:  # declared output types win over inferred ones
        dtype, shape = _shape_of(out.type)
        graph.values[out.name].dtype = dtype or graph.values[out.name].dtype
        graph.values[out.name].shape = shape if shape is not None else graph.values[out.name].shape
    graph.check()
    return graph


def import_model(path: str | Path, *, fold_constants: bool = True, min_opset: int | None = None) -> Graph:
    model, external = load_model_proto(path)
    graph = graph_from_proto(prepare(model, fold_constants=fold_constants, min_opset=min_opset, source=str(path)))
    graph.model_props["source_opset"] = default_opset(model)
    graph.model_props["external_data"] = external
    return graph


def constant_array(value: Value) -> np.ndarray:
    if value.const is None:
        raise ValueError(f"'{value.name}' is not a constant")
    return value.const
