"""`fuse_requant`: lower DQ -> op -> Q groups of a QDQ graph to QOperator (QLinear*) nodes.

Before:  x_q -> DQ -> Conv(DQ(W_q), DQ(b_q)) -> Clip -> Q -> y_q
After:   x_q -> QLinearConv(x_s, x_zp, W_q, W_s, W_zp, y_s, y_zp, b_q) -> Clip(codes) -> y_q

The integer op accumulates in int32 and requantizes with M = s_x·s_w / s_y (Jacob et al. 2018
eq. 5-6). Each lowered node records M in both forms in node.meta["requant"]: the float32
multiplier onnxruntime uses and the fixed-point pair (M0 as a Q31 int32, shift) of gemmlowp /
TFLite, computed by qcompile.numerics — the integer executor and the report use the same
functions, so the same numbers.

Lowered ops: Conv -> QLinearConv; MatMul -> QLinearMatMul; Gemm -> com.microsoft QGemm;
Add/Mul -> QLinearAdd/QLinearMul; Concat -> QLinearConcat; Sigmoid -> QLinearSigmoid;
LeakyRelu -> QLinearLeakyRelu; GlobalAveragePool/AveragePool -> QLinear*Pool (com.microsoft);
HardSwish/HardSigmoid/Tanh -> Gather from a 256-entry table of output codes indexed by the input
codes (the table is computed once by onnxruntime running the op's own DQ -> op -> Q, so it is
the QDQ result bit for bit; QLinearSigmoid is the same technique inside onnxruntime).
MaxPool, GlobalMaxPool, Reshape, Flatten, Transpose, Squeeze, Unsqueeze and Pad whose input and
output share scale and zero point run directly on the codes (no requantization). A Relu/Clip
between the op and its Q becomes a Clip on the codes at [Q(lo), Q(hi)], exact because
quantization is monotone. Anything else keeps its DQ -> op -> Q form (valid ONNX; onnxruntime
runs it in float) and is counted in the stats.

Profiles (option `profile`): `generic` keeps codes as annotated (int8 symmetric stays int8);
`onnxruntime-x86` stores int8 activations with zero point z as uint8 with zero point z + 128 —
the same grid — because onnxruntime's uint8-activation kernels are much faster on x86.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np
import onnx
from pydantic import BaseModel, ConfigDict

from qcompile.ir import Graph, Node, Value
from qcompile.numerics import ort_requant_multiplier, quantize_multiplier, round_half_even
from qcompile.pipeline import Pass, PassContext, PassResult, Phase
from qcompile.registry import register_pass
from qcompile.runtime import session

__all__ = ["FuseRequantPass"]
logger = logging.getLogger(__name__)
MS = "com.microsoft"


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    profile: Literal["generic", "onnxruntime-x86"] = "onnxruntime-x86"


@dataclass
class QTensor:
    """Codes plus their scale and zero point, as read off a DequantizeLinear or QuantizeLinear."""

    codes: Value
    scale: Value
    zero_point: Value
    axis: int | None

    def same_grid(self, other: "QTensor") -> bool:
        return (self.axis == other.axis and np.array_equal(self.scale.const, other.scale.const)
                and np.array_equal(self.zero_point.const, other.zero_point.const)
                and self.zero_point.const.dtype == other.zero_point.const.dtype)


def _const_params(node: Node) -> bool:
    return all(v is not None and v.is_const for v in node.inputs[1:3])


def _dequantized(value: Value | None) -> QTensor | None:
    """The codes behind `value` if a DequantizeLinear with constant parameters produced it."""
    if value is None or value.producer is None:
        return None
    dq = value.producer
    if dq.op_type != "DequantizeLinear" or dq.domain or len(dq.inputs) < 3 or not _const_params(dq):
        return None
    return QTensor(dq.inputs[0], dq.inputs[1], dq.inputs[2], dq.attr("axis") if dq.inputs[1].const.ndim else None)


def _quantize_consumer(value: Value, graph: Graph) -> Node | None:
    """The one QuantizeLinear that reads value (and nothing else does)."""
    if value in graph.outputs or len(value.uses()) != 1:
        return None
    q = value.uses()[0].node
    if q.op_type != "QuantizeLinear" or q.domain or len(q.inputs) < 3 or not _const_params(q) \
            or q.inputs[1].const.ndim != 0:
        return None
    return q


@dataclass
class Match:
    node: Node
    inputs: list[QTensor | None]
    clamp: Node | None  # Relu/Clip between node and q
    q: Node

    @property
    def out(self) -> QTensor:
        return QTensor(self.q.outputs[0], self.q.inputs[1], self.q.inputs[2], None)


def _match(graph: Graph, node: Node, data_inputs: list[int]) -> Match | None:
    inputs = [_dequantized(node.input(i)) for i in range(len(node.inputs))]
    if any(inputs[i] is None for i in data_inputs) or len(node.outputs) != 1:
        return None
    out = node.outputs[0]
    clamp = None
    q = _quantize_consumer(out, graph)
    if q is None and len(out.uses()) == 1 and out not in graph.outputs:
        candidate = out.uses()[0].node
        if candidate.op_type in ("Relu", "Clip") and all(v is None or v.is_const for v in candidate.inputs[1:]):
            q = _quantize_consumer(candidate.outputs[0], graph)
            clamp = candidate if q is not None else None
    return Match(node, inputs, clamp, q) if q is not None else None


def _code_bounds(clamp: Node, out: QTensor) -> tuple[int, int]:
    if clamp.op_type == "Relu":
        lo, hi = 0.0, np.inf
    else:
        lo = float(clamp.input(1).const) if clamp.input(1) is not None else -np.inf
        hi = float(clamp.input(2).const) if clamp.input(2) is not None else np.inf
    info = np.iinfo(out.zero_point.const.dtype)
    scale, zp = float(out.scale.const), int(out.zero_point.const)
    with np.errstate(over="ignore", invalid="ignore"):
        qlo = info.min if np.isinf(lo) else int(np.clip(round_half_even(np.float32(lo) / np.float32(scale)) + zp, info.min, info.max))
        qhi = info.max if np.isinf(hi) else int(np.clip(round_half_even(np.float32(hi) / np.float32(scale)) + zp, info.min, info.max))
    return qlo, qhi


class _Lowering:
    """Replaces one matched group by integer nodes; shared by every op's lowering function."""

    def __init__(self, graph: Graph, ctx: PassContext):
        self.graph = graph
        self.ctx = ctx
        self.stats: dict[str, int] = {}

    def replace(self, match: Match, op_type: str, inputs: list[Value | None], attributes: dict, domain: str = "",
                multiplier: np.ndarray | None = None) -> Node:
        graph, q = self.graph, match.q
        out = match.out  # read before the QuantizeLinear is detached
        codes_out = q.outputs[0]
        graph.remove_node(q, safe=False)
        if match.clamp is not None:
            lo, hi = _code_bounds(match.clamp, out)
            dtype = out.zero_point.const.dtype
            mid = graph.add_value(f"{match.node.name}_unclamped", dtype=codes_out.dtype, shape=codes_out.shape)
            new = graph.add_node(op_type, inputs, [mid], name=f"{match.node.name}_quant", attributes=attributes,
                                 domain=domain, before=match.node)
            graph.add_node("Clip", [mid, graph.add_constant(f"{match.node.name}_clip_min", np.array(lo, dtype)),
                                    graph.add_constant(f"{match.node.name}_clip_max", np.array(hi, dtype))],
                           [codes_out], name=f"{match.node.name}_clamp", after=new)
            graph.remove_node(match.clamp, safe=False)
        else:
            new = graph.add_node(op_type, inputs, [codes_out], name=f"{match.node.name}_quant",
                                 attributes=attributes, domain=domain, before=match.node)
        graph.remove_node(match.node, safe=False)
        if domain == MS:
            graph.opset_imports.setdefault(MS, 1)
        if multiplier is not None:
            m0, shift = quantize_multiplier(multiplier.astype(np.float64))
            new.meta["requant"] = {"float32": multiplier, "m0": m0, "shift": shift}
            self.ctx.note("requant", {"node": new.name, "op": op_type,
                                      "multiplier": _summary(multiplier), "m0": _summary(m0), "shift": _summary(shift)})
        self.stats[op_type] = self.stats.get(op_type, 0) + 1
        return new

    def int32_bias(self, bias: QTensor | None, x: QTensor, w: QTensor) -> Value | None:
        """Bias codes with scale exactly float32(s_x * s_w): re-derived from the DQ'd bias."""
        if bias is None:
            return None
        scale = (x.scale.const.astype(np.float32) * w.scale.const.astype(np.float32)).astype(np.float64)
        real = bias.codes.const.astype(np.float64) * bias.scale.const.astype(np.float64)
        codes = np.clip(round_half_even(real / scale), -2**31, 2**31 - 1).astype(np.int32)
        return self.graph.add_constant(f"{bias.codes.name}_requant", codes)


def _summary(a) -> float | dict:
    a = np.asarray(a)
    return float(a) if a.ndim == 0 else {"min": float(a.min()), "max": float(a.max()), "channels": int(a.size)}


def _attrs(node: Node, *names: str) -> dict:
    return {n: node.attr(n) for n in names if node.attr(n) is not None}


def _one_code_type(*tensors: QTensor) -> bool:
    """onnxruntime's QLinearAdd/Mul/Concat bind every operand and the output to one type."""
    return len({t.zero_point.const.dtype for t in tensors}) == 1


def _lower_conv(low: _Lowering, m: Match) -> Node | None:
    x, w, b = m.inputs[0], m.inputs[1], m.inputs[2] if len(m.inputs) > 2 else None
    y = m.out
    if not _one_code_type(x, y):  # onnxruntime implements QLinearConv only with x and y of one type
        return None
    return low.replace(m, "QLinearConv", [x.codes, x.scale, x.zero_point, w.codes, w.scale, w.zero_point, y.scale,
                                          y.zero_point, low.int32_bias(b, x, w)],
                       _attrs(m.node, "auto_pad", "dilations", "group", "kernel_shape", "pads", "strides"),
                       multiplier=ort_requant_multiplier(x.scale.const, w.scale.const, y.scale.const))


def _lower_matmul(low: _Lowering, m: Match) -> Node | None:
    a, b = m.inputs[0], m.inputs[1]
    y = m.out
    if not _one_code_type(a, y):
        return None
    return low.replace(m, "QLinearMatMul", [a.codes, a.scale, a.zero_point, b.codes, b.scale, b.zero_point,
                                            y.scale, y.zero_point], {},
                       multiplier=ort_requant_multiplier(a.scale.const, b.scale.const, y.scale.const))


def _lower_gemm(low: _Lowering, m: Match) -> Node | None:
    a, b, c = m.inputs[0], m.inputs[1], m.inputs[2] if len(m.inputs) > 2 else None
    if m.node.attr("beta", 1.0) != 1.0 or (len(m.node.inputs) > 2 and m.node.input(2) is not None and c is None):
        return None
    if not _one_code_type(a, m.out):
        return None
    y = m.out
    return low.replace(m, "QGemm", [a.codes, a.scale, a.zero_point, b.codes, b.scale, b.zero_point,
                                    low.int32_bias(c, a, b), y.scale, y.zero_point],
                       _attrs(m.node, "alpha", "transA", "transB"), domain=MS,
                       multiplier=ort_requant_multiplier(a.scale.const, b.scale.const, y.scale.const))


def _binary(op_type: str) -> Callable[[_Lowering, Match], Node | None]:
    def lower(low: _Lowering, m: Match) -> Node | None:
        a, b = m.inputs[0], m.inputs[1]
        y = m.out
        if not _one_code_type(a, b, y) or m.clamp is not None:
            return None
        return low.replace(m, op_type, [a.codes, a.scale, a.zero_point, b.codes, b.scale, b.zero_point,
                                        y.scale, y.zero_point], {}, domain=MS)
    return lower


def _unary(op_type: str, *attrs: str, extra: dict | None = None) -> Callable[[_Lowering, Match], Node | None]:
    def lower(low: _Lowering, m: Match) -> Node | None:
        x = m.inputs[0]
        y = m.out
        if not _one_code_type(x, y) or m.clamp is not None:
            return None
        return low.replace(m, op_type, [x.codes, x.scale, x.zero_point, y.scale, y.zero_point],
                           {**_attrs(m.node, *attrs), **(extra or {})}, domain=MS)
    return lower


def _lower_concat(low: _Lowering, m: Match) -> Node | None:
    y = m.out
    if not _one_code_type(y, *m.inputs) or m.clamp is not None:
        return None
    inputs: list[Value | None] = [y.scale, y.zero_point]
    for x in m.inputs:
        inputs += [x.codes, x.scale, x.zero_point]
    return low.replace(m, "QLinearConcat", inputs, _attrs(m.node, "axis"), domain=MS)


def _lower_on_codes(low: _Lowering, m: Match) -> Node | None:
    """Data movement whose input and output share one grid: run the op on the codes."""
    x = m.inputs[0]
    if m.clamp is not None or not x.same_grid(m.out):
        return None
    rest = list(m.node.inputs[1:])
    if m.node.op_type == "Pad" and len(rest) >= 2 and rest[1] is not None:
        rest[1] = low.graph.add_constant(f"{m.node.name}_pad_code", x.zero_point.const.reshape(()).copy())
    if m.node.op_type == "Min":  # the constant bound in codes of the same grid: min commutes with Q
        bound = rest[0].const.astype(np.float32)
        codes = round_half_even(bound / x.scale.const.astype(np.float32)) + x.zero_point.const.astype(np.float32)
        info = np.iinfo(x.zero_point.const.dtype)
        rest[0] = low.graph.add_constant(f"{m.node.name}_bound_codes",
                                         np.clip(codes, info.min, info.max).astype(x.zero_point.const.dtype))
    attributes = {name: m.node.attr(name) for name in m.node.attributes}
    return low.replace(m, m.node.op_type, [x.codes, *rest], attributes)


def _lookup_table(node: Node, x: QTensor, y: QTensor) -> np.ndarray:
    """y codes for all 256 x codes, computed by onnxruntime running DQ -> op -> Q itself, so the
    table equals what the QDQ form computes, bit for bit."""
    from onnx import helper, numpy_helper

    in_type = x.zero_point.const.dtype
    codes = np.arange(np.iinfo(in_type).min, np.iinfo(in_type).max + 1).astype(in_type)
    op = helper.make_node(node.op_type, ["f"], ["g"], domain=node.domain or None)
    op.attribute.extend(node.attributes.values())
    model = helper.make_model(helper.make_graph(
        [helper.make_node("DequantizeLinear", ["c", "xs", "xz"], ["f"]), op,
         helper.make_node("QuantizeLinear", ["g", "ys", "yz"], ["o"])], "table",
        [helper.make_tensor_value_info("c", helper.np_dtype_to_tensor_dtype(in_type), [codes.size])],
        [helper.make_tensor_value_info("o", helper.np_dtype_to_tensor_dtype(y.zero_point.const.dtype), [codes.size])],
        [numpy_helper.from_array(np.asarray(a), n) for a, n in
         ((x.scale.const, "xs"), (x.zero_point.const, "xz"), (y.scale.const, "ys"), (y.zero_point.const, "yz"))]),
        opset_imports=[helper.make_opsetid("", 13 if node.op_type != "HardSwish" else 14)])
    model.ir_version = 8
    out = session(model, optimize=False).run(None, {"c": codes})[0]
    # Gather reads negative indices from the end: table[c mod 256] = f(c) serves int8 codes directly.
    table = np.empty(256, dtype=out.dtype)
    table[codes.astype(np.int64) % 256] = out
    return table


def _lower_table(low: _Lowering, m: Match) -> Node | None:
    """8-bit unary op without a QLinear form: a 256-entry lookup, Gather(table, Cast(codes, int32))."""
    x, y = m.inputs[0], m.out
    if x.axis is not None or x.scale.const.ndim or m.clamp is not None \
            or x.zero_point.const.dtype not in (np.int8, np.uint8) or y.zero_point.const.dtype not in (np.int8, np.uint8):
        return None
    graph = low.graph
    table = graph.add_constant(f"{m.node.name}_table", _lookup_table(m.node, x, y))
    index = graph.add_node("Cast", [x.codes], 1, name=f"{m.node.name}_index", attributes={"to": onnx.TensorProto.INT32},
                           before=m.node)
    index.outputs[0].dtype, index.outputs[0].shape = onnx.TensorProto.INT32, x.codes.shape
    return low.replace(m, "Gather", [table, index.outputs[0]], {"axis": 0})


# op type -> (indices of inputs that must be dequantized codes, lowering). One entry per op.
LOWERINGS: dict[str, tuple[Callable[[Node], list[int]], Callable[[_Lowering, Match], Node | None]]] = {
    "Conv": (lambda n: [0, 1] + ([2] if n.input(2) is not None else []), _lower_conv),
    "MatMul": (lambda n: [0, 1], _lower_matmul),
    "Gemm": (lambda n: [0, 1] + ([2] if n.input(2) is not None else []), _lower_gemm),
    "Add": (lambda n: [0, 1], _binary("QLinearAdd")),
    "Mul": (lambda n: [0, 1], _binary("QLinearMul")),
    "Concat": (lambda n: list(range(len(n.inputs))), _lower_concat),
    "Sigmoid": (lambda n: [0], _unary("QLinearSigmoid")),
    "LeakyRelu": (lambda n: [0], _unary("QLinearLeakyRelu", "alpha")),
    "GlobalAveragePool": (lambda n: [0], _unary("QLinearGlobalAveragePool", extra={"channels_last": 0})),
    "AveragePool": (lambda n: [0], _unary("QLinearAveragePool", "auto_pad", "ceil_mode", "count_include_pad",
                                          "kernel_shape", "pads", "strides", extra={"channels_last": 0})),
    **{op: (lambda n: [0], _lower_table) for op in ("HardSwish", "HardSigmoid", "Tanh")},
    **{op: (lambda n: [0], _lower_on_codes) for op in
       ("MaxPool", "GlobalMaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Pad", "Min")},
}


def _to_unsigned_activations(graph: Graph) -> int:
    """onnxruntime-x86 profile: int8 activation codes with zero point z -> uint8 with z + 128."""
    converted = 0
    zero_points: set[int] = set()
    for node in graph.nodes:
        if node.op_type != "QuantizeLinear" or node.domain or len(node.inputs) < 3:
            continue
        zp = node.inputs[2]
        if zp.is_const and zp.const.dtype == np.int8 and id(zp) not in zero_points:
            zp.const = (zp.const.astype(np.int16) + 128).astype(np.uint8)
            zp.dtype = onnx.TensorProto.UINT8
            zero_points.add(id(zp))
        if zp.is_const and zp.const.dtype == np.uint8:
            if node.outputs[0].dtype == onnx.TensorProto.INT8:
                node.outputs[0].dtype = onnx.TensorProto.UINT8
                converted += 1
    # Dequantizers of those codes share the zero-point constant, so they follow automatically.
    return converted


@register_pass("fuse_requant")
class FuseRequantPass(Pass):
    """Lower a QDQ graph to QOperator nodes (QLinearConv, QLinearMatMul, QGemm, QLinearAdd, ...)."""

    phase = Phase.LOWER
    Options = Options
    requires = frozenset({"lowered"})
    establishes = frozenset({"integer_lowered"})

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        stats: dict[str, int] = {}
        if self.options.profile == "onnxruntime-x86":
            stats["activations_to_uint8"] = _to_unsigned_activations(graph)
        low = _Lowering(graph, ctx)
        left_float = 0
        for node in list(graph.nodes):
            if node not in graph.nodes or node.domain or node.op_type not in LOWERINGS:
                continue
            data_inputs, lower = LOWERINGS[node.op_type]
            match = _match(graph, node, data_inputs(node))
            if match is None or lower(low, match) is None:
                left_float += 1
                ctx.note("not_lowered", {"node": node.name, "op": node.op_type})
        graph.remove_unused()
        stats.update(low.stats)
        stats["left_in_qdq_form"] = left_float
        return PassResult(modified=bool(low.stats) or bool(stats.get("activations_to_uint8")), stats=stats)
