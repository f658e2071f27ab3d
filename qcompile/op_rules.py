"""How each op type is quantized: one table entry per op (style guide R15).

An OpRule says which inputs are activations, which is the weight (and its per-channel axis),
which is the bias, whether the outputs are quantized with their own range or share the input's
scale, and whether the op can be absorbed as a clamp into the producer's output range (the way
runtimes fuse Relu / Clip into the preceding Conv). Adding an op is one register_op_rule call.
Ops without a rule stay float and are listed in the report.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from .ir import Node

WeightAxis = Callable[[Node], int]


@dataclass(frozen=True)
class OpRule:
    activation_inputs: tuple[int, ...] = (0,)
    weight_input: int | None = None
    weight_axis: WeightAxis | None = None  # per-channel axis of the weight (output channels)
    bias_input: int | None = None
    quantize_outputs: bool = True
    share_input_scale: bool = False  # output codes are the input codes (Reshape, MaxPool, ...)
    fusable_activation: bool = False  # Relu/Clip: absorbed into the producer's output range
    nonnegative_output: Callable[[Node, list[bool]], bool] = lambda node, inputs_nonneg: False
    refuse: Callable[[Node], str] = lambda node: ""  # why this node cannot be quantized, or ""


OP_RULES: dict[str, OpRule] = {}


def register_op_rule(*op_types: str, rule: OpRule) -> None:
    for op_type in op_types:
        OP_RULES[op_type] = rule


def rule_for(node: Node) -> OpRule | None:
    if node.domain not in ("", "ai.onnx"):
        return None
    return OP_RULES.get(node.op_type)


def _conv_weight_axis(node: Node) -> int:
    return 1 if node.op_type == "ConvTranspose" else 0  # ConvTranspose weights are [C_in, C_out/g, ...]


def _gemm_weight_axis(node: Node) -> int:
    return 0 if node.attr("transB", 0) else 1  # output features of B


def _matmul_weight_axis(node: Node) -> int:
    weight = node.inputs[1]
    return len(weight.const.shape) - 1 if weight is not None and weight.is_const else 1


def _all_inputs_nonneg(node: Node, flags: list[bool]) -> bool:
    return bool(flags) and all(flags)


def _first_input_nonneg(node: Node, flags: list[bool]) -> bool:
    return bool(flags) and flags[0]


def _clip_nonneg(node: Node, flags: list[bool]) -> bool:
    low = node.input(1)
    if low is not None and low.is_const:
        return float(low.const) >= 0.0
    if low is None and node.attr("min") is not None:  # opset < 11
        return node.attr("min") >= 0.0
    return bool(flags) and flags[0]


_always = lambda node, flags: True  # noqa: E731


def clamp_bounds(node: Node) -> tuple[float, float] | None:
    """(lo, hi) that a Relu or Clip clamps to, ±inf for a bound it does not set (an absent Clip input,
    or no min / max attribute before opset 11); None when a bound is not a one-value constant or
    the node is neither op."""
    if node.op_type == "Relu":
        return 0.0, math.inf
    if node.op_type != "Clip":
        return None
    bounds = []
    for index, attr, default in ((1, "min", -math.inf), (2, "max", math.inf)):
        value = node.input(index)
        if value is None:
            bounds.append(float(node.attr(attr, default)))
        elif value.is_const and value.const.size == 1:
            bounds.append(float(value.const.reshape(-1)[0]))
        else:
            return None
    return bounds[0], bounds[1]


def _clip_refuse(node: Node) -> str:
    if any(v is not None and not v.is_const for v in node.inputs[1:]):
        return "Clip bounds are not constants"
    return ""


def _pad_refuse(node: Node) -> str:
    """Pad shares its input's scale only when the padding value is real 0 (the zero point's code)."""
    mode = node.attr("mode", b"constant")
    if (mode.decode() if isinstance(mode, bytes) else mode) != "constant":
        return ""
    value = node.input(2)
    if value is None or (value.is_const and (value.const.size == 0 or float(value.const.reshape(-1)[0]) == 0.0)):
        return ""
    return "Pad constant_value is not 0"

def _min_refuse(node: Node) -> str:
    bound = node.input(1)
    if len(node.inputs) == 2 and bound is not None and bound.is_const and bound.const.size and bound.const.min() >= 0:
        return ""
    return "Min is quantized only as a clamp by a constant >= 0 (equalize_cross_layer's per-channel ReLU6 bound)"


register_op_rule("Conv", "ConvTranspose", rule=OpRule(weight_input=1, weight_axis=_conv_weight_axis, bias_input=2))
register_op_rule("Gemm", rule=OpRule(weight_input=1, weight_axis=_gemm_weight_axis, bias_input=2))
register_op_rule("MatMul", rule=OpRule(activation_inputs=(0,), weight_input=1, weight_axis=_matmul_weight_axis))
register_op_rule("Add", rule=OpRule(activation_inputs=(0, 1), nonnegative_output=_all_inputs_nonneg))
register_op_rule("Mul", rule=OpRule(activation_inputs=(0, 1), nonnegative_output=_all_inputs_nonneg))
register_op_rule("Concat", rule=OpRule(activation_inputs=(), nonnegative_output=_all_inputs_nonneg))
register_op_rule("AveragePool", "GlobalAveragePool",
                 rule=OpRule(nonnegative_output=_first_input_nonneg))
register_op_rule("Relu", rule=OpRule(fusable_activation=True, nonnegative_output=_always))
register_op_rule("Clip", rule=OpRule(fusable_activation=True, nonnegative_output=_clip_nonneg, refuse=_clip_refuse))
register_op_rule("Sigmoid", "HardSigmoid", rule=OpRule(nonnegative_output=_always))
register_op_rule("HardSwish", rule=OpRule())
register_op_rule("MaxPool", "GlobalMaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze",
                 rule=OpRule(share_input_scale=True, nonnegative_output=_first_input_nonneg))
# Min(x, c) with a constant c >= 0 (a per-channel ReLU6 bound after equalization) is a clamp: the
# output keeps the input's grid, and min commutes with quantization.
register_op_rule("Min", rule=OpRule(share_input_scale=True, nonnegative_output=_all_inputs_nonneg, refuse=_min_refuse))
register_op_rule("Pad", rule=OpRule(share_input_scale=True, nonnegative_output=_first_input_nonneg, refuse=_pad_refuse))

# Concat quantizes every input: its activation_inputs are all of them, decided per node.
VARIADIC_ACTIVATION_INPUTS = {"Concat"}


def activation_inputs(node: Node, rule: OpRule) -> tuple[int, ...]:
    if node.op_type in VARIADIC_ACTIVATION_INPUTS:
        return tuple(range(len(node.inputs)))
    return rule.activation_inputs


def calibrated_weight_problem(node: Node) -> str:
    """Why a Conv / Gemm / MatMul cannot be refined from its calibrated weight (empty when it can):
    the weight must be a constant with quantization parameters (2-D for MatMul) and the data input
    must not be. Shared by the refine passes that rework a layer's weight or bias."""
    weight = node.input(1)
    if weight is None or not weight.is_const:
        return "the weight is not a constant"
    if weight.qparams is None:
        return "the weight has no quantization parameters"
    if node.op_type == "MatMul" and weight.const.ndim != 2:
        return f"MatMul weight of rank {weight.const.ndim} (only 2-D weights are handled)"
    x = node.input(0)
    if x is None or x.is_const:
        return "the data input is a constant"
    return ""
