"""IntegerExecutor: run an integer-lowered ONNX model with integer-only kernels.

The integer region of a graph is every node that lies on a path from a node producing integer
codes (QuantizeLinear, DynamicQuantizeLinear, QLinear*, ConvInteger, ...) to a node consuming
them (DequantizeLinear or another integer kernel). Inside it only INTEGER kernels and MOVEMENT
kernels (data movement, exact on codes) may run; FLOAT-fallback kernels run outside it (before
the first QuantizeLinear, after the last DequantizeLinear) or on int64 shape tensors. Anything
else is refused with UnsupportedOpError naming the node, when the executor is built where the
types are known, otherwise when the node is reached.

Graph-level consequence: dynamic-quantization graphs that rescale in float between two integer
layers (ConvInteger -> Cast -> Mul -> DynamicQuantizeLinear -> ConvInteger) are refused; one
integer layer between float parts runs.
"""
from __future__ import annotations

import logging
from collections import deque

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .kernel import (MODES, ExecutionError, Kernel, KernelKind, NodeContext, UnsupportedOpError, describe)
from .ops_conv import KERNELS as _CONV
from .ops_elementwise import KERNELS as _ELEMENTWISE
from .ops_float import KERNELS as _FLOAT
from .ops_matmul import KERNELS as _MATMUL
from .ops_pool import KERNELS as _POOL
from .ops_quantize import KERNELS as _QUANTIZE
from .ops_shape import KERNELS as _SHAPE

logger = logging.getLogger(__name__)

KERNELS: dict[tuple[str, str], Kernel] = {**_QUANTIZE, **_CONV, **_MATMUL, **_ELEMENTWISE, **_POOL, **_SHAPE, **_FLOAT}

# Integer kernels that read floats and write codes (region sources) / read codes and write floats.
_FLOAT_TO_CODES = {"QuantizeLinear", "DynamicQuantizeLinear"}
_CODES_TO_FLOAT = {"DequantizeLinear"}


def _domain(node: onnx.NodeProto) -> str:
    return "" if node.domain in ("", "ai.onnx") else node.domain


def kernel_for(node: onnx.NodeProto) -> Kernel | None:
    return KERNELS.get((_domain(node), node.op_type))


class IntegerExecutor:
    """Integer-only reference executor for an ONNX model.

    mode "onnx": ONNX / onnxruntime semantics (float32 requantization multiplier, round half to
    even), bit-exact with onnxruntime's CPU provider. mode "fixed-point": gemmlowp / TFLite
    integer requantization (Q31 multiplier, SaturatingRoundingDoublingHighMul, RoundingDivideByPOT).
    See requant.py.
    """

    def __init__(self, model: onnx.ModelProto, mode: str = "onnx"):
        if mode not in MODES:
            raise ExecutionError(f"unknown mode '{mode}' (known: {', '.join(MODES)})")
        self.mode = mode
        graph = model.graph
        self._opsets = {("" if o.domain in ("", "ai.onnx") else o.domain): o.version for o in model.opset_import}
        self.input_names = [v.name for v in graph.input]
        self.output_names = [v.name for v in graph.output]
        overridable = set(self.input_names)
        self._initializers = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        self._nodes = _topological_order(graph, set(self._initializers) | overridable)
        constant_outputs = {o for n in self._nodes if n.op_type == "Constant" and _domain(n) == "" for o in n.output}
        static = (set(self._initializers) - overridable) | constant_outputs | {""}
        self._kernels = [self._require_kernel(n) for n in self._nodes]
        self._contexts = [NodeContext(n, self._opsets.get(_domain(n), 1), mode,
                                      tuple(name in static for name in n.input)) for n in self._nodes]
        self._region = _integer_region(self._nodes, self._kernels)
        self._last_use = _last_uses(self._nodes, self.output_names)
        self._check_float_ops_statically(model)
        logger.debug("integer executor (%s): %d nodes, %d non-integer nodes inside the integer region",
                     mode, len(self._nodes), len(self._region))

    # -------------------------------------------------------------------------------- public

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model on `feeds` (graph input name -> array); returns graph output name -> array."""
        values = self._execute(feeds, {}, {})
        return {name: values[name] for name in self.output_names}

    def run_on_reference(self, feeds: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run every op on `reference`'s tensors (another runtime's results) wherever it has them.

        Returns the executor's own result for each tensor in `reference` that a node produces,
        computed from the reference values of that node's inputs, so a difference shows what this
        op computes differently and not what earlier ops passed on. Run freely, a requantization
        1 LSB off grows through the layers after it: on EfficientNet-Lite0 a 1x1 or depthwise
        conv's output can move by up to ~60 LSB per input LSB (per-channel weights, per-tensor
        activation scales).
        """
        own: dict[str, np.ndarray] = {}
        self._execute(feeds, reference, own)
        return own

    def _execute(self, feeds: dict[str, np.ndarray], reference: dict[str, np.ndarray],
                 own: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run all nodes; a produced tensor named in `reference` is recorded in `own` and replaced."""
        values: dict[str, np.ndarray] = dict(self._initializers)
        for name, array in feeds.items():
            if name not in self.input_names:
                raise ExecutionError(f"feed '{name}' is not a graph input (inputs: {', '.join(self.input_names)})")
            values[name] = np.asarray(array)
        missing = [n for n in self.input_names if n not in values]
        if missing:
            raise ExecutionError(f"missing feeds for graph inputs: {', '.join(missing)}")
        for index, (node, kernel, ctx) in enumerate(zip(self._nodes, self._kernels, self._contexts)):
            inputs = [values[name] if name else None for name in node.input]
            if kernel.kind is KernelKind.FLOAT and index in self._region:
                self._check_float_inputs(index, inputs)
            try:
                outputs = kernel.fn(ctx, *inputs)
            except ExecutionError:
                raise
            except Exception as exc:  # a numpy error inside a kernel: say where
                raise ExecutionError(f"{describe(node)} failed: {type(exc).__name__}: {exc}") from exc
            for name, array in zip(node.output, outputs):
                if name in reference:
                    own[name] = array
                    array = np.asarray(reference[name])
                if name:
                    values[name] = array
            for name in self._last_use.get(index, ()):
                values.pop(name, None)
        return values

    # ------------------------------------------------------------------------------- checks

    def _require_kernel(self, node: onnx.NodeProto) -> Kernel:
        kernel = kernel_for(node)
        if kernel is None:
            domain = f"{node.domain}." if _domain(node) else ""
            raise UnsupportedOpError(
                f"op {domain}{node.op_type} in node '{node.name}' has no integer kernel; the integer executor runs "
                f"{', '.join(sorted({op for (_, op), k in KERNELS.items() if k.kind is not KernelKind.FLOAT}))} "
                f"and, outside the integer region only, the float fallback "
                f"{', '.join(sorted({op for (_, op), k in KERNELS.items() if k.kind is KernelKind.FLOAT}))}")
        return kernel

    def _region_error(self, index: int, detail: str) -> UnsupportedOpError:
        node = self._nodes[index]
        source, sink = self._region[index]
        return UnsupportedOpError(
            f"op {node.op_type} in node '{node.name}' has no integer kernel; it lies inside the integer region "
            f"(after node '{source}', before node '{sink}') and {detail}. Lower it to an integer op, or move it "
            "before the first QuantizeLinear / after the last DequantizeLinear where the float fallback may run")

    def _check_float_inputs(self, index: int, inputs: list) -> None:
        dtypes = [x.dtype for x in inputs if x is not None]
        if _integer_cast(self._nodes[index], dtypes):
            return
        if not all(d == np.int64 for d in dtypes):
            raise self._region_error(index, f"reads {', '.join(sorted({str(d) for d in dtypes}))} tensors, "
                                            "not int64 shape tensors")

    def _check_float_ops_statically(self, model: onnx.ModelProto) -> None:
        """Refuse float-fallback nodes inside the region now, when inference knows their input types."""
        if not any(self._kernels[i].kind is KernelKind.FLOAT for i in self._region):
            return
        types = _value_types(model)
        for index in self._region:
            if self._kernels[index].kind is not KernelKind.FLOAT:
                continue
            elems = [types.get(name) for name in self._nodes[index].input if name]
            known = [e for e in elems if e is not None]
            if known and _integer_cast(self._nodes[index], [helper.tensor_dtype_to_np_dtype(e) for e in known]):
                continue
            if any(e != onnx.TensorProto.INT64 for e in known):
                names = sorted({helper.tensor_dtype_to_np_dtype(e).name for e in known})
                raise self._region_error(index, f"reads {', '.join(names)} tensors, not int64 shape tensors")


def _integer_cast(node: onnx.NodeProto, input_dtypes: list) -> bool:
    """Float-fallback ops that are exact integer arithmetic on these inputs: a widening Cast between
    integer types (codes to int32 lookup-table indices), and Min/Max/Clip of codes of one type
    (a clamp on codes: min and max commute with the monotone quantization)."""
    if not input_dtypes:
        return False
    if node.op_type in ("Min", "Max", "Clip"):
        return len({np.dtype(d) for d in input_dtypes}) == 1 and np.dtype(input_dtypes[0]).kind in "iu"
    if node.op_type != "Cast":
        return False
    to = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "to"), None)
    if to is None:
        return False
    target = np.dtype(helper.tensor_dtype_to_np_dtype(to))
    return target.kind in "iu" and all(np.dtype(d).kind in "iu" and np.can_cast(d, target, "safe")
                                        for d in input_dtypes)


def run_model(model: onnx.ModelProto, feeds: dict[str, np.ndarray], mode: str = "onnx") -> dict[str, np.ndarray]:
    """Run `model` once with the integer-only executor; see IntegerExecutor."""
    return IntegerExecutor(model, mode).run(feeds)


# ------------------------------------------------------------------------------- graph helpers


def _topological_order(graph: onnx.GraphProto, available: set[str]) -> list[onnx.NodeProto]:
    producers = {}
    for node in graph.node:
        for name in node.output:
            if name:
                producers[name] = node
    pending = {id(n): sum(1 for name in n.input if name and name not in available) for n in graph.node}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            if name and name not in available:
                if name not in producers:
                    raise ExecutionError(f"{describe(node)} reads '{name}', which no node, initializer or "
                                         "input defines")
                consumers.setdefault(name, []).append(node)
    ready = deque(n for n in graph.node if pending[id(n)] == 0)
    order = []
    while ready:
        node = ready.popleft()
        order.append(node)
        for name in node.output:
            for consumer in consumers.get(name, ()):  # listed once per input slot that reads `name`
                pending[id(consumer)] -= 1
                if pending[id(consumer)] == 0:
                    ready.append(consumer)
    if len(order) != len(graph.node):
        raise ExecutionError("the graph has a cycle")
    return order


def _integer_region(nodes: list[onnx.NodeProto], kernels: list[Kernel]) -> dict[int, tuple[str, str]]:
    """Non-integer node index -> (a code producer upstream, a code consumer downstream) for nodes inside."""
    def is_producer(i):
        return kernels[i].kind is KernelKind.INTEGER and nodes[i].op_type not in _CODES_TO_FLOAT

    def is_consumer(i):
        return kernels[i].kind is KernelKind.INTEGER and nodes[i].op_type not in _FLOAT_TO_CODES

    after: dict[str, str] = {}  # value -> name of a code producer it depends on
    before_node: dict[int, str] = {}
    for i, node in enumerate(nodes):
        source = next((after[name] for name in node.input if name in after), None)
        if is_producer(i):
            source = node.name or node.op_type
        if source is not None:
            before_node[i] = source
            for name in node.output:
                after[name] = source
    feeds: dict[str, str] = {}  # value -> name of a code consumer that depends on it
    region = {}
    for i in range(len(nodes) - 1, -1, -1):
        node = nodes[i]
        sink = next((feeds[name] for name in node.output if name in feeds), None)
        if sink is not None and i in before_node and kernels[i].kind is not KernelKind.INTEGER:
            region[i] = (before_node[i], sink)
        if is_consumer(i):
            sink = node.name or node.op_type
        if sink is not None:
            for name in node.input:
                feeds.setdefault(name, sink)
    return region


def _last_uses(nodes: list[onnx.NodeProto], keep: list[str]) -> dict[int, list[str]]:
    last: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for name in node.input:
            if name:
                last[name] = i
    uses: dict[int, list[str]] = {}
    for name, i in last.items():
        if name not in keep:
            uses.setdefault(i, []).append(name)
    return uses


def _value_types(model: onnx.ModelProto) -> dict[str, int]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # unknown contrib ops or bad shapes: fall back to what the model declares
        inferred = model
    graph = inferred.graph
    types = {t.name: t.data_type for t in graph.initializer}
    for info in list(graph.input) + list(graph.value_info) + list(graph.output):
        if info.type.HasField("tensor_type") and info.type.tensor_type.elem_type:
            types[info.name] = info.type.tensor_type.elem_type
    return types
