"""`hswish_shift`: shift h-swish outputs by 3/8 so they quantize unsigned with zero point 0 (PROFIT).

Before:  x -> h-swish -> y -> Conv(W, b, pads p)                      y in [-3/8, inf)
After:   x -> h-swish -> y -> Add(3/8) -> y' -> Pad(p, 3/8) -> Conv(W, b', pads 0)
with y' = y + d >= 0 (d = 3/8, the global minimum of h-swish is h(-1.5) = -3/8) and
b'[oc] = b[oc] - d * W_sum[oc], W_sum[oc] = sum of W[oc] over input channels and kernel taps
(depthwise: over the taps of that channel). Gemm consumers get C' = beta*C - alpha*d*W_sum with
W_sum[n] = sum_k B'[k, n] (B' = B^T when transB) and beta = 1; a consumer without bias gets one.
Park & Yoo 2020 (PROFIT) §3.1-3.2 of ../shared/papers.md.

y' is marked value.meta["nonnegative"], so `annotate` gives it unsigned codes with zero point 0:
the grid [0, 255]·s covers [-3/8, max] instead of the symmetric [-max, max] that wastes the
negative half. The nodes of a shifted h-swish and the shift Add are kept float
(node.meta["keep_float"]): the h-swish is one function from the quantized x to the quantized y',
as in a runtime's fused h-swish, whatever form the graph spells it in. Otherwise its output would
first be quantized as a signed tensor (HardSwish, Mul(x, Clip(x+3)) before the /6) and its gate
Clip(x+3, 0, 6) on its own grid, and the unsigned grid could not recover that resolution.

Padding: a zero-padded conv would pad y' with 0, i.e. y = -3/8 at the borders. With
`padding: exact_pad` (default) each padded consumer gets an explicit Pad with constant 3/8 (real 0
before the shift) and pads 0, so the float model stays exact. That Pad stays float and the
QuantizeLinear follows it, so after quantization the border holds the code round(3/8 / s): the
same rounding any in-range value gets, at most s/2 from real 0, but the same error at every border
pixel. With `padding: skip_padded` only h-swish outputs whose consumers have no padding (1x1 convs,
Gemm) are shifted. (No grid value can be fixed here: s is chosen by calibration, later. On the
PP-OCR direction classifier, whose 5x5 depthwise convs see maps 3-12 pixels high, the rounded
border cost about 2.5 dB of logits SQNR against borders made exact by enlarging each padded
tensor's scale to d/floor(d/s) after calibration: 17.2 vs 19.7 dB; int8_sym without this pass 16.5.)

Recognised h-swish forms (constants within 1e-6 relative):
  - HardSwish(x);
  - Mul(x, HardSigmoid(x)) with alpha = 1/6 and beta = 0.5 (ONNX defaults 0.2, 0.5 when absent);
  - Add(x, 3) -> Clip(0, 6) -> Mul(x, .) -> Div(., 6) or Mul(., 1/6); also the /6 (or *1/6) on
    the clip before the Mul; operands in either order; Clip bounds as inputs or attributes.
An h-swish is shifted only when every use of y is the data input of a Conv (constant weight and
bias) or Gemm (constant B and C); otherwise it is left alone and the reason is noted under
`hswish_not_shifted` in the report.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from onnx import TensorProto
from pydantic import BaseModel, ConfigDict, Field

from qcompile.ir import Graph, Node, Value
from qcompile.op_rules import clamp_bounds
from qcompile.pipeline import Pass, PassContext, PassResult, Phase
from qcompile.registry import register_pass

__all__ = ["HSwishShiftPass"]
logger = logging.getLogger(__name__)

HSWISH_MINIMUM = 0.375  # h(-1.5) = -1.5 * 1.5 / 6 = -3/8
_RTOL = 1e-6
FLOAT_REASON = "h-swish computed in float: its output is quantized once, shifted by +3/8 (hswish_shift)"
SHIFT_REASON = "hswish_shift offset: computed with the h-swish; its output is quantized unsigned"
PAD_REASON = ("hswish_shift border Pad (constant d = real 0 before the shift): runs in float before the "
              "QuantizeLinear, so the border code is round(d / s)")


@dataclass(frozen=True)
class HSwish:
    """One recognised h-swish: y = x * relu6(x + 3) / 6, computed by `nodes`."""

    x: Value
    y: Value
    form: str
    nodes: tuple[Node, ...]  # every node of the pattern, the one producing y last: kept float once shifted


# ---- matching --------------------------------------------------------------------------------
def _scalar(value: Value | None) -> float | None:
    if value is None or not value.is_const or value.const.size != 1 or value.const.dtype.kind != "f":
        return None
    return float(value.const.reshape(-1)[0])


def _is_const(value: Value | None, target: float) -> bool:
    got = _scalar(value)
    return got is not None and math.isclose(got, target, rel_tol=_RTOL, abs_tol=0.0)


def _producer(value: Value | None, op_type: str) -> Node | None:
    node = value.producer if value is not None else None
    return node if node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx") else None


def _operands(node: Node) -> list[tuple[Value, Value]]:
    """Both (a, b) orders of a binary node's inputs."""
    a, b = node.input(0), node.input(1)
    return [(a, b), (b, a)] if a is not None and b is not None else []


def _relu6_of_x_plus_3(gate: Value | None, x: Value) -> tuple[Node, ...]:
    """(Add, Clip) when gate == Clip(Add(x, 3), 0, 6), the Add in either operand order; else ()."""
    clip = _producer(gate, "Clip")
    if clip is None:
        return ()
    bounds = clamp_bounds(clip)
    if bounds is None or not math.isclose(bounds[0], 0.0, abs_tol=1e-12) \
            or not math.isclose(bounds[1], 6.0, rel_tol=_RTOL):
        return ()
    add = _producer(clip.input(0), "Add")
    if add is None or not any(a is x and _is_const(c, 3.0) for a, c in _operands(add)):
        return ()
    return add, clip


def _divided_by_6(node: Node) -> Value | None:
    """The a of Div(a, 6), Mul(a, 1/6) or Mul(1/6, a), else None."""
    if node.op_type == "Div" and _is_const(node.input(1), 6.0):
        return node.input(0)
    if node.op_type == "Mul":
        for a, c in _operands(node):
            if _is_const(c, 1.0 / 6.0):
                return a
    return None


def _match(node: Node) -> HSwish | None:
    """The h-swish whose output `node` produces, if it is one of the recognised forms."""
    if node.domain not in ("", "ai.onnx") or len(node.outputs) != 1:
        return None
    y = node.outputs[0]
    if node.op_type == "HardSwish":
        return HSwish(node.input(0), y, "HardSwish", (node,))
    if node.op_type == "Mul":
        for x, other in _operands(node):
            sigmoid = _producer(other, "HardSigmoid")
            if sigmoid is not None and sigmoid.input(0) is x \
                    and math.isclose(sigmoid.attr("alpha", 0.2), 1.0 / 6.0, rel_tol=_RTOL) \
                    and math.isclose(sigmoid.attr("beta", 0.5), 0.5, rel_tol=_RTOL):
                return HSwish(x, y, "x*HardSigmoid(x)", (sigmoid, node))
            scaled = _producer(other, "Div") or _producer(other, "Mul")  # x * (relu6(x + 3) / 6)
            gate = _relu6_of_x_plus_3(_divided_by_6(scaled), x) if scaled is not None else ()
            if gate:
                return HSwish(x, y, "x*(Clip(x+3,0,6)/6)", (*gate, scaled, node))
    if node.op_type in ("Div", "Mul"):  # (x * relu6(x + 3)) / 6
        product = _producer(_divided_by_6(node), "Mul")
        for x, gate_value in _operands(product) if product is not None else ():
            gate = _relu6_of_x_plus_3(gate_value, x)
            if gate:
                return HSwish(x, y, "x*Clip(x+3,0,6)/6", (*gate, product, node))
    return None


# ---- consumers -------------------------------------------------------------------------------
def _conv_pads(conv: Node, x_shape: tuple | None) -> list[int] | None:
    """Explicit pads [begin..., end...] of a Conv, or None when auto_pad SAME needs unknown shapes."""
    rank = conv.input(1).const.ndim - 2
    auto_pad = conv.attr("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("NOTSET", ""):
        return list(conv.attr("pads", [0] * (2 * rank)))
    if auto_pad == "VALID":
        return [0] * (2 * rank)
    spatial = tuple(x_shape[2:]) if x_shape is not None and len(x_shape) == rank + 2 else ()
    if len(spatial) != rank or not all(isinstance(d, int) and d > 0 for d in spatial):
        return None
    kernel = conv.input(1).const.shape[2:]
    strides = conv.attr("strides", [1] * rank)
    dilations = conv.attr("dilations", [1] * rank)
    begins, ends = [], []
    for size, k, s, d in zip(spatial, kernel, strides, dilations):
        total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
        small, large = total // 2, total - total // 2
        begins.append(small if auto_pad == "SAME_UPPER" else large)
        ends.append(large if auto_pad == "SAME_UPPER" else small)
    return begins + ends


def _why_not_consumer(node: Node, index: int, y: Value, padding: str) -> str:
    """Empty when `node` can absorb the shift of its input `index`; otherwise the reason."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in ("Conv", "Gemm"):
        return f"consumer {node.describe()} is not a Conv or Gemm"
    if index != 0:
        return f"{node.describe()} reads it as input {index}, not as its data input"
    weight, bias = node.input(1), node.input(2)
    if weight is None or not weight.is_const or weight.const.dtype.kind != "f":
        return f"{node.describe()} weight is not a float constant"
    if bias is not None and not bias.is_const:
        return f"{node.describe()} bias is not a constant"
    if node.op_type == "Gemm":
        if weight.const.ndim != 2:
            return f"{node.describe()} B is not a matrix"
        return ""
    if bias is not None and bias.const.ndim != 1:
        return f"{node.describe()} bias is not a vector"
    pads = _conv_pads(node, y.shape)
    if pads is None:
        return f"{node.describe()} has auto_pad SAME and the input's spatial shape is unknown"
    if any(pads) and padding == "skip_padded":
        return f"{node.describe()} pads its input (padding: skip_padded)"
    return ""


def _why_not(hswish: HSwish, padding: str) -> str:
    y = hswish.y
    if y.dtype != TensorProto.FLOAT:
        return "h-swish output is not float32"
    uses = y.uses()
    if not uses:
        return "h-swish output has no consumers"
    if any(use.index < 0 for use in uses):
        return "a subgraph reads the h-swish output by name"
    for use in uses:
        reason = _why_not_consumer(use.node, use.index, y, padding)
        if reason:
            return reason
    return ""


# ---- rewriting -------------------------------------------------------------------------------
def _conv_weight_sum(weight: np.ndarray) -> np.ndarray:
    """W_sum[oc]: sum over input channels (of its group) and kernel taps, in float64."""
    return weight.astype(np.float64).reshape(weight.shape[0], -1).sum(axis=1)


def _fold_into_conv(graph: Graph, conv: Node, offset: float) -> None:
    weight, bias = conv.input(1).const, conv.input(2)
    old = bias.const.astype(np.float64) if bias is not None else np.zeros(weight.shape[0])
    new = (old - offset * _conv_weight_sum(weight)).astype(weight.dtype)
    conv.set_input(2, graph.add_constant(f"{conv.name}_bias_hswish_shifted", new))


def _fold_into_gemm(graph: Graph, gemm: Node, offset: float) -> None:
    """alpha*(A'-d)B' + beta*C = alpha*A'B' + (beta*C - alpha*d*colsum(B')); beta becomes 1."""
    weight, bias = gemm.input(1).const, gemm.input(2)
    b = weight.astype(np.float64)
    column_sum = (b.T if gemm.attr("transB", 0) else b).sum(axis=0)
    alpha, beta = gemm.attr("alpha", 1.0), gemm.attr("beta", 1.0)
    old = beta * bias.const.astype(np.float64) if bias is not None else np.zeros(column_sum.shape)
    new = (old - alpha * offset * column_sum).astype(weight.dtype)
    gemm.set_input(2, graph.add_constant(f"{gemm.name}_bias_hswish_shifted", new))
    if beta != 1.0:
        gemm.set_attr("beta", 1.0)


def _padded_shape(shape: tuple | None, pads: list[int]) -> tuple | None:
    if shape is None:
        return None
    rank = len(pads) // 2
    dims = list(shape)
    for i in range(rank):
        d = dims[2 + i]
        dims[2 + i] = d + pads[i] + pads[rank + i] if isinstance(d, int) else None
    return tuple(dims)


def _border_pad(graph: Graph, shifted: Value, pads: list[int], offset: float, anchor: Node) -> Value:
    """Pad(shifted, pads, constant offset): the borders hold real 0 of the unshifted tensor."""
    rank = len(pads) // 2
    all_pads = [0, 0, *pads[:rank], 0, 0, *pads[rank:]]
    pads_value = graph.add_constant(f"{shifted.name}_border_pads", np.asarray(all_pads, np.int64))
    fill = graph.add_constant(f"{shifted.name}_border_value", np.asarray(offset, np.float32))
    out = graph.add_value(f"{shifted.name}_padded", dtype=shifted.dtype, shape=_padded_shape(shifted.shape, pads))
    out.meta["nonnegative"] = True  # y' >= 0 and the fill is 3/8
    pad = graph.add_node("Pad", [shifted, pads_value, fill], [out], name=f"{anchor.name}_border_pad", after=anchor)
    pad.meta["keep_float"] = PAD_REASON
    return out


def _shift(graph: Graph, hswish: HSwish, offset: float) -> dict:
    y, last = hswish.y, hswish.nodes[-1]
    for node in hswish.nodes:
        node.meta.setdefault("keep_float", FLOAT_REASON)
    constant = graph.add_constant(f"{y.name}_hswish_offset", np.asarray(offset, np.float32))
    shifted = graph.add_value(f"{y.name}_shifted", dtype=y.dtype, shape=y.shape)
    shifted.meta["nonnegative"] = True  # h-swish >= -3/8, so y + 3/8 >= 0
    add = graph.add_node("Add", [y, constant], [shifted], name=f"{last.name}_hswish_shift", after=last)
    add.meta["keep_float"] = SHIFT_REASON
    pad_outputs: dict[tuple[int, ...], Value] = {}
    consumers = y.consumers()
    padded = 0
    for consumer in consumers:
        if consumer is add:
            continue
        source = shifted
        if consumer.op_type == "Conv":
            pads = _conv_pads(consumer, y.shape)
            if any(pads):
                key = tuple(pads)
                if key not in pad_outputs:
                    pad_outputs[key] = _border_pad(graph, shifted, pads, offset, add)
                source = pad_outputs[key]
                consumer.set_attr("pads", [0] * len(pads))
                if consumer.attr("auto_pad") is not None:
                    consumer.set_attr("auto_pad", "NOTSET")
                padded += 1
            _fold_into_conv(graph, consumer, offset)
        else:
            _fold_into_gemm(graph, consumer, offset)
        consumer.replace_input(0, source)
    return {"tensor": y.name, "form": hswish.form, "offset": offset,
            "consumers": [c.name for c in consumers if c is not add], "padded_consumers": padded}


def _try_shift(graph: Graph, hswish: HSwish, options: "HSwishShiftPass.Options", ctx: PassContext) -> bool:
    reason = _why_not(hswish, options.padding)
    if reason:
        ctx.note("hswish_not_shifted", {"tensor": hswish.y.name, "form": hswish.form, "reason": reason})
        logger.info("h-swish '%s' not shifted: %s", hswish.y.name, reason)
        return False
    ctx.note("hswish_shifted", _shift(graph, hswish, options.offset))
    return True


@register_pass("hswish_shift")
class HSwishShiftPass(Pass):
    """Shift h-swish outputs feeding Conv/Gemm by +3/8 and fold -3/8·W_sum into their biases.

    Cases: HardSwish, x·HardSigmoid(x), x·Clip(x+3, 0, 6)/6 (either placement of the /6); each
    consumer a Conv (any group; pads resolved from auto_pad when the shape is known) or Gemm
    (transB, alpha, beta honoured). Padded convs get a float Pad with constant 3/8
    (`padding: exact_pad`) or make the h-swish be skipped (`padding: skip_padded`).
    """

    phase = Phase.TRANSFORM
    establishes = frozenset({"hswish_shifted"})

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")
        padding: Literal["exact_pad", "skip_padded"] = "exact_pad"
        offset: float = Field(HSWISH_MINIMUM, ge=HSWISH_MINIMUM, description="shift d; >= 3/8 keeps y + d >= 0")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        shifted = skipped = 0
        for node in graph:  # a snapshot: the Add / Pad nodes made on the way are not revisited
            hswish = _match(node)
            if hswish is None:
                continue
            if _try_shift(graph, hswish, self.options, ctx):
                shifted += 1
            else:
                skipped += 1
        if shifted:
            graph.remove_unused()  # the replaced biases
        return PassResult(modified=shifted > 0, stats={"shifted": shifted, "not_shifted": skipped})
